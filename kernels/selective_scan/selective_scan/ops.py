"""The selective scan (S6) as dispatcher ops, its autograd rule and the user-facing `selective_scan_fn`.

How this package registers its operators (the scan here, the fused SS2D core in ss2d.py, the LayerNorm in
layer_norm.py), one way for all of them:

* each op family is a pair of dispatcher ops `<namespace>::fwd` / `::bwd` with a schema. The compiled extension
  defines them in C++ (TORCH_LIBRARY, csrc/ops.cpp) and registers its kernels per device: the CPU kernels
  (csrc/cpu/, always part of the extension) and the CUDA kernels (when it is built with CUDA). Without the
  extension `define_ops` defines the same schemas here. The PyTorch implementation is registered as the
  CompositeExplicitAutograd kernel, so it runs wherever no compiled kernel is registered for the device (every
  device when the extension is not built; a GPU when it is built without CUDA). (The LayerNorm's ops have CUDA
  kernels only: elsewhere `layer_norm` is F.layer_norm, which needs no op.)
* each op has a fake kernel, so torch.compile / torch.export see one opaque op with known output shapes (no graph
  break, nothing traced inside), and AOTInductor can call the C++ registration;
* a `torch.autograd.Function` calls the fwd op and, in its backward, the bwd op.

The scan and the fused SS2D core have a third implementation, Triton kernels (triton_scan.py, triton_ss2d.py).
Where the extension has no CUDA kernels (built without a CUDA toolkit, or not built at all) and triton is installed,
they are registered as the ops' CUDA kernels when the package is imported, so CUDA tensors take them by default and
torch.compile still sees the one op: for CUDA tensors the order is the extension, then Triton, then PyTorch.
`backend="triton"` runs them explicitly (tests, benchmarks). Setting SELECTIVE_SCAN_NO_EXTENSION=1 imports the
package as where the extension is not built (to compare the backends on one machine).

Why not `torch.library.custom_op`: it gives the same compiled graphs, but its Python wrappers (argument
normalisation, autograd and autocast layers written in Python) cost the host about twice as much per call:
forward + backward of an op pair 56-65 us against 31-44 us, a forward without grad 13 us against 7-9 us
(`python benchmarks/op_registration_cost.py`, 1-element CPU tensors, so host time alone; two runs on a 2-core
x86 machine). A VMamba block calls several op pairs, and at small batch the host is the limit.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import torch_scan, triton_scan

_C = None
if os.environ.get("SELECTIVE_SCAN_NO_EXTENSION", "0") not in ("", "0"):
    _EXTENSION_ERROR = "SELECTIVE_SCAN_NO_EXTENSION is set"
else:
    try:
        _C = importlib.import_module(f"{__package__}._C")  # the compiled extension (registers its kernels)
        _EXTENSION_ERROR = None
    except ImportError as error:  # not built (no C++ compiler at install time)
        _EXTENSION_ERROR = str(error)
_HAS_CUDA = _C is not None and _C.has_cuda()

# The CUDA kernel processes L in tiles of this many steps and saves the state at the start of each tile
# for its backward pass; it must match SCAN_TILE in csrc/scan_common.cuh.
CUDA_TILE = 256
CUDA_MAX_D_STATE = 16
# The CPU kernel saves the state entering each chunk of this many steps (kChunk in csrc/cpu/scan_cpu.cpp).
CPU_CHUNK = 64
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def extension_built() -> bool:
    """True when the extension is built with its CUDA kernels (with or without a GPU visible)."""
    return _HAS_CUDA


def cuda_available() -> bool:
    """True when the CUDA kernels are built and a GPU is visible."""
    return _HAS_CUDA and torch.cuda.is_available()


def cpu_kernels_built() -> bool:
    """True when the extension imports; it always has its CPU kernels."""
    return _C is not None


def compiled_kernels_for(device: torch.device) -> bool:
    """Whether the extension registers kernels for `device`'s type (its op families all cover the same devices,
    except the CUDA-only LayerNorm)."""
    return (device.type == "cpu" and _C is not None) or (device.type == "cuda" and _HAS_CUDA)


def dispatcher_ops_loaded(namespace: str) -> bool:
    """True when the extension has defined the dispatcher ops ``namespace::fwd`` / ``::bwd`` (it does so when it
    is imported, above)."""
    try:
        return _C is not None and hasattr(getattr(torch.ops, namespace), "fwd")
    except RuntimeError:
        return False


_PYTHON_LIBRARIES = []  # the libraries defined here must stay alive


def define_ops(namespace: str, schemas: Sequence[str]) -> None:
    """Defines ``namespace``'s ops from their schemas unless the extension already has (it defines them in C++
    and registers its kernels)."""
    if dispatcher_ops_loaded(namespace):
        return
    library = torch.library.Library(namespace, "DEF")
    for schema in schemas:
        library.define(schema)
    _PYTHON_LIBRARIES.append(library)


def impl_triton_cuda(namespace: str, forward, backward) -> None:
    """Registers Triton `forward` / `backward` as the CUDA kernels of ``namespace::fwd`` / ``::bwd``; each op family
    with Triton kernels calls it at import where TRITON_FOR_CUDA (below)."""
    library = torch.library.Library(namespace, "IMPL")
    library.impl("fwd", forward, "CUDA")
    library.impl("bwd", backward, "CUDA")
    _PYTHON_LIBRARIES.append(library)


def build_info() -> str:
    """One line saying what this installation can run."""
    if _C is not None:
        return _C.build_info()
    return f"extension not importable ({_EXTENSION_ERROR})"


def scan_flops(batch: int, length: int, channels: int, d_state: int, with_D: bool = True) -> int:
    """FLOPs of one scan call by the rule VMamba reports (mamba issue #110)."""
    flops = 9 * batch * length * channels * d_state
    if with_D:
        flops += batch * channels * length
    return flops


# ----------------------------------------------------------------------------------------------- the ops

define_ops("selective_scan", [
    "fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, bool delta_softplus, "
    "bool out_float) -> (Tensor, Tensor, Tensor)",
    "bwd(Tensor dy, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? delta_bias, Tensor checkpoints, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor)",
])


# Whether the Triton kernels are the CUDA kernels of every op family that has them (the scan here, the fused SS2D
# core in ss2d.py): where the extension has no CUDA kernels and triton is installed.
TRITON_FOR_CUDA = not _HAS_CUDA and triton_scan.available()
if TRITON_FOR_CUDA:
    impl_triton_cuda("selective_scan", triton_scan.forward, triton_scan.backward)


def triton_is_cuda_kernel() -> bool:
    """Whether the ops' CUDA kernels are the Triton ones (TRITON_FOR_CUDA)."""
    return TRITON_FOR_CUDA


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the ops (the scan's and the fused SS2D core's alike) run a kernel, not their PyTorch implementation,
    for tensors on `device`: the extension's, or on CUDA the Triton one."""
    return compiled_kernels_for(device) or (device.type == "cuda" and TRITON_FOR_CUDA)


def kernel_backend(device_type: str) -> str:
    """Which kernels the ops run for tensors of a device type ("cuda", "cpu"): "extension", "triton" (CUDA tensors
    where the extension has no CUDA kernels) or "torch" (the PyTorch implementation)."""
    device = torch.device(device_type)
    if compiled_kernels_for(device):
        return "extension"
    return "triton" if kernel_runs_on(device) else "torch"


def kernels_summary() -> str:
    """One line: the kernels CUDA and CPU tensors run, and the extension's build."""
    return (f"selective_scan kernels: CUDA tensors {kernel_backend('cuda')}, CPU tensors {kernel_backend('cpu')} "
            f"({build_info()})")


def checkpoint_steps(device: torch.device) -> int:
    """Steps between the states the kernel's forward saves for its backward (0: it saves none)."""
    if not kernel_runs_on(device):
        return 0
    if device.type == "cpu":
        return CPU_CHUNK
    return triton_scan.CHUNK if triton_is_cuda_kernel() else CUDA_TILE


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fwd_torch(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float):
    """(y, last_state, checkpoints); the PyTorch implementation saves no checkpoints (an empty tensor)."""
    y, last_state = torch_scan.scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float)
    return y, last_state, u.new_empty(0, dtype=torch.float32)


def _bwd_torch(dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints, delta_softplus):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias); dD / ddelta_bias are empty when D / delta_bias are None."""
    grads = torch_scan.scan_backward(dy, u, delta, A, B, C, D, delta_bias, delta_softplus, dlast_state)
    return tuple(u.new_empty(0) if g is None else g for g in grads)


# registered by call: the decorator form returns None, and _SelectiveScan calls these functions directly too
torch.library.impl("selective_scan::fwd", "CompositeExplicitAutograd", _fwd_torch)
torch.library.impl("selective_scan::bwd", "CompositeExplicitAutograd", _bwd_torch)


@torch.library.register_fake("selective_scan::fwd")
def _fwd_fake(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float):
    compute = _compute_dtype(u, delta, A, B, C)
    out_dtype = compute if out_float or u.dtype == torch.float64 else u.dtype
    batch, channels, length = u.shape
    y = u.new_empty((batch, channels, length), dtype=out_dtype)
    last_state = u.new_empty((batch, channels, A.shape[1]), dtype=compute)
    steps = checkpoint_steps(u.device)
    if steps:
        checkpoints = u.new_empty((batch, channels, -(-length // steps), A.shape[1]), dtype=torch.float32)
    else:
        checkpoints = u.new_empty(0, dtype=torch.float32)
    return y, last_state, checkpoints


@torch.library.register_fake("selective_scan::bwd")
def _bwd_fake(dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints, delta_softplus):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(C), u.new_empty(0) if D is None else torch.empty_like(D),
            u.new_empty(0) if delta_bias is None else torch.empty_like(delta_bias))


# The forward and backward of each implementation `scan` can run: "op" the dispatcher ops (whatever kernel they have
# for the device), "torch" the PyTorch implementation and "triton" the Triton kernels, called directly.
_IMPLEMENTATIONS = {
    "op": (torch.ops.selective_scan.fwd, torch.ops.selective_scan.bwd),
    "torch": (_fwd_torch, _bwd_torch),
    "triton": (triton_scan.forward, triton_scan.backward),
}


class _SelectiveScan(torch.autograd.Function):
    """The op pair with its autograd rule; `impl` names the implementation (see _IMPLEMENTATIONS): "torch" runs the
    PyTorch implementation where the op would run a kernel, "triton" the Triton kernels where the op does not."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, out_float, impl):
        fwd = _IMPLEMENTATIONS[impl][0]
        y, last_state, checkpoints = fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, checkpoints)
        ctx.delta_softplus = delta_softplus
        ctx.impl = impl
        ctx.set_materialize_grads(False)
        return y, last_state

    @staticmethod
    def backward(ctx, dy, dlast_state):
        u, delta, A, B, C, D, delta_bias, checkpoints = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u, dtype=torch.float32)
        bwd = _IMPLEMENTATIONS[ctx.impl][1]
        du, ddelta, dA, dB, dC, dD, ddelta_bias = bwd(
            dy.contiguous(), None if dlast_state is None else dlast_state.contiguous(), u, delta, A, B, C, D,
            delta_bias, checkpoints, ctx.delta_softplus)
        return (du, ddelta, dA, dB, dC, None if D is None else dD, None if delta_bias is None else ddelta_bias,
                None, None, None)


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
         delta_softplus: bool, out_float: bool, impl: str = "op"):
    """The scan without argument checks or casts, for callers whose tensors already have the op's dtypes and
    layouts (`selective_scan_fn` below, SS2D's unfused core): returns (y, last_state). `impl`: "op", "torch" or
    "triton" (see _IMPLEMENTATIONS). float64 always runs the PyTorch implementation (the kernels compute in fp32)."""
    if u.dtype not in _KERNEL_DTYPES:
        impl = "torch"
    if torch.jit.is_tracing() and impl == "op":
        # jit.trace (fvcore's FLOP count) records an autograd.Function as one opaque node: trace the op itself
        y, last_state, _ = torch.ops.selective_scan.fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float)
        return y, last_state
    return _SelectiveScan.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float, impl)


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


def _resolve_backend(backend: Optional[str], u: Tensor, n_state: int) -> str:
    """The implementation `scan` runs for the requested backend (the op wherever it runs what was asked for)."""
    if backend is None:
        return "op"
    if backend == "torch":
        return "torch" if kernel_runs_on(u.device) else "op"
    if backend == "triton":
        triton_scan.check_supported(u, n_state, "selective_scan: `backend`='triton'")
        return "op" if u.is_cuda and triton_is_cuda_kernel() else "triton"
    if backend not in ("cuda", "cpu"):
        raise ValueError(f"selective_scan: `backend` must be None, 'cuda', 'cpu', 'triton' or 'torch', got {backend!r}")
    if not (cuda_available() if backend == "cuda" else cpu_kernels_built()):
        no_gpu = backend == "cuda" and not torch.cuda.is_available()
        raise RuntimeError(f"selective_scan: backend={backend!r} requested but it is unavailable ({build_info()}"
                           f"{'; no GPU visible' if no_gpu else ''})")
    if u.device.type != backend:
        raise ValueError(f"selective_scan: backend={backend!r} needs {backend.upper()} tensors, `u` is on {u.device}")
    if u.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"selective_scan: the {backend.upper()} kernel takes float32/float16/bfloat16 `u`, not "
                        f"{u.dtype} (use backend='torch')")
    return "op"


def _validate(u, delta, A, B, C, D, delta_bias, backend) -> str:
    """Raises a clear error naming the bad argument; returns the implementation `scan` runs."""
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
    impl = _resolve_backend(backend, u, n_state)
    if impl == "op" and u.dtype in _KERNEL_DTYPES and device.type == "cuda" and kernel_runs_on(device) \
            and n_state > CUDA_MAX_D_STATE:
        kernel = "Triton" if triton_is_cuda_kernel() else "CUDA"
        raise ValueError(f"selective_scan: `A` has N = {n_state} states; the {kernel} kernel supports at most "
                         f"{CUDA_MAX_D_STATE} (use backend='torch')")
    return impl


def selective_scan_fn(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, out_float=True,
                      return_last_state=False, backend=None):
    """Selective scan (S6) as in Mamba (Gu and Dao, arXiv 2312.00752, Algorithm 2) with VMamba's shapes.

    u (batch, K*D, L); delta (batch, K*D, L) or (batch, Dd, L) with K*D % Dd == 0; A (K*D, N);
    B, C (batch, G, N, L) with K*D % G == 0; D (K*D,) or None; delta_bias (K*D,) or (Dd,) or None.
    delta, B and C are used in u's dtype; A, D, delta_bias in float32 (float64 when u is float64).
    Returns y (batch, K*D, L), float32 if out_float else u's dtype, or (y, last_state (batch, K*D, N)).
    backend: None (the compiled kernel for u's device where the extension has one: the CPU kernel whenever it is
    built, the CUDA kernel when built with CUDA; the PyTorch implementation otherwise and for float64), "cuda" or
    "cpu" (that kernel, or an error), "triton" (the Triton kernels: CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1; N up to 16), "torch" (the PyTorch implementation).
    """
    if torch.jit.is_tracing():
        # Under torch.jit.trace (fvcore's FLOP count) shapes are traced values: checking them would only
        # emit TracerWarnings, and the same call has been validated when run for real.
        impl = "op"
    else:
        impl = _validate(u, delta, A, B, C, D, delta_bias, backend)
    param_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    y, last_state = scan(
        u.contiguous(), delta.to(u.dtype).contiguous(), A.to(param_dtype).contiguous(),
        B.to(u.dtype).contiguous(), C.to(u.dtype).contiguous(),
        None if D is None else D.to(param_dtype).contiguous(),
        None if delta_bias is None else delta_bias.to(param_dtype).contiguous(),
        bool(delta_softplus), bool(out_float), impl)
    return (y, last_state) if return_last_state else y
