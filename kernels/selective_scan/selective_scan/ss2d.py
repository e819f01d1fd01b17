"""SS2D's core: cross-scan -> per-route x_proj / dt_proj -> selective scan -> cross-merge, behind one dispatcher.

`ss2d_core(x, <SS2D's parameters>, routes=..., backend=...)` is the one entry point (the SS2D module calls it).
Three implementations of the same function, side by side:

* **fused** (`backend="fused"`): one GEMM x_dbl = x W_proj^T on the channels-last rows for all four routes at once
  (a route permutation commutes with a position-wise linear map; x_proj_weight is the GEMM's weight as stored),
  then `scan_routes`: the dispatcher op `selective_scan_ss2d::fwd` walks every route through its index map,
  computes dt = softplus(W_dt x_dbl + bias) per step and adds the four outputs into one fp32 map; its backward
  is `selective_scan_ss2d::bwd`. CUDA kernels in csrc/ss2d_*.cu (d_state 1 to MAX_D_STATE, dt rank up to MAX_RANK:
  every stage of the published v0 and v2 models), CPU kernels in csrc/cpu/ss2d_cpu.cpp (any d_state and rank);
  without a compiled kernel for the device the reference below is the op's kernel. Cross2d routes. Triton kernels
  (triton_ss2d.py: d_state up to 16, the same dt ranks) are the ops' CUDA kernel where the extension has none
  (registered at import, ops.py says when); `scan_routes(..., impl="triton")` runs them directly.
* **unfused** (`backend="unfused"`): `cross_scan` to (B, 4, D, L) route copies, batched per-route projections,
  the selective scan (ops.py), `cross_merge`. Any d_state and route set; what fvcore traces for FLOP counts.
* **reference** (`backend="reference"`): PyTorch, the routes gathered through `route_positions`, the fused ops'
  contract for any d_state. It is the fused ops' kernel where no compiled one is registered and, in float64,
  the oracle the compiled kernels are tested against.

Dispatch rule of `ss2d_core(backend=None)` (`select_core`): fused when the fused ops run a kernel for x's device
(the CPU whenever the extension is built; CUDA when it is built with CUDA, else when triton is installed) and take
the call (`fused_unsupported_reason` is None); unfused otherwise, and always under jit tracing (fvcore's FLOP count
keys on the unfused ops). Nothing falls back silently at run time: a call that `backend="fused"` cannot take is
rejected before it starts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, torch_scan, triton_ss2d
from .cross_scan import ROUTE_SETS, cross_merge, cross_scan, route_positions
from .ops import kernel_runs_on, triton_is_cuda_kernel  # one answer for every op family (ops.TRITON_FOR_CUDA)

__all__ = ["ss2d_core", "select_core", "fused_unsupported_reason", "unfused_scan_inputs", "project", "scan_routes",
           "scan_routes_reference", "triton_is_cuda_kernel", "BACKENDS", "MAX_RANK", "MAX_D_STATE"]

K = 4
MAX_RANK = 66  # at d_state 1 the CUDA kernels hold a route's x_dbl row (R + 2 values) in at most 68 floats
MAX_D_STATE = 16  # the CUDA kernels' kMaxDState
BACKENDS = ("fused", "unfused", "reference")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The CPU kernel saves the state entering each chunk of this many steps of a route (kChunk in
# csrc/cpu/ss2d_cpu.cpp).
CPU_CHUNK = 64
# The CUDA kernels for d_state above 1 do the same every STATES_CHUNK steps (kStatesChunk in csrc/ss2d_fused.cuh).
STATES_CHUNK = 32

ops.define_ops("selective_scan_ss2d", [
    "fwd(Tensor x, Tensor x_dbl, Tensor dt_weight, Tensor dt_bias, Tensor A_log, Tensor Ds) -> (Tensor, Tensor)",
    "bwd(Tensor dy, Tensor x, Tensor x_dbl, Tensor dt_weight, Tensor dt_bias, Tensor A_log, Tensor Ds, "
    "Tensor ckpt) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
])



# where the extension has no CUDA kernels (ops.py's docstring)
if ops.TRITON_FOR_CUDA:
    ops.impl_triton_cuda("selective_scan_ss2d", triton_ss2d.forward, triton_ss2d.backward)


def checkpoint_chunk(rank: int, device: torch.device, d_state: int = 1) -> int:
    """Steps between the states the compiled forward saves for its backward, for dt rank `rank` and `d_state`
    states (on CUDA at d_state 1: kv_for_rank and chunk_for_kv in csrc/ss2d_fused.cuh)."""
    if device.type == "cpu":
        return CPU_CHUNK
    if d_state > 1:
        return STATES_CHUNK
    return 16 if rank + 2 <= 8 else 8 if rank + 2 <= 32 else 4


def checkpoint_shape(x_shape, rank: int, d_state: int, device: torch.device) -> tuple:
    """Shape of the checkpoints the compiled forward (the extension's, or on CUDA the Triton one where it is the
    ops' kernel) saves for x of shape (B, H, W, D): (B, 4, chunks, N, D), or (B, 4, chunks, D) for the extension's
    CUDA kernels at d_state 1."""
    if device.type == "cuda" and triton_is_cuda_kernel():
        return triton_ss2d.checkpoint_shape(x_shape, d_state)
    batch, height, width, dim = x_shape
    chunks = -(-height * width // checkpoint_chunk(rank, device, d_state))
    if device.type == "cuda" and d_state == 1:
        return batch, K, chunks, dim
    return batch, K, chunks, d_state, dim


def project(x_last: Tensor, x_proj_weight: Tensor) -> Tensor:
    """x_dbl: x_last (B, H, W, D) -> (B, H, W, 4 * (R + 2N)) in x's dtype, route k's row [dt-rank values, B, C]:
    one GEMM with x_proj_weight (4, R + 2N, D) as stored."""
    x_dbl = F.linear(x_last, x_proj_weight.reshape(-1, x_last.shape[-1]).to(x_last.dtype))
    return x_dbl.to(x_last.dtype)  # autocast may have run the GEMM in its own dtype


def _merge_routes(ys: Tensor, positions: Tensor) -> Tensor:
    """ys (B, 4, D, L) in route order -> (B, L, D), the four routes put back at their positions and summed."""
    batch, _, dim, length = ys.shape
    out = ys.new_zeros(batch, length, dim)
    for k in range(K):
        out.index_add_(1, positions[k], ys[:, k].transpose(1, 2))
    return out


def _as_output(y_last: Tensor, channel_first: bool) -> Tensor:
    """(B, H, W, D) storage -> the caller's layout (a view)."""
    return y_last.permute(0, 3, 1, 2) if channel_first else y_last


# ------------------------------------------------------------------------------------------- reference


def _route_inputs(x: Tensor, x_dbl: Tensor, dt_weight: Tensor, d_state: int, routes: str):
    """The routes' scan inputs in route order, fp32 (fp64 stays fp64): u, delta (B, 4D, L), B, C (B, 4, N, L),
    plus the dt-rank rows (B, L, 4, R) and the route positions."""
    batch, height, width, dim = x.shape
    length = height * width
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rank = dt_weight.shape[2]
    positions = route_positions(height, width, routes, x.device)
    rows = x_dbl.to(dtype).reshape(batch, length, K, rank + 2 * d_state)
    rank_rows = rows[..., :rank]
    delta = torch.einsum("blkr,kdr->bkdl", rank_rows, dt_weight.to(dtype))  # raster order
    u = x.reshape(batch, length, dim).transpose(1, 2).to(dtype)  # exact for 16-bit x; keeps delta unrounded

    def in_route_order(per_route):
        return torch.stack([per_route(k)[..., positions[k]] for k in range(K)], 1)

    us = in_route_order(lambda k: u).reshape(batch, K * dim, length)
    deltas = in_route_order(lambda k: delta[:, k]).reshape(batch, K * dim, length)
    Bs = in_route_order(lambda k: rows[:, :, k, rank:rank + d_state].transpose(1, 2))
    Cs = in_route_order(lambda k: rows[:, :, k, rank + d_state:].transpose(1, 2))
    return us, deltas, Bs, Cs, rank_rows, positions


def scan_routes_reference(x: Tensor, x_dbl: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor, Ds: Tensor,
                          routes: str = "cross2d") -> Tensor:
    """The fused ops' contract in PyTorch for any d_state N, differentiable: x (B, H, W, D), x_dbl = project(x, W)
    (B, H, W, 4 * (R + 2N)); SS2D's parameters as stored (dt_weight (4, D, R), dt_bias (4, D), A_log (4D, N),
    Ds (4D,)); returns the merged y (B, H, W, D) in fp32 (fp64 for fp64 inputs)."""
    batch, height, width, dim = x.shape
    d_state = A_log.shape[1]
    us, deltas, Bs, Cs, _, positions = _route_inputs(x, x_dbl, dt_weight, d_state, routes)
    A = -torch.exp(A_log.to(us.dtype))
    ys = ops.selective_scan_fn(us, deltas, A, Bs, Cs, Ds.reshape(-1).to(us.dtype), dt_bias.reshape(-1).to(us.dtype),
                               delta_softplus=True, out_float=True, backend="torch")
    return _merge_routes(ys.view(batch, K, dim, -1), positions).view(batch, height, width, dim)


def _scan_routes_reference_backward(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, routes="cross2d"):
    """Gradients of scan_routes_reference written out (the backward op's kernel, which cannot re-enter autograd)."""
    batch, height, width, dim = x.shape
    length = height * width
    d_state = A_log.shape[1]
    us, deltas, Bs, Cs, rank_rows, positions = _route_inputs(x, x_dbl, dt_weight, d_state, routes)
    dtype = us.dtype
    rank = rank_rows.shape[-1]
    A = -torch.exp(A_log.to(dtype))
    dy_t = dy.to(dtype).reshape(batch, length, dim).transpose(1, 2)
    dys = torch.stack([dy_t[:, :, positions[k]] for k in range(K)], 1).reshape(batch, K * dim, length)
    du, ddelta, dA, dB, dC, dD, dbias = torch_scan.scan_backward(
        dys, us, deltas, A, Bs, Cs, Ds.reshape(-1).to(dtype), dt_bias.reshape(-1).to(dtype), True)
    dx = _merge_routes(du.view(batch, K, dim, length), positions)
    ddelta = ddelta.view(batch, K, dim, length)
    ddelta_raster = torch.empty_like(ddelta)
    d_rows = x_dbl.new_zeros((batch, length, K, rank + 2 * d_state), dtype=dtype)
    for k in range(K):
        ddelta_raster[:, k, :, positions[k]] = ddelta[:, k]
        d_rows[:, positions[k], k, rank:rank + d_state] = dB[:, k].transpose(1, 2)
        d_rows[:, positions[k], k, rank + d_state:] = dC[:, k].transpose(1, 2)
    d_rows[..., :rank] = torch.einsum("bkdl,kdr->blkr", ddelta_raster, dt_weight.to(dtype))
    ddt_weight = torch.einsum("bkdl,blkr->kdr", ddelta_raster, rank_rows)
    return (dx.to(x.dtype).view(x.shape), d_rows.view(x_dbl.shape).to(x_dbl.dtype), ddt_weight.to(dt_weight.dtype),
            dbias.view(dt_bias.shape).to(dt_bias.dtype), (dA * A).to(A_log.dtype), dD.view(Ds.shape).to(Ds.dtype))


# --------------------------------------------------------------------------------------- the fused ops


@torch.library.impl("selective_scan_ss2d::fwd", "CompositeExplicitAutograd")
def _fwd_reference(x, x_dbl, dt_weight, dt_bias, A_log, Ds):
    with torch.no_grad():
        return scan_routes_reference(x, x_dbl, dt_weight, dt_bias, A_log, Ds), x.new_empty(0, dtype=torch.float32)


@torch.library.impl("selective_scan_ss2d::bwd", "CompositeExplicitAutograd")
def _bwd_reference(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, ckpt):
    return _scan_routes_reference_backward(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds)


@torch.library.register_fake("selective_scan_ss2d::fwd")
def _fwd_fake(x, x_dbl, dt_weight, dt_bias, A_log, Ds):
    y = x.new_empty(x.shape, dtype=torch.float32)
    if not kernel_runs_on(x.device):
        return y, x.new_empty(0, dtype=torch.float32)
    return y, x.new_empty(checkpoint_shape(x.shape, dt_weight.shape[2], A_log.shape[1], x.device),
                          dtype=torch.float32)


@torch.library.register_fake("selective_scan_ss2d::bwd")
def _bwd_fake(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, ckpt):
    return (torch.empty_like(x), torch.empty_like(x_dbl), torch.empty_like(dt_weight), torch.empty_like(dt_bias),
            torch.empty_like(A_log), torch.empty_like(Ds))


# The forward and backward `scan_routes` can run: "op" the dispatcher ops (whatever kernel they have for the device),
# "triton" the Triton kernels called directly (where the ops' CUDA kernel is the extension's: tests, benchmarks).
_IMPLEMENTATIONS = {
    "op": (torch.ops.selective_scan_ss2d.fwd, torch.ops.selective_scan_ss2d.bwd),
    "triton": (triton_ss2d.forward, triton_ss2d.backward),
}


class _ScanRoutes(torch.autograd.Function):
    """The fused op pair with its autograd rule (ops.py says why an autograd.Function)."""

    @staticmethod
    def forward(ctx, x, x_dbl, dt_weight, dt_bias, A_log, Ds, impl):
        y, ckpt = _IMPLEMENTATIONS[impl][0](x, x_dbl, dt_weight, dt_bias, A_log, Ds)
        ctx.save_for_backward(x, x_dbl, dt_weight, dt_bias, A_log, Ds, ckpt)
        ctx.impl = impl
        return y

    @staticmethod
    def backward(ctx, dy):
        return tuple(_IMPLEMENTATIONS[ctx.impl][1](dy.float().contiguous(), *ctx.saved_tensors)) + (None,)


def scan_routes(x: Tensor, x_dbl: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor, Ds: Tensor,
                impl: str = "op") -> Tensor:
    """The fused ops, differentiable: x (B, H, W, D) contiguous, x_dbl = project(x, x_proj_weight), SS2D's
    dt_projs_weight (4, D, R), dt_projs_bias (4, D), A_logs (4D, N) and Ds (4D,) in fp32; returns the merged
    scan output y (B, H, W, D) in fp32. impl: "op" (the dispatcher ops) or "triton" (the Triton kernels directly:
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)."""
    if impl not in _IMPLEMENTATIONS:
        raise ValueError(f"scan_routes: `impl` must be one of {sorted(_IMPLEMENTATIONS)}, got {impl!r}")
    return _ScanRoutes.apply(x, x_dbl, dt_weight, dt_bias, A_log, Ds, impl)


def _fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _fused_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channel_first):
    x_last = x.permute(0, 2, 3, 1).contiguous()  # no copy for channels-last storage
    y = scan_routes(x_last, project(x_last, x_proj_weight), _fp32(dt_projs_weight).contiguous(),
                    _fp32(dt_projs_bias).contiguous(), _fp32(A_logs).contiguous(), _fp32(Ds).contiguous())
    return _as_output(y, channel_first)


# -------------------------------------------------------------------------------------------- unfused


def unfused_scan_inputs(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor,
                        A_logs: Tensor, Ds: Tensor, routes: str = "cross2d", fp32_scan_inputs: bool = False) -> dict:
    """The unfused core's selective-scan arguments (u, delta, A, B, C, D, delta_bias, delta_softplus) for x
    (B, D, H, W): the four routes as (B, 4D, L) copies, their projections as batched GEMMs over (B * 4)."""
    batch, dim, height, width = x.shape
    d_state, rank = A_logs.shape[1], dt_projs_weight.shape[2]
    xs = cross_scan(x, channel_first=True, routes=routes)  # (B, 4, D, L)
    # the expand makes fvcore count the batch dimension; xs is read in place (an einsum would permute a copy)
    x_dbl = torch.matmul(x_proj_weight.to(xs.dtype).expand(batch, -1, -1, -1), xs)  # (B, 4, R + 2N, L)
    dts, Bs, Cs = torch.split(x_dbl, [rank, d_state, d_state], dim=2)
    dts = torch.matmul(dt_projs_weight.to(xs.dtype).expand(batch, -1, -1, -1), dts)  # (B, 4, D, L)
    xs, dts = xs.view(batch, K * dim, height * width), dts.reshape(batch, K * dim, height * width)
    if fp32_scan_inputs:
        xs = xs.float()
    # the scan op takes delta, B and C in u's dtype (autocast may have run the GEMMs in another)
    return dict(u=xs, delta=dts.to(xs.dtype), A=-torch.exp(A_logs.float()), B=Bs.to(xs.dtype).contiguous(),
                C=Cs.to(xs.dtype).contiguous(), D=_fp32(Ds), delta_bias=_fp32(dt_projs_bias).reshape(-1),
                delta_softplus=True)


def _unfused_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, routes, channel_first,
                  fp32_scan_inputs):
    batch, dim, height, width = x.shape
    ys, _ = ops.scan(**unfused_scan_inputs(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, routes,
                                           fp32_scan_inputs), out_float=True)
    return cross_merge(ys.view(batch, K, dim, height, width), channel_first=channel_first, routes=routes)


def _reference_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, routes, channel_first):
    x_last = x.permute(0, 2, 3, 1).contiguous()
    y = scan_routes_reference(x_last, project(x_last, x_proj_weight), dt_projs_weight, dt_projs_bias, A_logs, Ds,
                              routes)
    return _as_output(y, channel_first)


# ----------------------------------------------------------------------------------- the dispatcher


def _check_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, routes, backend):
    """Raises a clear error naming the bad argument."""
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
    if routes not in ROUTE_SETS:
        raise ValueError(f"ss2d_core: unknown route set {routes!r}; valid: {sorted(ROUTE_SETS)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"ss2d_core: `backend` must be None or one of {BACKENDS}, got {backend!r}")


def fused_unsupported_reason(rank: int, d_state: int, routes: str = "cross2d", x: Optional[Tensor] = None
                             ) -> Optional[str]:
    """None when the fused ops take a call with these parameters (and, if given, this input), else why not.
    Without x the answer holds for every device (the CUDA kernels' limits); a CPU x takes any d_state and rank, a
    CUDA x with the Triton kernels registered d_state up to triton_ss2d.MAX_D_STATE."""
    if routes != "cross2d":
        return f"the fused kernels walk the cross2d routes, not {routes!r}"
    if x is not None and x.is_cuda and triton_is_cuda_kernel():
        if d_state > triton_ss2d.MAX_D_STATE:
            return f"d_state is {d_state}; the fused Triton kernels support at most {triton_ss2d.MAX_D_STATE}"
        if rank > triton_ss2d.MAX_RANK:
            return f"dt rank {rank} is above the fused Triton kernels' {triton_ss2d.MAX_RANK}"
    elif x is None or x.is_cuda:
        if d_state > MAX_D_STATE:
            return f"d_state is {d_state}; the fused CUDA kernels support at most {MAX_D_STATE}"
        if rank > MAX_RANK:
            return f"dt rank {rank} is above the fused CUDA kernels' {MAX_RANK}"
    if x is None:
        return None
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not one of {_DTYPES}"
    if x.is_cuda and not kernel_runs_on(x.device):
        return f"the fused CUDA kernels are not built ({ops.build_info()}) and triton is not installed"
    return None


def select_core(x: Tensor, rank: int, d_state: int, routes: str = "cross2d", backend: Optional[str] = None) -> str:
    """The implementation ss2d_core runs for this call: "fused", "unfused" or "reference" (the dispatch rule in the
    module docstring for backend None; `backend` itself otherwise, if it can take the call)."""
    if backend is None:
        if torch.jit.is_tracing() or not kernel_runs_on(x.device):
            return "unfused"
        return "unfused" if fused_unsupported_reason(rank, d_state, routes, x) else "fused"
    if backend == "fused":
        reason = fused_unsupported_reason(rank, d_state, routes, x)
        if reason is not None:
            raise RuntimeError(f"ss2d_core: backend='fused' requested but {reason}")
    return backend


def ss2d_core(x: Tensor, x_proj_weight: Tensor, dt_projs_weight: Tensor, dt_projs_bias: Tensor, A_logs: Tensor,
              Ds: Tensor, routes: str = "cross2d", channel_first: bool = True, fp32_scan_inputs: bool = False,
              backend: Optional[str] = None, check: bool = True) -> Tensor:
    """SS2D's core for x (B, D, H, W) after the depthwise conv and activation (channels-last storage avoids a copy)
    and SS2D's parameters as stored (x_proj_weight (4, R+2N, D), dt_projs_weight (4, D, R), dt_projs_bias (4, D),
    A_logs (4D, N), Ds (4D,)). Returns the merged scan output in fp32: (B, D, H, W) viewing channels-last storage
    if channel_first, else (B, H, W, D).

    routes: a cross_scan.ROUTE_SETS name. fp32_scan_inputs: the unfused path casts the scan's inputs to fp32
    (VMamba's v0 / v2 / v3 forward types) instead of keeping x's dtype; the fused path computes in fp32 anyway.
    backend: None (the dispatch rule in the module docstring), "fused" (raises if unsupported), "unfused" or
    "reference". check=False skips the argument checks (the SS2D module, whose parameters have these shapes by
    construction)."""
    if check:
        _check_args(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, routes, backend)
    core = select_core(x, dt_projs_weight.shape[2], A_logs.shape[1], routes, backend)
    if core == "fused":
        return _fused_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, channel_first)
    if core == "unfused":
        return _unfused_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, routes, channel_first,
                             fp32_scan_inputs)
    return _reference_core(x, x_proj_weight, dt_projs_weight, dt_projs_bias, A_logs, Ds, routes, channel_first)
