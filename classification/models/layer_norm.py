"""LayerNorm over the last, contiguous axis that writes its output straight in a lower precision.

Under AMP, PyTorch runs layer_norm in fp32 and returns fp32; when the next op is a matmul, autocast then
reads that fp32 tensor back to cast it to fp16/bf16. VMamba's block norms and SS2D's out-norm all feed a
matmul, and at 224 px that round trip (write 4 B, read 4 B, write 2 B per element, and the same again in
the backward pass) is one of the largest costs of the model. ``layer_norm_lastdim(x, ..., out_dtype)``
computes in fp32 and rounds once to ``out_dtype`` -- bit for bit what layer_norm followed by the cast
gives -- in one Triton kernel (forward and backward). Rows are the flattened leading axes: a (B, C, H, W) map in channels-last memory is normalised
over C without a transpose.
"""
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

__all__ = ["layer_norm_lastdim"]


if triton is not None:

    @triton.jit
    def _row_tile(n_rows, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's ROWS x BLOCK_C tile of the (n_rows, C) matrix: indices, masks, element offsets."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        col_ok = cols < C
        mask = row_ok[:, None] & col_ok[None, :]
        return rows, cols, row_ok, col_ok, mask, rows[:, None].to(tl.int64) * C + cols[None, :]

    @triton.jit
    def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, C, eps,
                               ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, cols, row_ok, col_ok, mask, offsets = _row_tile(n_rows, C, ROWS, BLOCK_C)
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
    def _layer_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dwb_part_ptr, n_rows, C,
                               ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        # dx for ROWS rows, and those rows' sums of dw and db: row pid of the (programs, 2, C) partials
        # that the caller adds up (one program per tile keeps the whole card busy; the partials are a
        # few percent of the bytes moved).
        pid = tl.program_id(0)
        rows, cols, row_ok, col_ok, mask, offsets = _row_tile(n_rows, C, ROWS, BLOCK_C)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        w_dy = w[None, :] * dy
        mean_w_dy = tl.sum(w_dy, axis=1) / C
        mean_w_dy_x_hat = tl.sum(w_dy * x_hat, axis=1) / C
        dx = (w_dy - mean_w_dy[:, None] - x_hat * mean_w_dy_x_hat[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        part = dwb_part_ptr + pid.to(tl.int64) * 2 * C + cols
        tl.store(part, tl.sum(dy * x_hat, axis=0), mask=col_ok)
        tl.store(part + C, tl.sum(dy, axis=0), mask=col_ok)


def _tiling(C):
    block_c = triton.next_power_of_2(C)
    return max(1, min(64, 4096 // block_c)), block_c  # about 4K elements per program


def _forward(x, weight, bias, eps, out_dtype):
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


def _backward(dy, x, weight, mean, rstd):
    C = x.shape[-1]
    n_rows = x.numel() // C
    rows, block_c = _tiling(C)
    programs = triton.cdiv(n_rows, rows)
    dx = torch.empty_like(x)
    dwb_part = torch.empty(programs, 2, C, dtype=torch.float32, device=x.device)
    if n_rows:
        _layer_norm_bwd_kernel[(programs,)](x, weight, dy, mean, rstd, dx, dwb_part, n_rows, C,
                                            ROWS=rows, BLOCK_C=block_c)
    dw, db = dwb_part.sum(0).to(weight.dtype)
    return dx, dw, db


class _LayerNormLastDim(torch.autograd.Function):
    # An autograd.Function launching the Triton kernels directly: torch.compile traces through it, and in
    # eager mode it costs far less CPU time per call than a torch.library custom op.
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, mean, rstd = _forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(dy.contiguous(), x, weight, mean, rstd)
        return dx, dw, db, None, None


def layer_norm_lastdim(x, weight, bias, eps, out_dtype=None):
    """LayerNorm over the last axis of ``x``, output in ``out_dtype`` (default: x's dtype).

    The Triton kernel runs for contiguous CUDA tensors (and for any contiguous tensor under
    TRITON_INTERPRET=1, which the tests use); otherwise F.layer_norm and a cast, with the same result.
    """
    out_dtype = out_dtype or x.dtype
    use_triton = triton is not None and (x.is_cuda or _interpreting()) and x.is_contiguous()
    if not use_triton:
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(out_dtype)
    return _LayerNormLastDim.apply(x, weight, bias, eps, out_dtype)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"
