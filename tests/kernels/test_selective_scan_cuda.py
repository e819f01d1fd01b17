"""GPU tests: the CUDA kernel against the torch path, forward and every gradient, at the selective
scan's tolerances (those of mamba's reference test). The reference runs the torch path on the same GPU
in float64 from the same (rounded) inputs, so the tolerance measures the kernel's error alone. Skipped
without a GPU."""

import zlib

import pytest
import torch

import selective_scan
from selective_scan import selective_scan_fn

pytestmark = pytest.mark.cuda

TOLERANCES = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
WEIGHT_TOLERANCE = (1e-3, 1e-3)

# (name, options): D, bias ("channel" / "row" / None), softplus, groups, delta_rows, last state, out_float
OPTION_SETS = {
    "full": dict(with_D=True, bias="channel", softplus=True, groups=2, delta_rows=None, last_state=True,
                 out_float=True),
    "bare": dict(with_D=False, bias=None, softplus=False, groups=4, delta_rows=None, last_state=False,
                 out_float=True),
    "grouped": dict(with_D=True, bias="row", softplus=True, groups=16, delta_rows=4, last_state=True,
                    out_float=False),
}
CHANNELS = 16


def make_inputs(dtype, batch, length, d_state, opts, seed, device="cuda", channels=CHANNELS):
    g = torch.Generator(device=device).manual_seed(seed)
    rows = opts["delta_rows"] or channels
    groups = opts["groups"]

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    inputs = dict(
        u=randn(batch, channels, length).to(dtype),
        delta=(0.5 * rand(batch, rows, length)).to(dtype),
        A=-0.5 * rand(channels, d_state),
        B=randn(batch, groups, d_state, length).to(dtype),
        C=randn(batch, groups, d_state, length).to(dtype),
        D=randn(channels) if opts["with_D"] else None,
        delta_bias={"channel": lambda: 0.5 * rand(channels), "row": lambda: 0.5 * rand(rows),
                    None: lambda: None}[opts["bias"]](),
    )
    return inputs


def run_with_grads(inputs, opts, backend, seed, weight_dtype=None):
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out = selective_scan_fn(**leaves, delta_softplus=opts["softplus"], out_float=opts["out_float"],
                            return_last_state=opts["last_state"], backend=backend)
    y, last = out if opts["last_state"] else (out, None)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    # The output gradient reaches the kernel in y's dtype; weights representable in that dtype give the
    # float64 reference exactly the same dy.
    weights = torch.randn(y.shape, generator=g, device="cuda").to(weight_dtype or y.dtype).to(y.dtype)
    loss = (y * weights).float().sum()
    if last is not None:
        loss = loss + (last * torch.randn(last.shape, generator=g, device="cuda")).sum()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return y.detach(), None if last is None else last.detach(), dict(zip(names, grads))


def float64_reference(inputs, opts, seed):
    upcast = {k: None if v is None else v.double() for k, v in inputs.items()}
    weight_dtype = torch.float32 if opts["out_float"] else inputs["u"].dtype
    return run_with_grads(upcast, dict(opts, out_float=True), "torch", seed, weight_dtype)


def per_channel_magnitude(inputs, opts, seed):
    """For dB/dC: the sum over each group's channels of |that channel's contribution|, from a float64 run with
    B/C repeated per channel. The kernel's error in a group sum scales with this, not with the sum itself,
    which cancels to near zero at some steps (fp32 at L = 4097 once missed atol by 0.9e-3 there)."""
    per_group = inputs["u"].shape[1] // opts["groups"]
    if per_group == 1:
        return {}
    expanded = dict(inputs, B=inputs["B"].repeat_interleave(per_group, 1),
                    C=inputs["C"].repeat_interleave(per_group, 1))
    _, _, grads = float64_reference(expanded, opts, seed)
    return {k: grads[k].abs().unflatten(1, (opts["groups"], per_group)).sum(2) for k in ("B", "C")}


def check_sum(name, got, want, magnitude, rtol, atol):
    """assert_close's rule with rtol applied to `magnitude` (the summands' size) instead of |want|."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got.double() - want.double()).abs()
    bad = err > atol + rtol * magnitude
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst excess "
                           f"{float((err - atol - rtol * magnitude).max()):.3g} (atol {atol}, rtol {rtol})")


def check(name, got, want, rtol, atol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("opts_name", list(OPTION_SETS))
@pytest.mark.parametrize("length", [1, 17, 64, 2048, 3136, 4097])
@pytest.mark.parametrize("d_state", [1, 2, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_kernel_matches_torch_path(dtype, d_state, length, opts_name):
    opts = OPTION_SETS[opts_name]
    seed = zlib.crc32(f"{dtype}-{d_state}-{length}-{opts_name}".encode()) % 10_000
    inputs = make_inputs(dtype, 2, length, d_state, opts, seed)
    y, last, grads = run_with_grads(inputs, opts, "cuda", seed)
    y_ref, last_ref, grads_ref = float64_reference(inputs, opts, seed)
    assert y.dtype == (torch.float32 if opts["out_float"] else dtype)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"d{name}: dtype {grad.dtype}"
    rtol, atol = TOLERANCES[dtype]
    out_tol = TOLERANCES[torch.float32] if opts["out_float"] else (rtol, atol)
    check("y", y, y_ref, *out_tol)
    if last is not None:
        check("last_state", last, last_ref, *TOLERANCES[torch.float32])
    weight_rtol, weight_atol = max(WEIGHT_TOLERANCE[0], rtol), max(WEIGHT_TOLERANCE[1], atol)
    magnitudes = per_channel_magnitude(inputs, opts, seed)
    for name, got in grads.items():
        want = grads_ref[name]
        if name == "u":
            check("du", got, want, 2 * rtol, 2 * atol)
        elif name == "delta":
            check("ddelta", got, want, 5 * rtol, 10 * atol)
        elif name in magnitudes:
            check_sum(f"d{name}", got, want, torch.maximum(magnitudes[name], want.abs()), rtol, atol)
        elif name in ("B", "C"):
            check(f"d{name}", got, want, rtol, atol)
        else:
            scale = max(1.0, want.abs().max().item())  # sums over batch*L terms: compare relative to size
            check(f"d{name}", got, want, weight_rtol, weight_atol * scale)


@pytest.mark.parametrize("length", [1, 7, 49, 196, 300])
@pytest.mark.parametrize("case", [(torch.float16, 1, "full"), (torch.float32, 2, "grouped")], ids=["fp16-N1", "fp32-N2"])
def test_many_short_rows_share_a_warp(case, length):
    """Enough rows that the forward packs several rows per warp (the small tests above get one per warp):
    rows that straddle lanes and tiles, restarts, last states and the backward's checkpoints."""
    dtype, d_state, opts_name = case
    opts = dict(OPTION_SETS[opts_name], out_float=True)
    inputs = make_inputs(dtype, 48, length, d_state, opts, 13, channels=512)
    y, last, grads = run_with_grads(inputs, opts, "cuda", 13)
    y_ref, last_ref, grads_ref = float64_reference(inputs, opts, 13)
    rtol, atol = TOLERANCES[dtype]
    check("y", y, y_ref, *TOLERANCES[torch.float32])
    check("last_state", last, last_ref, *TOLERANCES[torch.float32])
    check("du", grads["u"], grads_ref["u"], 2 * rtol, 2 * atol)
    check("ddelta", grads["delta"], grads_ref["delta"], 5 * rtol, 10 * atol)


def test_misaligned_rows_take_the_scalar_path():
    opts = OPTION_SETS["full"]
    inputs = make_inputs(torch.float16, 2, 3136, 1, opts, 7)
    storage = torch.empty(inputs["u"].numel() + 1, dtype=torch.float16, device="cuda")
    u_offset = storage[1:].view_as(inputs["u"])  # contiguous, but 2 bytes past 16-byte alignment
    u_offset.copy_(inputs["u"])
    inputs["u"] = u_offset
    y, _, grads = run_with_grads(inputs, opts, "cuda", 7)
    y_ref, _, grads_ref = float64_reference(inputs, opts, 7)
    check("y", y, y_ref, *TOLERANCES[torch.float32])
    check("du", grads["u"], grads_ref["u"], 6e-3, 1e-2)


def misaligned(t):
    """A contiguous copy of t that starts 2 bytes past 16-byte alignment."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = storage[1:].view_as(t)
    out.copy_(t)
    return out


def test_misaligned_delta_and_bc_take_the_scalar_path():
    opts = OPTION_SETS["full"]
    inputs = make_inputs(torch.float16, 2, 2048, 1, opts, 8)
    for name in ("delta", "B", "C"):
        inputs[name] = misaligned(inputs[name])
    y, last, grads = run_with_grads(inputs, opts, "cuda", 8)
    y_ref, last_ref, grads_ref = float64_reference(inputs, opts, 8)
    rtol, atol = TOLERANCES[torch.float16]
    check("y", y, y_ref, *TOLERANCES[torch.float32])
    check("last_state", last, last_ref, *TOLERANCES[torch.float32])
    check("du", grads["u"], grads_ref["u"], 2 * rtol, 2 * atol)
    check("ddelta", grads["delta"], grads_ref["delta"], 5 * rtol, 10 * atol)


@pytest.mark.parametrize("d_state", [1, 4])
def test_softplus_extremes(d_state):
    """delta + bias from -30 to 30: dt from 1e-13 (relative accuracy of a tiny softplus) to past the threshold
    20 (dt = x exactly, slope 1), in the kernel's softplus and its derivative."""
    opts = dict(OPTION_SETS["full"], groups=4)
    inputs = make_inputs(torch.float32, 2, 3000, d_state, opts, 19)
    g = torch.Generator(device="cuda").manual_seed(20)
    inputs["delta"] = 60 * torch.rand(inputs["delta"].shape, generator=g, device="cuda") - 30
    y, last, grads = run_with_grads(inputs, opts, "cuda", 19)
    y_ref, last_ref, grads_ref = float64_reference(inputs, opts, 19)
    rtol, atol = TOLERANCES[torch.float32]
    check("y", y, y_ref, rtol, atol)
    check("last_state", last, last_ref, rtol, atol)
    check("du", grads["u"], grads_ref["u"], 2 * rtol, 2 * atol)
    check("ddelta", grads["delta"], grads_ref["delta"], 5 * rtol, 10 * atol)
    for name in ("A", "D", "delta_bias"):
        want = grads_ref[name]
        scale = max(1.0, want.abs().max().item())
        check(f"d{name}", grads[name], want, WEIGHT_TOLERANCE[0], WEIGHT_TOLERANCE[1] * scale)


def test_large_decays_stay_finite():
    opts = dict(OPTION_SETS["full"], groups=4)
    inputs = make_inputs(torch.float32, 2, 3000, 16, opts, 11)
    inputs["A"] = -torch.arange(1, 17, device="cuda", dtype=torch.float32).repeat(CHANNELS, 1)
    inputs["delta"] = inputs["delta"] * 20 + 3
    y, last, grads = run_with_grads(inputs, opts, "cuda", 11)
    y_ref, last_ref, grads_ref = float64_reference(inputs, opts, 11)
    check("y", y, y_ref, *TOLERANCES[torch.float32])
    check("last_state", last, last_ref, *TOLERANCES[torch.float32])
    check("du", grads["u"], grads_ref["u"], 1.2e-3, 4e-3)


def test_vmamba_stage_shape_and_empty_inputs():
    opts = dict(OPTION_SETS["full"], groups=4, last_state=False)
    g = torch.Generator(device="cuda").manual_seed(5)
    batch, channels, length = 2, 384, 3136
    u = torch.randn(batch, channels, length, device="cuda", generator=g).half()
    delta = (0.5 * torch.rand(batch, channels, length, device="cuda", generator=g)).half()
    A = -torch.rand(channels, 1, device="cuda", generator=g)
    B = torch.randn(batch, 4, 1, length, device="cuda", generator=g).half()
    C = torch.randn(batch, 4, 1, length, device="cuda", generator=g).half()
    D = torch.ones(channels, device="cuda")
    bias = torch.rand(channels, device="cuda", generator=g)
    y = selective_scan_fn(u, delta, A, B, C, D, bias, True, backend="cuda")
    y_ref = selective_scan_fn(u, delta, A, B, C, D, bias, True, backend="torch")
    check("y", y, y_ref, *TOLERANCES[torch.float32])
    empty = selective_scan_fn(u[:0], delta[:0], A, B[:0], C[:0], D, bias, True, backend="cuda")
    assert empty.shape == (0, channels, length)
    del opts


def test_torch_compile_with_cuda_kernel():
    torch._dynamo.reset()
    opts = OPTION_SETS["full"]
    inputs = make_inputs(torch.float16, 2, 300, 1, opts, 3)

    def fn(u, delta, A, B, C, D, delta_bias):
        return selective_scan_fn(u, delta, A, B, C, D, delta_bias, delta_softplus=True).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs), fn(**inputs))


def test_default_backend_is_cuda_for_cuda_tensors():
    assert selective_scan.cuda_available()
    assert "CUDA kernels for sm_" in selective_scan.build_info()
