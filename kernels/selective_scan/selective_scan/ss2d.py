"""SS2D core of VMamba's v2 blocks: cross-scan -> per-route x_proj / dt_proj -> selective scan -> cross-merge.

Two implementations of one function, side by side:

* `ss2d_core_reference`: the unfused path, written with the existing pieces exactly as SS2D computes it
  (materialised (B, 4, D, L) route copies, batched projections, `selective_scan_fn`, merge). It supports any
  d_state and is what the fused path is tested against.
* the fused path (`backend="fused"`): one GEMM x_dbl = x W_proj^T on the channels-last rows for all four
  routes at once (a route permutation commutes with a position-wise linear map; SS2D's x_proj_weight is the
  GEMM's weight as stored), then `scan_routes`: the CUDA dispatcher op `selective_scan_ss2d::fwd` (kernels in
  csrc/ss2d_*.cu) walks every route through its index map, computes dt = softplus(W_dt x_dbl + bias) per
  step and adds the four outputs into one fp32 map; its backward is `selective_scan_ss2d::bwd`. Off CUDA a
  PyTorch implementation of the same contract runs. The ops have fake kernels, so torch.compile traces
  through them.

Dispatch rule of `ss2d_core(backend=None)`: the fused path for CUDA tensors when the extension is built,
the routes are cross2d with K = 4, d_state N = 1, the dt rank R satisfies R + 2 <= 68 and x is
fp32/fp16/bf16 (every stage of the published v2 models); the reference otherwise (d_state 16 of v0, CPU).
`fused_unsupported_reason` says why a call is not fused. Nothing falls back silently at run time: a call
the fused op cannot take is rejected before it starts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, torch_scan
from .ops import selective_scan_fn

__all__ = ["ss2d_core", "ss2d_core_reference", "fused_core", "fused_available", "fused_unsupported_reason",
           "route_positions", "project", "scan_routes"]

K = 4
MAX_RANK = 66  # the CUDA kernels hold a route's x_dbl row (R + 2 values) in at most 68 floats (kWidestRow)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# fixed at import; a constant keeps the dispatch rule traceable by dynamo
_CUDA_OPS = ops.dispatcher_ops_loaded("selective_scan_ss2d")


def fused_available() -> bool:
    """True when the fused CUDA kernels are built and a GPU is visible."""
    return _CUDA_OPS and torch.cuda.is_available()


def checkpoint_chunk(rank: int) -> int:
    """Steps between the states the CUDA forward saves for its backward, for dt rank `rank` (kv_for_rank and
    chunk_for_kv in csrc/ss2d_fused.cuh)."""
    return 16 if rank + 2 <= 8 else 8 if rank + 2 <= 32 else 4


def project(x_last: Tensor, x_proj_weight: Tensor) -> Tensor:
    """x_dbl of the fused ops: x_last (B, H, W, D) -> (B, H, W, 4 * (R + 2)) in x's dtype, route k's row
    [dt-rank values, B, C] (N = 1): one GEMM with x_proj_weight (4, R + 2, D) as stored."""
    x_dbl = F.linear(x_last, x_proj_weight.reshape(-1, x_last.shape[-1]).to(x_last.dtype))
    return x_dbl.to(x_last.dtype)  # autocast may have run the GEMM in its own dtype


def route_positions(height: int, width: int, device=None) -> Tensor:
    """(4, L) int64: the raster position (h * W + w) each cross2d route visits at each step: row-major,
    column-major, row-major reversed, column-major reversed (SPEC section 2)."""
    raster = torch.arange(height * width, device=device).view(height, width)
    row_major, col_major = raster.flatten(), raster.t().flatten()
    return torch.stack([row_major, col_major, row_major.flip(0), col_major.flip(0)])


def _merge_routes(ys: Tensor, positions: Tensor) -> Tensor:
    """ys (B, 4, D, L) in route order -> (B, L, D), the four routes put back at their positions and summed."""
    batch, _, dim, length = ys.shape
    out = ys.new_zeros(batch, length, dim)
    for k in range(K):
        out.index_add_(1, positions[k], ys[:, k].transpose(1, 2))
    return out


def _as_output(y_last: Tensor, channel_first: bool) -> Tensor:
    """(B, H, W, D) fp32 storage -> the caller's layout (a view)."""
    return y_last.permute(0, 3, 1, 2) if channel_first else y_last


# ------------------------------------------------------------------------------------- unfused reference


def ss2d_core_reference(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
                        A_logs: Tensor, Ds: Tensor, channel_first: bool = True,
                        scan_backend: Optional[str] = None) -> Tensor:
    """The unfused SS2D core (any d_state). x (B, D, H, W) after the depthwise conv and activation; returns the
    merged scan output in fp32, (B, D, H, W) viewing channels-last storage if channel_first else
    (B, H, W, D). The projections run in x's dtype (as under autocast); the scan gets fp32 A, D and bias."""
    batch, dim, height, width = x.shape
    length = height * width
    rank = dt_projs_weight.shape[2]
    d_state = A_logs.shape[1]
    positions = route_positions(height, width, x.device)
    xs = x.flatten(2)[:, :, positions].transpose(1, 2).contiguous()  # (B, 4, D, L)
    x_dbl = torch.matmul(x_proj_weight.to(xs.dtype).expand(batch, -1, -1, -1), xs)  # (B, 4, R+2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [rank, d_state, d_state], dim=2)
    dts = torch.matmul(dt_projs_weight.to(xs.dtype).expand(batch, -1, -1, -1), dts)  # (B, 4, D, L)
    ys = selective_scan_fn(xs.view(batch, K * dim, length), dts.reshape(batch, K * dim, length),
                           -torch.exp(A_logs.float()), Bs, Cs, Ds.float(), dt_projs_bias.reshape(-1).float(),
                           delta_softplus=True, out_float=True, backend=scan_backend)
    y = _merge_routes(ys.view(batch, K, dim, length), positions)
    return _as_output(y.view(batch, height, width, dim), channel_first)


# --------------------------------------------------------------------------------------- the fused ops


def _route_inputs(x: Tensor, x_dbl: Tensor, dt_weight: Tensor):
    """The fused ops' inputs laid out as the unfused scan's, in fp32 (fp64 stays fp64): u, delta (B, 4D, L),
    B, C (B, 4, 1, L) in route order, the dt-rank rows (B, L, 4, R) and the route positions."""
    batch, height, width, dim = x.shape
    length = height * width
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rank = dt_weight.shape[2]
    positions = route_positions(height, width, x.device)
    rows = x_dbl.to(dtype).reshape(batch, length, K, rank + 2)
    rank_rows = rows[..., :rank]
    delta = torch.einsum("blkr,kdr->bkdl", rank_rows, dt_weight.to(dtype))  # natural order
    u = x.reshape(batch, length, dim).transpose(1, 2).to(dtype)  # exact for 16-bit x; keeps delta unrounded
    us = torch.stack([u[:, :, positions[k]] for k in range(K)], 1).reshape(batch, K * dim, length)
    deltas = torch.stack([delta[:, k][:, :, positions[k]] for k in range(K)], 1).reshape(batch, K * dim, length)
    Bs = torch.stack([rows[:, positions[k], k, rank] for k in range(K)], 1).unsqueeze(2)
    Cs = torch.stack([rows[:, positions[k], k, rank + 1] for k in range(K)], 1).unsqueeze(2)
    return us, deltas, Bs, Cs, rank_rows, positions


def _fused_core_torch(x: Tensor, x_dbl: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor, Ds: Tensor) -> Tensor:
    """The fused ops' contract in PyTorch (their forward off CUDA, and a differentiable test oracle): x
    (B, H, W, D), x_dbl (B, H, W, 4 * (R + 2)) with route k's row [dt-rank values, B, C]; SS2D's parameters as
    stored (dt_weight (4, D, R), dt_bias (4, D), A_log (4D, 1), Ds (4D,)); returns y (B, H, W, D) in fp32
    (fp64 for fp64 inputs)."""
    batch, height, width, dim = x.shape
    us, deltas, Bs, Cs, _, positions = _route_inputs(x, x_dbl, dt_weight)
    A = -torch.exp(A_log.to(us.dtype))
    ys = selective_scan_fn(us, deltas, A.reshape(K * dim, 1), Bs, Cs, Ds.reshape(-1).to(us.dtype),
                           dt_bias.reshape(-1).to(us.dtype), delta_softplus=True, out_float=True, backend="torch")
    return _merge_routes(ys.view(batch, K, dim, -1), positions).view(batch, height, width, dim)


def _fused_core_torch_backward(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds):
    """Gradients of _fused_core_torch (the backward op's CPU kernel, where an op body cannot re-enter autograd)."""
    batch, height, width, dim = x.shape
    length = height * width
    us, deltas, Bs, Cs, rank_rows, positions = _route_inputs(x, x_dbl, dt_weight)
    dtype = us.dtype
    rank = rank_rows.shape[-1]
    A = -torch.exp(A_log.to(dtype))
    dy_t = dy.to(dtype).reshape(batch, length, dim).transpose(1, 2)
    dys = torch.stack([dy_t[:, :, positions[k]] for k in range(K)], 1).reshape(batch, K * dim, length)
    du, ddelta, dA, dB, dC, dD, dbias = torch_scan.scan_backward(
        dys, us, deltas, A.reshape(K * dim, 1), Bs, Cs, Ds.reshape(-1).to(dtype),
        dt_bias.reshape(-1).to(dtype), True)
    dx = _merge_routes(du.view(batch, K, dim, length), positions)
    ddelta = ddelta.view(batch, K, dim, length)
    ddelta_natural = torch.empty_like(ddelta)
    d_rows = x_dbl.new_zeros((batch, length, K, rank + 2), dtype=dtype)
    for k in range(K):
        ddelta_natural[:, k, :, positions[k]] = ddelta[:, k]
        d_rows[:, positions[k], k, rank] = dB[:, k, 0]
        d_rows[:, positions[k], k, rank + 1] = dC[:, k, 0]
    d_rows[..., :rank] = torch.einsum("bkdl,kdr->blkr", ddelta_natural, dt_weight.to(dtype))
    ddt_weight = torch.einsum("bkdl,blkr->kdr", ddelta_natural, rank_rows)
    return (dx.to(x.dtype).view(x.shape), d_rows.view(x_dbl.shape).to(x_dbl.dtype), ddt_weight.to(dt_weight.dtype),
            dbias.view(dt_bias.shape).to(dt_bias.dtype), (dA * A.reshape(K * dim, 1)).to(A_log.dtype),
            dD.view(Ds.shape).to(Ds.dtype))


# The ops selective_scan_ss2d::fwd / ::bwd: the CUDA extension defines them with their CUDA kernels; without it
# they are defined here, with the schemas of csrc/ss2d_bindings.cpp. Either way the PyTorch implementation is
# their kernel for CPU tensors, and the fake kernels let torch.compile trace them.
if not _CUDA_OPS:
    _LIBRARY = torch.library.Library("selective_scan_ss2d", "DEF")
    _LIBRARY.define("fwd(Tensor x, Tensor x_dbl, Tensor dt_weight, Tensor dt_bias, Tensor A_log, Tensor Ds) -> "
                    "(Tensor, Tensor)")
    _LIBRARY.define("bwd(Tensor dy, Tensor x, Tensor x_dbl, Tensor dt_weight, Tensor dt_bias, Tensor A_log, "
                    "Tensor Ds, Tensor ckpt) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@torch.library.impl("selective_scan_ss2d::fwd", "CPU")
def _fwd_cpu(x, x_dbl, dt_weight, dt_bias, A_log, Ds):
    return _fused_core_torch(x, x_dbl, dt_weight, dt_bias, A_log, Ds), x.new_empty(0, dtype=torch.float32)


@torch.library.impl("selective_scan_ss2d::bwd", "CPU")
def _bwd_cpu(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, ckpt):
    return _fused_core_torch_backward(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds)


@torch.library.register_fake("selective_scan_ss2d::fwd")
def _fwd_fake(x, x_dbl, dt_weight, dt_bias, A_log, Ds):
    batch, height, width, dim = x.shape
    y = x.new_empty(x.shape, dtype=torch.float32)
    if x.device.type != "cuda":
        return y, x.new_empty(0, dtype=torch.float32)
    chunks = -(-height * width // checkpoint_chunk(dt_weight.shape[2]))
    return y, x.new_empty((batch, K, chunks, dim), dtype=torch.float32)


@torch.library.register_fake("selective_scan_ss2d::bwd")
def _bwd_fake(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, ckpt):
    return (torch.empty_like(x), torch.empty_like(x_dbl), torch.empty_like(dt_weight), torch.empty_like(dt_bias),
            torch.empty_like(A_log), torch.empty_like(Ds))


class _ScanRoutes(torch.autograd.Function):
    # An autograd.Function around the dispatcher ops rather than a torch.library custom op: in eager mode a
    # custom op's Python wrappers cost the host about 0.2 ms per forward + backward, and the model is
    # host-bound in training on slower hosts. torch.compile traces through it (the ops have fake kernels).
    @staticmethod
    def forward(ctx, x, x_dbl, dt_weight, dt_bias, A_log, Ds):
        y, ckpt = torch.ops.selective_scan_ss2d.fwd(x, x_dbl, dt_weight, dt_bias, A_log, Ds)
        ctx.save_for_backward(x, x_dbl, dt_weight, dt_bias, A_log, Ds, ckpt)
        return y

    @staticmethod
    def backward(ctx, dy):
        return tuple(torch.ops.selective_scan_ss2d.bwd(dy.float().contiguous(), *ctx.saved_tensors))


def scan_routes(x: Tensor, x_dbl: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor, Ds: Tensor) -> Tensor:
    """The fused ops, differentiable: x (B, H, W, D) contiguous, x_dbl = project(x, x_proj_weight), SS2D's
    dt_projs_weight (4, D, R), dt_projs_bias (4, D), A_logs (4D, 1) and Ds (4D,) in fp32; returns the merged
    scan output y (B, H, W, D) in fp32."""
    return _ScanRoutes.apply(x, x_dbl, dt_weight, dt_bias, A_log, Ds)


# ----------------------------------------------------------------------------------- user-facing entry


def _check_shapes(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds):
    """Raises a clear error naming the bad argument; returns (rank, d_state)."""
    for name, t in (("x", x), ("x_proj_weight", x_proj_weight), ("dt_projs_weight", dt_projs_weight),
                    ("dt_projs_bias", dt_projs_bias), ("A_logs", A_logs), ("Ds", Ds)):
        if not isinstance(t, Tensor):
            raise TypeError(f"ss2d_core: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"ss2d_core: `{name}` is on {t.device} but `x` is on {x.device}")
    if x.dim() != 4:
        raise ValueError(f"ss2d_core: `x` must be (B, D, H, W), got shape {tuple(x.shape)}")
    dim = x.shape[1]
    if dt_projs_weight.dim() != 3 or dt_projs_weight.shape[:2] != (K, dim):
        raise ValueError(f"ss2d_core: `dt_projs_weight` must be (4, D={dim}, R), got {tuple(dt_projs_weight.shape)}")
    rank = dt_projs_weight.shape[2]
    if A_logs.dim() != 2 or A_logs.shape[0] != K * dim or A_logs.shape[1] < 1:
        raise ValueError(f"ss2d_core: `A_logs` must be (4*D={K * dim}, N), got {tuple(A_logs.shape)}")
    d_state = A_logs.shape[1]
    if x_proj_weight.shape != (K, rank + 2 * d_state, dim):
        raise ValueError(f"ss2d_core: `x_proj_weight` must be (4, R+2N={rank + 2 * d_state}, D={dim}), got "
                         f"{tuple(x_proj_weight.shape)}")
    if dt_projs_bias.shape != (K, dim):
        raise ValueError(f"ss2d_core: `dt_projs_bias` must be (4, D={dim}), got {tuple(dt_projs_bias.shape)}")
    if Ds.shape != (K * dim,):
        raise ValueError(f"ss2d_core: `Ds` must be (4*D={K * dim},), got {tuple(Ds.shape)}")
    return rank, d_state


def fused_unsupported_reason(x: Tensor, rank: int, d_state: int) -> Optional[str]:
    """None when the fused path takes this call, else why not (the dispatch rule of the module docstring)."""
    if d_state != 1:
        return f"d_state is {d_state}; the fused kernel supports d_state 1"
    if rank > MAX_RANK:
        return f"dt rank {rank} needs x_dbl rows of {rank + 2} values; the fused kernel holds at most {MAX_RANK + 2}"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not one of {_DTYPES}"
    if x.is_cuda and not _CUDA_OPS:
        return f"the fused CUDA kernels are not built ({ops.build_info()})"
    return None


def ss2d_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor, A_logs: Tensor,
              Ds: Tensor, channel_first: bool = True, backend: Optional[str] = None) -> Tensor:
    """SS2D core with cross2d routes: x (B, D, H, W) after the depthwise conv and activation (channels-last
    storage avoids a copy); parameters as SS2D stores them (x_proj_weight (4, R+2N, D), dt_projs_weight
    (4, D, R), dt_projs_bias (4, D), A_logs (4D, N), Ds (4D,)). Returns the merged scan output in fp32:
    (B, D, H, W) viewing channels-last storage if channel_first, else (B, H, W, D).

    backend: None (the dispatch rule in the module docstring), "fused" (raises if unsupported; off CUDA it runs
    the ops' PyTorch implementation), or "reference"."""
    rank, d_state = _check_shapes(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds)
    if backend not in (None, "fused", "reference"):
        raise ValueError(f"ss2d_core: `backend` must be None, 'fused' or 'reference', got {backend!r}")
    reason = fused_unsupported_reason(x, rank, d_state)
    if backend == "fused" and reason is not None:
        raise RuntimeError(f"ss2d_core: backend='fused' requested but {reason}")
    if backend == "reference" or (backend is None and (reason is not None or not x.is_cuda)):
        return ss2d_core_reference(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channel_first)
    return fused_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channel_first)


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def fused_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor, A_logs: Tensor,
               Ds: Tensor, channel_first: bool = True) -> Tensor:
    """The fused path of ss2d_core without its argument checks, for callers that have checked the call with
    fused_unsupported_reason and whose parameters have SS2D's shapes (the SS2D module)."""
    x_last = x.permute(0, 2, 3, 1).contiguous()  # no copy for channels-last storage
    y = scan_routes(x_last, project(x_last, x_proj_weight), _fp32(dt_projs_weight).contiguous(),
                    _fp32(dt_projs_bias).contiguous(), _fp32(A_logs).contiguous(), _fp32(Ds).contiguous())
    return _as_output(y, channel_first)
