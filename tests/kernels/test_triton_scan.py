"""The Triton selective scan (selective_scan/triton_scan.py): forward and every gradient for each option of the op
against the float64 PyTorch path at the scan's tolerances (those of test_selective_scan_cuda.py, from mamba's
reference test). Here the Triton interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1, in a subprocess:
the variable must be set before triton is imported); the tests marked cuda compile them for a GPU and compare them
with the CUDA extension at VMamba-T's stage shapes."""

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import selective_scan
from selective_scan import ops, selective_scan_fn, triton_scan
from test_selective_scan_cuda import TOLERANCES, WEIGHT_TOLERANCE, check, check_sum, per_channel_magnitude

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Small cases that together take every option of the op: N from 1 to 16 (3: padded states), B/C groups split over
# channel blocks (N 16), padded (3 channels a group) or of one channel, delta groups (one spanning two programs) with
# a per-row or per-channel dt bias, sequences of one chunk, of chunks with a partial last one and of exact chunks,
# fp32 / fp16 / bf16 in, fp32 or input-dtype out, with and without D, softplus and a last-state gradient. "extreme"
# draws the dt pre-activation from [-30, 30] (softplus of tiny values and past its threshold) with A down to -16
# (decays that underflow to 0).
CASES = {
    "fp32-N1-chunks": dict(batch=2, channels=4, length=150, d_state=1, groups=2, rows=None, bias="channel",
                           with_D=True, softplus=True, dtype=F32, out_float=True, last_state=True),
    "fp16-N3-delta-groups": dict(batch=1, channels=6, length=9, d_state=3, groups=2, rows=3, bias="row",
                                 with_D=True, softplus=True, dtype=F16, out_float=False, last_state=True),
    "bf16-N16-split-group": dict(batch=1, channels=4, length=5, d_state=16, groups=1, rows=None, bias=None,
                                 with_D=False, softplus=False, dtype=BF16, out_float=True, last_state=False),
    "fp32-N2-exact-chunks": dict(batch=1, channels=2, length=2 * triton_scan.CHUNK, d_state=2, groups=2, rows=1,
                                 bias="channel", with_D=False, softplus=True, dtype=F32, out_float=True,
                                 last_state=True),
    "bf16-N1-bf16-out": dict(batch=2, channels=8, length=20, d_state=1, groups=4, rows=None, bias="channel",
                             with_D=True, softplus=True, dtype=BF16, out_float=False, last_state=False),
    "fp32-N4-extreme": dict(batch=1, channels=4, length=70, d_state=4, groups=2, rows=None, bias="channel",
                            with_D=True, softplus=True, dtype=F32, out_float=True, last_state=True, extreme=True),
}
# VMamba-T's scans at 224 px (K*D, L) per stage: N 1, 4 B/C groups, D, dt bias and softplus, as SS2D calls them.
STAGES = [(384, 3136), (768, 784), (1536, 196), (3072, 49)]


def make_inputs(case, device, seed):
    """Inputs as in mamba's selective-scan reference test (A = -0.5 rand, delta = 0.5 rand, bias = 0.5 rand, rest
    randn) in the case's dtype (A, D and the bias fp32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    channels, length, d_state, dtype = case["channels"], case["length"], case["d_state"], case["dtype"]
    rows, groups, batch = case["rows"] or channels, case["groups"], case["batch"]

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    inputs = dict(u=randn(batch, channels, length).to(dtype), delta=(0.5 * rand(batch, rows, length)).to(dtype),
                  A=-0.5 * rand(channels, d_state), B=randn(batch, groups, d_state, length).to(dtype),
                  C=randn(batch, groups, d_state, length).to(dtype), D=randn(channels) if case["with_D"] else None,
                  delta_bias={"channel": lambda: 0.5 * rand(channels), "row": lambda: 0.5 * rand(rows),
                              None: lambda: None}[case["bias"]]())
    if case.get("extreme"):
        inputs["delta"] = (60 * rand(batch, rows, length) - 30).to(dtype)
        inputs["A"] = -torch.linspace(1, 16, channels * d_state, device=device).view(channels, d_state)
    return inputs


def run_with_grads(inputs, case, backend, seed, weight_dtype=None):
    """y, last state (or None) and the gradients of a random weighting of both, by input name."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = selective_scan_fn(**leaves, delta_softplus=case["softplus"], out_float=case["out_float"],
                            return_last_state=case["last_state"], backend=backend)
    y, last = out if case["last_state"] else (out, None)
    g = torch.Generator(device=y.device).manual_seed(seed + 1)
    # dy reaches the kernel in y's dtype: weights representable in it give the float64 reference the same dy
    weights = torch.randn(y.shape, generator=g, device=y.device).to(weight_dtype or y.dtype).to(y.dtype)
    loss = (y * weights).float().sum()
    if last is not None:
        loss = loss + (last * torch.randn(last.shape, generator=g, device=y.device)).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return y.detach(), None if last is None else last.detach(), dict(zip(names, grads))


def check_against_float64(inputs, case, seed, magnitudes=None):
    """The Triton kernels against the PyTorch path in float64 from the same (rounded) inputs, with
    test_selective_scan_cuda's rules: y at the fp32 tolerance when it is fp32, du 2x, ddelta 5x / 10x, the parameter
    sums relative to their size, dB / dC relative to `magnitudes` (per_channel_magnitude) where given."""
    y, last, grads = run_with_grads(inputs, case, "triton", seed)
    upcast = {k: None if v is None else v.double() for k, v in inputs.items()}
    weight_dtype = F32 if case["out_float"] else case["dtype"]
    y_ref, last_ref, grads_ref = run_with_grads(upcast, dict(case, out_float=True), "torch", seed, weight_dtype)
    assert y.dtype == (F32 if case["out_float"] else case["dtype"])
    rtol, atol = TOLERANCES[case["dtype"]]
    check("y", y, y_ref, *(TOLERANCES[F32] if case["out_float"] else (rtol, atol)))
    if last is not None:
        check("last_state", last, last_ref, *TOLERANCES[F32])
    for name, got in grads.items():
        want = grads_ref[name]
        assert got.dtype == inputs[name].dtype, f"d{name}: dtype {got.dtype}"
        if name == "u":
            check("du", got, want, 2 * rtol, 2 * atol)
        elif name == "delta":
            check("ddelta", got, want, 5 * rtol, 10 * atol)
        elif name in (magnitudes or {}):
            check_sum(f"d{name}", got, want, torch.maximum(magnitudes[name], want.abs()), rtol, atol)
        elif name in ("B", "C"):
            check(f"d{name}", got, want, rtol, atol)
        else:  # sums over batch * L terms: compare relative to their size
            scale = max(1.0, want.abs().max().item())
            check(f"d{name}", got, want, max(WEIGHT_TOLERANCE[0], rtol), max(WEIGHT_TOLERANCE[1], atol) * scale)
    return y, last, grads


def seed_of(name):
    return zlib.crc32(name.encode()) % 10_000


def check_cases(device):
    for name, case in CASES.items():
        check_against_float64(make_inputs(case, device, seed_of(name)), case, seed_of(name))
        print("checked", name)


def check_errors_and_empty_inputs():
    """Under the interpreter: unsupported requests raise errors naming the problem; empty inputs give empty
    outputs and zero gradients."""
    case = CASES["fp32-N1-chunks"]
    inputs = make_inputs(case, "cpu", 0)
    wide = make_inputs(dict(case, d_state=17), "cpu", 0)
    try:
        selective_scan_fn(**wide, backend="triton")
    except ValueError as error:
        assert "at most 16" in str(error), error
    else:
        raise AssertionError("N = 17 was accepted")
    try:
        selective_scan_fn(**{k: None if v is None else v.double() for k, v in inputs.items()}, backend="triton")
    except TypeError as error:
        assert "float64" in str(error), error
    else:
        raise AssertionError("float64 was accepted")
    for batch, length in ((0, 10), (2, 0)):
        empty = make_inputs(dict(case, batch=batch, length=length), "cpu", 0)
        leaves = {k: v.requires_grad_() for k, v in empty.items()}
        y, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend="triton")
        assert y.shape == (batch, 4, length) and last.shape == (batch, 4, 1)
        assert not last.any()
        (y.sum() + last.sum()).backward()
        assert all(v.grad is not None and not v.grad.any() for v in leaves.values())
    print("errors and empty inputs checked")


def test_interpreted_kernels_match_float64_reference(triton_interpreted_call):
    out = triton_interpreted_call('check_cases("cpu")')
    assert out.split("\n")[:-1] == [f"checked {name}" for name in CASES]


def test_interpreted_errors_and_empty_inputs(triton_interpreted_call):
    assert "errors and empty inputs checked" in triton_interpreted_call("check_errors_and_empty_inputs()")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(CASES["fp32-N1-chunks"], "cpu", 0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        selective_scan_fn(**inputs, backend="triton")


def test_the_extensions_cuda_kernels_stay_the_ops_kernels():
    if not ops.extension_built():
        pytest.skip(f"the extension has no CUDA kernels ({selective_scan.build_info()})")
    assert not ops.TRITON_FOR_CUDA and not ops.triton_is_cuda_kernel()
    assert ops.kernel_backend("cuda") == ops.kernel_backend("cpu") == "extension"


WITHOUT_EXTENSION = textwrap.dedent("""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from selective_scan import ops, triton_scan

    def has_cuda_kernel(op):
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"selective_scan::{op}", "CUDA")

    cuda = torch.device("cuda")
    assert not ops.extension_built() and ops.triton_is_cuda_kernel()  # registered at import
    assert has_cuda_kernel("fwd") and has_cuda_kernel("bwd") and ops.kernel_runs_on(cuda)
    assert (ops.kernel_backend("cuda"), ops.kernel_backend("cpu")) == ("triton", "torch")
    assert "CUDA tensors triton, CPU tensors torch" in ops.kernels_summary()
    assert ops.checkpoint_steps(cuda) == triton_scan.CHUNK
    with FakeTensorMode():  # what torch.compile sees: the Triton forward's outputs
        u = torch.empty(2, 4, 150, device="cuda", dtype=torch.float16)
        B = torch.empty(2, 2, 3, 150, device="cuda", dtype=torch.float16)
        y, last, checkpoints = torch.ops.selective_scan.fwd(u, u, torch.empty(4, 3, device="cuda"), B, B, None, None,
                                                            True, False)
    assert y.dtype == torch.float16 and tuple(last.shape) == (2, 4, 3)
    assert tuple(checkpoints.shape) == (2, 4, 3, 3) and checkpoints.dtype == torch.float32
    print("registered")
""")


def test_registration_as_the_missing_cuda_kernel(triton_interpreted):
    """Without the extension (as installed where it cannot be built) the Triton scan is the ops' CUDA kernel from
    the import on, and the fake kernel gives its checkpoint layout."""
    assert triton_interpreted(WITHOUT_EXTENSION, extension=False).split() == ["registered"]


NEITHER_EXTENSION_NOR_TRITON = textwrap.dedent("""
    import sys

    sys.modules["triton"] = None  # as with a torch build that ships without triton: importing it fails
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from selective_scan import ops, ss2d

    assert not ops.TRITON_FOR_CUDA and not ss2d.triton_is_cuda_kernel()
    assert ops.kernel_backend("cuda") == ops.kernel_backend("cpu") == "torch"
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("selective_scan::fwd", "CUDA")
    with FakeTensorMode():
        x = torch.empty(2, 5, 7, 12, device="cuda", dtype=torch.float16)
    assert ss2d.select_core(x.permute(0, 3, 1, 2), 6, 1) == "unfused"
    assert "triton is not installed" in ss2d.fused_unsupported_reason(6, 1, x=x)
    print("torch")
""")


def test_without_extension_or_triton_cuda_tensors_take_the_torch_path():
    """The last step of the order extension, Triton, PyTorch: nothing registers for CUDA, the ops' PyTorch
    implementation runs and SS2D takes its unfused core."""
    env = dict(os.environ, SELECTIVE_SCAN_NO_EXTENSION="1")
    proc = subprocess.run([sys.executable, "-c", NEITHER_EXTENSION_NOR_TRITON], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["torch"], proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_cases_match_float64_reference(name):
    check_against_float64(make_inputs(CASES[name], "cuda", seed_of(name)), CASES[name], seed_of(name))


def stage_case(stage, dtype):
    channels, length = STAGES[stage]
    return dict(batch=2, channels=channels, length=length, d_state=1, groups=4, rows=None, bias="channel",
                with_D=True, softplus=True, dtype=dtype, out_float=True, last_state=True)


@pytest.mark.cuda
@pytest.mark.parametrize("stage", range(len(STAGES)))
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_cuda_stage_shapes_match_float64_and_the_extension(dtype, stage):
    case = stage_case(stage, dtype)
    seed = seed_of(f"stage{stage}-{dtype}")
    inputs = make_inputs(case, "cuda", seed)
    y, last, grads = check_against_float64(inputs, case, seed, per_channel_magnitude(inputs, case, seed))
    if not selective_scan.cuda_available():
        pytest.skip(f"the CUDA extension is not built ({selective_scan.build_info()})")
    y_cuda, last_cuda, grads_cuda = run_with_grads(inputs, case, "cuda", seed)
    rtol, atol = TOLERANCES[dtype]
    check("y vs cuda", y, y_cuda, *TOLERANCES[F32])  # both fp32 arithmetic and output
    check("last_state vs cuda", last, last_cuda, *TOLERANCES[F32])
    check("du vs cuda", grads["u"], grads_cuda["u"], 2 * rtol, 2 * atol)
    check("ddelta vs cuda", grads["delta"], grads_cuda["delta"], 5 * rtol, 10 * atol)
