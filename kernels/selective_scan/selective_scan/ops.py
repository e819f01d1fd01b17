"""The selective scan as registered torch.library ops, its autograd rule, and the user-facing function.

`selective_scan::scan_fwd` / `selective_scan::scan_bwd` are real dispatcher ops (with fake kernels), so
torch.compile traces through them without a graph break, torch.jit.trace records them by name (the FLOP
counter keys on that name), and autocast leaves their inputs alone. Each op runs either the CUDA
extension or the torch path in torch_scan.py, chosen by its `use_cuda_kernel` argument.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from . import torch_scan

try:
    _C = importlib.import_module(f"{__package__}._C")  # the compiled CUDA extension
    _EXTENSION_ERROR = None
except ImportError as error:  # built without CUDA, or not built at all
    _C = None
    _EXTENSION_ERROR = str(error)

# The CUDA kernel processes L in tiles of this many steps and saves the state at the start of each tile
# for its backward pass; it must match SCAN_TILE in csrc/scan_common.cuh.
CUDA_TILE = 256
CUDA_MAX_D_STATE = 16
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def extension_built() -> bool:
    """True when the compiled CUDA extension imports (with or without a GPU visible)."""
    return _C is not None


def cuda_available() -> bool:
    """True when the CUDA extension is built and a GPU is visible."""
    return _C is not None and torch.cuda.is_available()


def dispatcher_ops_loaded(namespace: str) -> bool:
    """True when the extension has registered the dispatcher ops ``namespace::fwd`` / ``::bwd`` (it does so when
    it is imported, above)."""
    try:
        return _C is not None and hasattr(getattr(torch.ops, namespace), "fwd")
    except RuntimeError:
        return False


def build_info() -> str:
    """One line saying what this installation can run."""
    if _C is not None:
        return _C.build_info()
    return f"torch path only: CUDA extension not importable ({_EXTENSION_ERROR})"


def scan_flops(batch: int, length: int, channels: int, d_state: int, with_D: bool = True) -> int:
    """FLOPs of one scan call by the rule VMamba reports (mamba issue #110)."""
    flops = 9 * batch * length * channels * d_state
    if with_D:
        flops += batch * channels * length
    return flops


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _empty() -> Tensor:
    return torch.empty(0)


# ----------------------------------------------------------------------------------------------- forward


@torch.library.custom_op("selective_scan::scan_fwd", mutates_args=())
def scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             delta_bias: Optional[Tensor], delta_softplus: bool, out_float: bool,
             use_cuda_kernel: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, last_state, checkpoints); checkpoints are the CUDA kernel's saved tile-start states
    (empty for the torch path)."""
    if use_cuda_kernel:
        if u.numel() == 0:
            y, last_state = torch_scan.scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float)
            return y, last_state, u.new_zeros(_checkpoint_shape(u, A), dtype=torch.float32)
        return tuple(_C.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float))
    y, last_state = torch_scan.scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float)
    return y, last_state, u.new_empty(0, dtype=torch.float32)


def _checkpoint_shape(u, A):
    batch, channels, length = u.shape
    return (batch, channels, -(-length // CUDA_TILE), A.shape[1])


def _fake_checkpoints(u, A, use_cuda_kernel):
    if use_cuda_kernel:
        return u.new_empty(_checkpoint_shape(u, A), dtype=torch.float32)
    return u.new_empty(0, dtype=torch.float32)


@scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float, use_cuda_kernel):
    compute = _compute_dtype(u, delta, A, B, C)
    out_dtype = compute if out_float or u.dtype == torch.float64 else u.dtype
    batch, channels, length = u.shape
    y = u.new_empty((batch, channels, length), dtype=out_dtype)
    last_state = u.new_empty((batch, channels, A.shape[1]), dtype=compute)
    return y, last_state, _fake_checkpoints(u, A, use_cuda_kernel)


# ---------------------------------------------------------------------------------------------- backward


@torch.library.custom_op("selective_scan::scan_bwd", mutates_args=())
def scan_bwd(dy: Tensor, dlast_state: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor,
             C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor], checkpoints: Tensor,
             delta_softplus: bool, use_cuda_kernel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                  Tensor, Tensor]:
    """Returns (du, ddelta, dA, dB, dC, dD, ddelta_bias); dD / ddelta_bias are empty when D / delta_bias
    are None."""
    if use_cuda_kernel and u.numel() > 0:
        return tuple(_C.bwd(dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints, delta_softplus))
    grads = torch_scan.scan_backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, dlast_state)
    return tuple(_empty().to(u.device) if g is None else g for g in grads)


@scan_bwd.register_fake
def _scan_bwd_fake(dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints, delta_softplus,
                   use_cuda_kernel):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), u.new_empty(0) if D is None else torch.empty_like(D),
            u.new_empty(0) if delta_bias is None else torch.empty_like(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, out_float, use_cuda_kernel = inputs
    _, _, checkpoints = output
    ctx.mark_non_differentiable(checkpoints)
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, checkpoints)
    ctx.delta_softplus = delta_softplus
    ctx.use_cuda_kernel = use_cuda_kernel


def _backward(ctx, dy, dlast_state, _dcheckpoints):
    u, delta, A, B, C, D, delta_bias, checkpoints = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, ddelta_bias = scan_bwd(
        dy.contiguous(), None if dlast_state is None else dlast_state.contiguous(), u, delta, A, B, C, D,
        delta_bias, checkpoints, ctx.delta_softplus, ctx.use_cuda_kernel)
    return (du, ddelta, dA, dB, dC, None if D is None else dD, None if delta_bias is None else ddelta_bias,
            None, None, None)


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- user-facing entry


def _check_tensor(name: str, t, ndim: int, device: torch.device):
    if not isinstance(t, Tensor):
        raise TypeError(f"selective_scan: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"selective_scan: `{name}` must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"selective_scan: `{name}` is on {t.device} but `u` is on {device}")
    if t.dtype not in _INPUT_DTYPES:
        raise TypeError(f"selective_scan: `{name}` has unsupported dtype {t.dtype}")


def _resolve_backend(backend: Optional[str], u: Tensor) -> bool:
    """Returns use_cuda_kernel for the requested backend."""
    if backend is None:
        return u.is_cuda and cuda_available()
    if backend == "torch":
        return False
    if backend == "cuda":
        if not cuda_available():
            raise RuntimeError(f"selective_scan: backend='cuda' requested but it is unavailable ({build_info()}"
                               f"{'' if torch.cuda.is_available() else '; no GPU visible'})")
        if not u.is_cuda:
            raise ValueError(f"selective_scan: backend='cuda' needs CUDA tensors, `u` is on {u.device}")
        return True
    raise ValueError(f"selective_scan: `backend` must be None, 'cuda' or 'torch', got {backend!r}")


def _validate(u, delta, A, B, C, D, delta_bias, backend) -> bool:
    """Raises a clear error naming the bad argument; returns use_cuda_kernel."""
    _check_tensor("u", u, 3, u.device if isinstance(u, Tensor) else None)
    device = u.device
    batch, channels, length = u.shape
    _check_tensor("delta", delta, 3, device)
    _check_tensor("A", A, 2, device)
    _check_tensor("B", B, 4, device)
    _check_tensor("C", C, 4, device)
    rows = delta.shape[1]
    if delta.shape[0] != batch or delta.shape[2] != length:
        raise ValueError(f"selective_scan: `delta` shape {tuple(delta.shape)} does not match `u` {tuple(u.shape)}")
    if rows == 0 or channels % rows != 0:
        raise ValueError(f"selective_scan: `delta` has {rows} rows; K*D = {channels} must be a multiple of it")
    if A.shape[0] != channels or A.shape[1] < 1:
        raise ValueError(f"selective_scan: `A` must be (K*D={channels}, N >= 1), got {tuple(A.shape)}")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape[0] != batch or t.shape[2] != n_state or t.shape[3] != length:
            raise ValueError(f"selective_scan: `{name}` must be (batch={batch}, G, N={n_state}, L={length}), "
                             f"got {tuple(t.shape)}")
    groups = B.shape[1]
    if C.shape[1] != groups:
        raise ValueError(f"selective_scan: `B` has {groups} groups but `C` has {C.shape[1]}")
    if groups == 0 or channels % groups != 0:
        raise ValueError(f"selective_scan: `B`/`C` have {groups} groups; K*D = {channels} must be a multiple")
    if D is not None:
        _check_tensor("D", D, 1, device)
        if D.shape[0] != channels:
            raise ValueError(f"selective_scan: `D` must be ({channels},), got {tuple(D.shape)}")
    if delta_bias is not None:
        _check_tensor("delta_bias", delta_bias, 1, device)
        if delta_bias.shape[0] not in (channels, rows):
            raise ValueError(f"selective_scan: `delta_bias` must have {channels} (or {rows}) entries, "
                             f"got {tuple(delta_bias.shape)}")
    use_cuda_kernel = _resolve_backend(backend, u)
    if use_cuda_kernel:
        if u.dtype == torch.float64:
            raise TypeError("selective_scan: the CUDA kernel takes float32/float16/bfloat16 `u`, not float64")
        if n_state > CUDA_MAX_D_STATE:
            raise ValueError(f"selective_scan: `A` has N = {n_state} states; the CUDA kernel supports at most "
                             f"{CUDA_MAX_D_STATE} (use backend='torch')")

    return use_cuda_kernel


def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, out_float=True,
                      return_last_state=False, backend=None):
    """Selective scan (S6), SPEC section 1.

    u (batch, K*D, L); delta (batch, K*D, L) or (batch, Dd, L) with K*D % Dd == 0; A (K*D, N);
    B, C (batch, G, N, L) with K*D % G == 0; D (K*D,) or None; delta_bias (K*D,) or (Dd,) or None.
    delta, B and C are used in u's dtype; A, D, delta_bias in float32 (float64 when u is float64).
    Returns y (batch, K*D, L), float32 if out_float else u's dtype, or (y, last_state (batch, K*D, N)).
    backend: None (CUDA kernel for CUDA tensors when built, else torch), "cuda" or "torch".
    """
    if torch.jit.is_tracing():
        # Under torch.jit.trace (fvcore's FLOP count) shapes are traced values: checking them would only
        # emit TracerWarnings, and the same call has been validated when run for real.
        use_cuda_kernel = u.is_cuda and cuda_available() if backend is None else backend == "cuda"
    else:
        use_cuda_kernel = _validate(u, delta, A, B, C, D, delta_bias, backend)
    param_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    y, last_state, _ = torch.ops.selective_scan.scan_fwd(
        u.contiguous(), delta.to(u.dtype).contiguous(), A.to(param_dtype).contiguous(),
        B.to(u.dtype).contiguous(), C.to(u.dtype).contiguous(),
        None if D is None else D.to(param_dtype).contiguous(),
        None if delta_bias is None else delta_bias.to(param_dtype).contiguous(),
        bool(delta_softplus), bool(out_float), use_cuda_kernel)
    return (y, last_state) if return_last_state else y
