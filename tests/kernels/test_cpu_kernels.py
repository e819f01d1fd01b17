"""The extension's CPU kernels (csrc/cpu/): the selective scan and the fused SS2D core against the float64 PyTorch
reference run on the same (rounded) inputs, so the tolerance measures the kernel alone; forward and every gradient,
for every input dtype, odd sizes (partial lane blocks and chunks), d_state 1..16, B/C groups and delta groups.
Then their dispatch (the default for CPU tensors), fake kernels, and results that do not depend on the thread
count."""

import pytest
import torch

import classification.models as models
from classification.models.vmamba import SS2D
from selective_scan import ops, selective_scan_fn, ss2d

pytestmark = pytest.mark.skipif(not ops.cpu_kernels_built(), reason=f"no CPU kernels: {ops.build_info()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) for outputs in each dtype; atol is relative to the reference's largest magnitude (assert_close)
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def grads(fn, inputs, seed, weight_dtypes=None):
    """fn's outputs and the gradients of every tensor input for fixed random output weights, rounded to
    weight_dtypes (default: the outputs' dtypes), so a reference run can use the same output gradients."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(seed)
    weight_dtypes = weight_dtypes or [out.dtype for out in outputs]
    loss = sum((out * torch.randn(out.shape, generator=g).to(dtype).to(out.dtype)).sum()
               for out, dtype in zip(outputs, weight_dtypes))
    return [out.detach() for out in outputs], torch.autograd.grad(loss, [t for t in leaves if t is not None])


# ------------------------------------------------------------------------------------------ the scan

SCAN_CASES = [
    # batch, channels, L, N, groups, delta_rows, bias ("channel" / "row" / None), with_D, softplus, last_state
    (2, 16, 1, 1, 1, None, "channel", True, True, True),    # one step
    (1, 20, 65, 16, 2, None, "channel", True, True, True),  # 10 channels per group (partial lane block), 2 chunks
    (2, 48, 130, 4, 3, 12, "row", True, True, False),       # delta groups with a per-row bias
    (1, 33, 64, 2, 1, None, None, False, False, True),      # no D, bias or softplus; exactly one chunk
    (3, 32, 17, 3, 32, None, "channel", True, True, False),  # one channel per group
    (1, 16, 300, 8, 1, 4, "row", True, True, True),
]


def scan_inputs(case, dtype, seed=0):
    batch, channels, length, d_state, groups, delta_rows, bias, with_D, _, _ = case
    g = torch.Generator().manual_seed(seed)
    rows = delta_rows or channels
    u = torch.randn(batch, channels, length, generator=g).to(dtype)
    delta = (0.5 * torch.rand(batch, rows, length, generator=g) - 0.1).to(dtype)
    A = -torch.rand(channels, d_state, generator=g) * torch.linspace(0.1, 4.0, d_state)
    B = torch.randn(batch, groups, d_state, length, generator=g).to(dtype)
    C = torch.randn(batch, groups, d_state, length, generator=g).to(dtype)
    D = torch.randn(channels, generator=g) if with_D else None
    bias = {"channel": channels, "row": rows, None: 0}[bias]
    delta_bias = 0.5 * torch.rand(bias, generator=g) if bias else None
    return [u, delta, A, B, C, D, delta_bias]


def run_scan(case, backend, out_float=True):
    softplus, last_state = case[8], case[9]

    def fn(*t):
        return selective_scan_fn(*t, delta_softplus=softplus, out_float=out_float, return_last_state=last_state,
                                 backend=backend)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "B{}-C{}-L{}-N{}-G{}".format(*c[:5]))
def test_scan_matches_float64_reference(case, dtype):
    inputs = scan_inputs(case, dtype)
    out_float = dtype == torch.float32 or case[2] % 2 == 0  # 16-bit outputs too
    outputs, grads_cpu = grads(run_scan(case, "cpu", out_float), inputs, seed=1)
    reference = [None if t is None else t.double() for t in inputs]
    outputs_ref, grads_ref = grads(run_scan(case, "torch"), reference, seed=1, weight_dtypes=[t.dtype for t in outputs])
    assert outputs[0].dtype == (torch.float32 if out_float else dtype)
    for name, out, ref in zip(("y", "last_state"), outputs, outputs_ref):
        assert_close(out, ref, torch.float32 if out_float or name == "last_state" else dtype, name)
    names = [n for n, t in zip("u delta A B C D delta_bias".split(), inputs) if t is not None]
    for name, got, want, t in zip(names, grads_cpu, grads_ref, [t for t in inputs if t is not None]):
        assert got.dtype == t.dtype, name
        assert_close(got, want, t.dtype, f"grad {name}")


def test_scan_large_decays_and_linear_softplus():
    """dt |A| far beyond exp's range (the decay underflows) and pre-activations above softplus's threshold 20."""
    case = (1, 24, 150, 16, 2, None, "channel", True, True, True)
    u, delta, A, B, C, D, bias = scan_inputs(case, torch.float32)
    delta[..., 40:50] = 30.0
    A = A * 10
    outputs, grads_cpu = grads(run_scan(case, "cpu"), [u, delta, A, B, C, D, bias], seed=2)
    outputs_ref, grads_ref = grads(run_scan(case, "torch"), [t.double() for t in (u, delta, A, B, C, D, bias)], 2)
    for out, ref in zip(outputs + list(grads_cpu), outputs_ref + list(grads_ref)):
        assert torch.isfinite(out).all()
        assert_close(out, ref, torch.float32, "scan")


def test_scan_dispatch_on_cpu():
    inputs = scan_inputs(SCAN_CASES[2], torch.float32)
    assert ops.kernel_runs_on(torch.device("cpu"))
    default = selective_scan_fn(*inputs, delta_softplus=True)
    torch.testing.assert_close(default, selective_scan_fn(*inputs, delta_softplus=True, backend="cpu"), rtol=0, atol=0)
    # float64 is the PyTorch implementation's (the kernels compute in fp32)
    inputs64 = [None if t is None else t.double() for t in inputs]
    torch.testing.assert_close(selective_scan_fn(*inputs64, delta_softplus=True),
                               selective_scan_fn(*inputs64, delta_softplus=True, backend="torch"), rtol=0, atol=0)
    with pytest.raises(TypeError, match="CPU kernel takes float32/float16/bfloat16 `u`, not torch.float64"):
        selective_scan_fn(*inputs64, delta_softplus=True, backend="cpu")
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        selective_scan_fn(*[None if t is None else t.to("meta") for t in inputs], backend="cpu")


def test_scan_opcheck():
    """Schema, fake kernels (the checkpoints the CPU forward saves) and dispatch of selective_scan::fwd / ::bwd."""
    u, delta, A, B, C, D, bias = scan_inputs(SCAN_CASES[1], torch.float32)
    torch.library.opcheck(torch.ops.selective_scan.fwd.default, [u, delta, A, B, C, D, bias, True, True])
    _, _, checkpoints = torch.ops.selective_scan.fwd(u, delta, A, B, C, D, bias, True, True)
    assert checkpoints.shape == (1, 20, 2, 16)  # the state entering each chunk of ops.CPU_CHUNK steps
    dy, dlast = torch.randn(u.shape), torch.randn(1, 20, 16)
    torch.library.opcheck(torch.ops.selective_scan.bwd.default,
                          [dy, dlast, u, delta, A, B, C, D, bias, checkpoints, True])


# -------------------------------------------------------------------------------------- the SS2D core

SS2D_CASES = [
    # batch, D, H, W, dt rank, d_state
    (2, 37, 5, 7, 6, 1),    # partial lane block
    (1, 64, 13, 11, 12, 1),  # 143 steps: a partial last chunk
    (1, 16, 1, 1, 3, 1),    # one position
    (2, 33, 1, 70, 2, 1),   # a thin map
    (1, 48, 9, 8, 48, 1),   # VMamba-T's stage-4 rank
    (1, 20, 6, 7, 80, 1),   # a rank above the CUDA kernels' limit
    (2, 24, 9, 10, 6, 16),  # the v0 models' d_state
    (1, 19, 8, 9, 2, 4),
]


def ss2d_params(dim, rank, d_state, seed):
    """SS2D-like parameters in fp32 as stored (A and D away from their constant init)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(4, dim, generator=g) * 4.6 - 6.9)  # 0.001 .. 0.1
    return dict(x_proj_weight=(torch.rand(4, rank + 2 * d_state, dim, generator=g) * 2 - 1) * dim ** -0.5,
                dt_projs_weight=(torch.rand(4, dim, rank, generator=g) * 2 - 1) * rank ** -0.5,
                dt_projs_bias=dt + torch.log(-torch.expm1(-dt)),
                A_logs=torch.log(torch.rand(4 * dim, d_state, generator=g) * torch.arange(1, d_state + 1) + 0.5),
                Ds=torch.randn(4 * dim, generator=g))


def fused_op_inputs(case, dtype, seed=0):
    batch, dim, height, width, rank, d_state = case
    params = ss2d_params(dim, rank, d_state, seed)
    x = torch.randn(batch, height, width, dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    x_dbl = ss2d.project(x, params["x_proj_weight"])
    return [x, x_dbl, params["dt_projs_weight"], params["dt_projs_bias"], params["A_logs"], params["Ds"]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SS2D_CASES, ids=lambda c: "B{}-D{}-{}x{}-R{}-N{}".format(*c))
def test_fused_ss2d_matches_float64_reference(case, dtype):
    inputs = fused_op_inputs(case, dtype)
    (y,), grads_cpu = grads(ss2d.scan_routes, inputs, seed=3)
    (y_ref,), grads_ref = grads(ss2d.scan_routes_reference, [t.double() for t in inputs], seed=3)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, "y")
    for name, got, want, t in zip(("dx", "dx_dbl", "d dt_weight", "d dt_bias", "dA_log", "dDs"), grads_cpu,
                                  grads_ref, inputs):
        assert got.dtype == t.dtype, name
        assert_close(got, want, t.dtype, name)


def test_fused_ss2d_empty_batch():
    x, x_dbl, *params = fused_op_inputs((1, 20, 3, 4, 2, 1), torch.float32)
    x, x_dbl = x[:0].requires_grad_(), x_dbl[:0].requires_grad_()
    y = ss2d.scan_routes(x, x_dbl, *params)
    y.sum().backward()
    assert y.shape == (0, 3, 4, 20) and x.grad.shape == x.shape and x_dbl.grad.shape == x_dbl.shape


def test_fused_ss2d_opcheck_with_states():
    """Fake kernels of the CPU ops for d_state > 1 (the checkpoints hold every state)."""
    inputs = fused_op_inputs((2, 24, 9, 10, 6, 4), torch.float32)
    torch.library.opcheck(torch.ops.selective_scan_ss2d.fwd.default, inputs)
    _, ckpt = torch.ops.selective_scan_ss2d.fwd(*inputs)
    assert ckpt.shape == (2, 4, 2, 4, 24)  # (B, routes, chunks of ss2d.CPU_CHUNK steps, N, D)
    torch.library.opcheck(torch.ops.selective_scan_ss2d.bwd.default, [torch.randn(2, 9, 10, 24)] + inputs + [ckpt])


@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "vanilla_vmamba_tiny"])
def test_models_take_the_fused_core_on_cpu(name):
    """Both model families (d_state 1 with dt ranks 6..48, and the v0 models' d_state 16) run SS2D fused on the
    CPU by default."""
    model = getattr(models, name)(num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, SS2D)]
    assert {op.core_for(torch.empty(1, op.d_inner, 2, 2)) for op in blocks} == {"fused"}


def test_results_do_not_depend_on_the_thread_count():
    """Tasks own their outputs and their partial sums are added afterwards: identical bits with 1 or 2 threads."""
    scan_case = SCAN_CASES[1]
    scan = scan_inputs(scan_case, torch.float32)
    fused = fused_op_inputs(SS2D_CASES[6], torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(grads(run_scan(scan_case, "cpu"), scan, seed=4) + grads(ss2d.scan_routes, fused, seed=4))
    finally:
        torch.set_num_threads(threads)
    flat = [[t for group in result for t in group] for result in results]
    for one, two in zip(*flat):
        torch.testing.assert_close(one, two, rtol=0, atol=0)
