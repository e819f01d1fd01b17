"""LayerNorm over the last, contiguous axis that writes its output straight in a lower precision.

Under AMP, PyTorch runs layer_norm in fp32 and returns fp32; when the next op is a matmul, autocast then
reads that fp32 tensor back to cast it to fp16/bf16. VMamba's block norms and SS2D's out-norm all feed a
matmul, and at 224 px that round trip (write 4 B, read 4 B, write 2 B per element, and the same again in
the backward pass) is one of the largest costs of the model. ``layer_norm_lastdim(x, ..., out_dtype)``
computes in fp32 and rounds once to ``out_dtype`` -- bit for bit what layer_norm followed by the cast
gives -- in one Triton kernel (forward and backward), registered with torch.library so torch.compile
sees one op. Rows are the flattened leading axes: a (B, C, H, W) map in channels-last memory is normalised
over C without a transpose.
"""
import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

__all__ = ["layer_norm_lastdim", "triton_layer_norm_available"]


def triton_layer_norm_available(x):
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, C, eps,
                               ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _layer_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                               n_rows, C, rows_per_program, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        # Each program owns a contiguous range of rows: dx row by row, and its partial sums of dw and db
        # (one row of dw_part / db_part), which the caller adds up.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
        db = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first = pid * rows_per_program
        last = tl.minimum(first + rows_per_program, n_rows)
        for start in range(first, last, ROWS):
            rows = start + tl.arange(0, ROWS)
            row_ok = rows < last
            mask = row_ok[:, None] & col_ok[None, :]
            offsets = rows[:, None].to(tl.int64) * C + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            w_dy = w[None, :] * dy
            mean_w_dy = tl.sum(w_dy, axis=1) / C
            mean_w_dy_x_hat = tl.sum(w_dy * x_hat, axis=1) / C
            dx = (w_dy - mean_w_dy[:, None] - x_hat * mean_w_dy_x_hat[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * x_hat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(dw_part_ptr + pid * C + cols, dw, mask=col_ok)
        tl.store(db_part_ptr + pid * C + cols, db, mask=col_ok)


def _tiling(C):
    block_c = triton.next_power_of_2(C)
    return max(1, min(64, 4096 // block_c)), block_c  # about 4K elements per program step


@torch.library.custom_op("vmamba::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C = x.shape[-1]
    n_rows = x.numel() // C
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        rows, block_c = _tiling(C)
        _layer_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](x, weight, bias, y, mean, rstd, n_rows, C, eps,
                                                              ROWS=rows, BLOCK_C=block_c)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    n_rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(n_rows, dtype=torch.float32),
            x.new_empty(n_rows, dtype=torch.float32))


@torch.library.custom_op("vmamba::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C = x.shape[-1]
    n_rows = x.numel() // C
    dx = torch.empty_like(x)
    rows, block_c = _tiling(C)
    programs = max(1, min(triton.cdiv(n_rows, rows), 8 * _multiprocessors(x.device)))
    rows_per_program = triton.cdiv(triton.cdiv(max(n_rows, 1), programs), rows) * rows
    programs = triton.cdiv(max(n_rows, 1), rows_per_program)
    dw_part = torch.zeros(programs, C, dtype=torch.float32, device=x.device)
    db_part = torch.zeros(programs, C, dtype=torch.float32, device=x.device)
    if n_rows:
        _layer_norm_bwd_kernel[(programs,)](x, weight, dy, mean, rstd, dx, dw_part, db_part, n_rows, C,
                                            rows_per_program, ROWS=rows, BLOCK_C=block_c)
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _multiprocessors(device):
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _setup_context(ctx, inputs, output):
    x, weight, _, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd)
    return dx, dw, db, None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm_lastdim(x, weight, bias, eps, out_dtype=None):
    """LayerNorm over the last axis of ``x``, output in ``out_dtype`` (default: x's dtype).

    The Triton kernel runs for CUDA tensors whose last axis is contiguous (or any tensor under
    TRITON_INTERPRET=1, which the tests use); otherwise F.layer_norm and a cast, with the same result.
    """
    out_dtype = out_dtype or x.dtype
    use_triton = triton is not None and (x.is_cuda or _interpreting()) and x.is_contiguous()
    if not use_triton:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype)
    y, _, _ = _layer_norm_fwd(x, weight, bias, eps, out_dtype)
    return y


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"
