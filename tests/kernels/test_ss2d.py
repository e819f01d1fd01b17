"""SS2D's core (selective_scan.ss2d): the fused, unfused and reference implementations against each other.

CPU: the reference equals the unfused core for every route set and d_state; the fused interface (the x_dbl GEMM,
the ops' autograd rule, run by the ops' PyTorch kernel) equals the reference in forward and every gradient;
validation, dispatch and torch.compile of the interface.
CUDA (device only): the kernels against a float64 oracle of the ops' contract from the same rounded inputs
(so the tolerance measures the kernels alone, at the selective scan's tolerances), for odd sizes, all dtypes and
a detection-size map; opcheck of the dispatcher ops; the fused SS2D module against the unfused one under
autocast; and torch.compile of a fused SS2D.
"""

import math
import subprocess
import sys

import pytest
import torch

from classification.models.vmamba import SS2D
from selective_scan import ss2d
from selective_scan.cross_scan import ROUTE_SETS, cross_scan

PARAM_NAMES = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def make_params(dim, rank, d_state=1, seed=0, device="cpu"):
    """SS2D-like parameters with every entry distinct (A and D not at their constant init)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, bound):
        return (torch.rand(*shape, generator=g) * 2 - 1) * bound

    dt = torch.exp(torch.rand(4, dim, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    params = dict(
        x_proj_weight=uniform(4, rank + 2 * d_state, dim, bound=dim ** -0.5),
        dt_projs_weight=uniform(4, dim, rank, bound=rank ** -0.5),
        dt_projs_bias=dt + torch.log(-torch.expm1(-dt)),
        A_logs=torch.log(1 + torch.rand(4 * dim, d_state, generator=g)),
        Ds=torch.randn(4 * dim, generator=g),
    )
    return {k: v.to(device) for k, v in params.items()}


def run_core(x, params, backend, channel_first=True, seed=1, **kwargs):
    """y and the gradients of (x, *params) for a fixed random output gradient."""
    x = x.detach().clone().requires_grad_()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    y = ss2d.ss2d_core(x, **leaves, channel_first=channel_first, backend=backend, **kwargs)
    g = torch.Generator(device=x.device).manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, device=x.device)
    y.backward(dy)
    return y.detach(), [x.grad] + [leaves[k].grad for k in PARAM_NAMES]


def assert_close(actual, expected, rtol, atol, what=""):
    """assert_close with atol relative to the expected tensor's largest magnitude (gradients summed over many
    positions are large)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------------ CPU


@pytest.mark.parametrize("routes", sorted(ROUTE_SETS))
def test_route_positions_match_cross_scan(routes):
    x = torch.randn(2, 3, 5, 7)
    xs = cross_scan(x, channel_first=True, routes=routes, backend="torch")
    positions = ss2d.route_positions(5, 7, routes)
    for k in range(4):
        torch.testing.assert_close(xs[:, k], x.flatten(2)[:, :, positions[k]], rtol=0, atol=0)


@pytest.mark.parametrize("routes", sorted(ROUTE_SETS))
@pytest.mark.parametrize("d_state", [1, 4])
@pytest.mark.parametrize("channel_first", [True, False])
def test_reference_equals_unfused_core(channel_first, d_state, routes):
    """Forward and every gradient: the route copies, batched projections and cross-merge of the unfused core
    against the reference's gather through the index maps."""
    dim, rank = 11, 3
    params = make_params(dim, rank, d_state=d_state, seed=d_state)
    x = torch.randn(2, dim, 5, 7, generator=torch.Generator().manual_seed(4))
    y_ref, grads_ref = run_core(x, params, "reference", channel_first, routes=routes)
    y, grads = run_core(x, params, "unfused", channel_first, routes=routes)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    # merged output in channels-last storage, as cross_merge's
    assert (y.permute(0, 2, 3, 1) if channel_first else y).is_contiguous()
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    for name, g, g_ref in zip(("x",) + PARAM_NAMES, grads, grads_ref):
        assert_close(g, g_ref, 1e-4, 1e-5, name)


def test_ss2d_module_calls_the_core():
    torch.manual_seed(0)
    module = SS2D(d_model=20, d_state=1, ssm_ratio=1.85, forward_type="v05_noz", channel_first=True)
    x = torch.randn(2, module.d_inner, 5, 7)
    params = {k: getattr(module, k) for k in PARAM_NAMES}
    with torch.no_grad():
        torch.testing.assert_close(module.ssm(x), ss2d.ss2d_core(x, **params, backend="reference"),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 6, 12, 24, 30])
@pytest.mark.parametrize("channel_first", [True, False])
def test_fused_interface_equals_reference_on_cpu(rank, channel_first):
    """Every piece of the fused path except the CUDA kernels: the x_dbl GEMM, the ops and their autograd rule
    (the ops run their PyTorch implementation here)."""
    dim, height, width = 37, 5, 7
    params = make_params(dim, rank, seed=rank)
    x = torch.randn(2, dim, height, width, generator=torch.Generator().manual_seed(3))
    if not channel_first:
        x = x.contiguous(memory_format=torch.channels_last)
    y_ref, grads_ref = run_core(x, params, "unfused", channel_first)
    y, grads = run_core(x, params, "fused", channel_first)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    for name, g, g_ref in zip(("x",) + PARAM_NAMES, grads, grads_ref):
        assert_close(g, g_ref, 1e-4, 1e-5, name)


def test_dispatch_rule_and_validation():
    params = make_params(8, 2)
    x = torch.randn(1, 8, 3, 4)
    # CPU tensors take the fused core by default where its CPU kernels are built, the unfused one otherwise
    default = "fused" if ss2d.kernel_runs_on(x.device) else "unfused"
    assert ss2d.select_core(x, 2, 1) == default
    assert ss2d.select_core(x, 2, 16) == default  # the CPU kernels take any d_state
    assert ss2d.select_core(x, 2, 1, "bidi") == "unfused"
    torch.testing.assert_close(ss2d.ss2d_core(x, **params), ss2d.ss2d_core(x, **params, backend=default),
                               rtol=0, atol=0)
    assert ss2d.fused_unsupported_reason(2, 1, x=x) is None
    # without an input the CUDA kernels' limits apply (d_state 1 to 16); a CPU input has none
    assert ss2d.fused_unsupported_reason(2, 16) is None
    assert "d_state is 17" in ss2d.fused_unsupported_reason(2, 17)
    assert ss2d.fused_unsupported_reason(2, 17, x=x) is None
    assert ss2d.fused_unsupported_reason(66, 16) is None
    assert "dt rank 67" in ss2d.fused_unsupported_reason(67, 16)
    assert ss2d.fused_unsupported_reason(66, 1) is None
    assert "dt rank 67" in ss2d.fused_unsupported_reason(67, 1)
    assert ss2d.fused_unsupported_reason(67, 1, x=x) is None
    assert "cross2d" in ss2d.fused_unsupported_reason(2, 1, "bidi")
    assert "dtype" in ss2d.fused_unsupported_reason(2, 1, x=x.double())
    with pytest.raises(RuntimeError, match="backend='fused'.*cross2d"):
        ss2d.ss2d_core(x, **params, routes="bidi", backend="fused")
    with pytest.raises(RuntimeError, match="backend='fused'.*dtype"):
        ss2d.ss2d_core(x.double(), **params, backend="fused")
    # v0-style d_state 4 and a wide dt rank run fused on the CPU
    for d_state, rank in ((4, 2), (1, 67)):
        wide = make_params(8, rank, d_state=d_state)
        torch.testing.assert_close(ss2d.ss2d_core(x, **wide, backend="fused"),
                                   ss2d.ss2d_core(x, **wide, backend="reference"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`x` must be"):
        ss2d.ss2d_core(x[0], **params)
    with pytest.raises(ValueError, match="`x_proj_weight` must be"):
        ss2d.ss2d_core(x, **{**params, "x_proj_weight": params["x_proj_weight"][:, :-1]})
    with pytest.raises(ValueError, match="`Ds` must be"):
        ss2d.ss2d_core(x, **{**params, "Ds": params["Ds"][:-1]})
    with pytest.raises(ValueError, match="`dt_projs_weight` must be"):
        ss2d.ss2d_core(x[:, :7], **params)
    with pytest.raises(ValueError, match="route set"):
        ss2d.ss2d_core(x, **params, routes="diagonal")
    with pytest.raises(ValueError, match="`backend`"):
        ss2d.ss2d_core(x, **params, backend="cuda")


def test_module_core_is_a_constructor_argument(monkeypatch):
    def block(**kwargs):
        return SS2D(d_model=16, d_state=1, ssm_ratio=2.0, forward_type="v05_noz", channel_first=True, **kwargs)

    x = torch.randn(1, 32, 4, 4)
    assert block().core == "auto" and block().core_for(x) == ("fused" if ss2d.kernel_runs_on(x.device) else "unfused")
    assert block(core="fused").core_for(x) == "fused"
    assert block(core="unfused").core_for(x) == "unfused"
    monkeypatch.setenv("VMAMBA_SS2D_FUSED", "0")  # the environment sets the default only
    assert block().core == "unfused" and block(core="auto").core == "auto"
    with pytest.raises(ValueError, match="unknown ss2d core 'triton'"):
        block(core="triton")
    assert SS2D(d_model=16, d_state=16, forward_type="v0", core="fused").core == "fused"  # vanilla VMamba's blocks
    with pytest.raises(ValueError, match="'fused' cannot run this block: d_state is 17"):
        SS2D(d_model=16, d_state=17, forward_type="v0", core="fused")
    # a whole model passes it to every block
    import classification.models as models
    model = models.vmamba_tiny_s1l8(num_classes=10, ss2d_core="unfused")
    assert {m.core for m in model.modules() if isinstance(m, SS2D)} == {"unfused"}


def test_checkpoint_shapes():
    """The checkpoints the compiled forwards save (what the fake kernel tells torch.compile): every 64 steps with N
    states on the CPU, every 32 on CUDA above d_state 1; every 16, 8 or 4 steps by row width on CUDA at d_state 1."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ss2d.checkpoint_shape((2, 5, 13, 24), 6, 16, cpu) == (2, 4, 2, 16, 24)
    assert ss2d.checkpoint_shape((2, 5, 13, 24), 6, 1, cpu) == (2, 4, 2, 1, 24)
    assert ss2d.checkpoint_shape((2, 5, 13, 24), 6, 16, cuda) == (2, 4, 3, 16, 24)
    assert ss2d.checkpoint_shape((2, 8, 8, 24), 48, 4, cuda) == (2, 4, 2, 4, 24)
    assert ss2d.checkpoint_shape((128, 56, 56, 192), 6, 16, cuda) == (128, 4, 98, 16, 192)  # Vanilla-T stage 1
    assert ss2d.checkpoint_shape((2, 5, 13, 24), 6, 1, cuda) == (2, 4, 5, 24)
    assert ss2d.checkpoint_shape((2, 5, 13, 24), 12, 1, cuda) == (2, 4, 9, 24)
    assert ss2d.checkpoint_shape((2, 5, 13, 24), 48, 1, cuda) == (2, 4, 17, 24)


def op_inputs(x, params):
    """The fused ops' inputs: x, x_dbl = x W_proj^T (x's dtype) and SS2D's other parameters as stored."""
    x_dbl = ss2d.project(x, params["x_proj_weight"]).detach()
    return [x, x_dbl] + [params[k] for k in PARAM_NAMES[1:]]


def test_opcheck_dispatcher_ops_cpu():
    """Schema, fake kernels and dispatch of selective_scan_ss2d::fwd / ::bwd with their CPU kernels."""
    params = make_params(12, 3)
    inputs = op_inputs(torch.randn(2, 4, 5, 12), params)
    torch.library.opcheck(torch.ops.selective_scan_ss2d.fwd.default, inputs)
    _, ckpt = torch.ops.selective_scan_ss2d.fwd(*inputs)
    torch.library.opcheck(torch.ops.selective_scan_ss2d.bwd.default, [torch.randn(2, 4, 5, 12)] + inputs + [ckpt])


def test_fused_interface_without_the_extension():
    """Without the compiled extension the ops are defined in Python, and the fused path still runs on CPU."""
    code = (
        "import sys; sys.modules['selective_scan._C'] = None\n"
        "import torch\n"
        "from selective_scan import ops, ss2d\n"
        "assert not ops.extension_built()\n"
        "x = torch.randn(1, 8, 3, 4, requires_grad=True)\n"
        "w = torch.randn(4, 4, 8) * 0.3\n"
        "p = [w, torch.rand(4, 8, 2) - 0.5, torch.full((4, 8), -3.0), torch.zeros(32, 1), torch.ones(32)]\n"
        "y = ss2d.ss2d_core(x, *p, backend='fused')\n"
        "y.sum().backward()\n"
        "torch.testing.assert_close(y, ss2d.ss2d_core(x, *p, backend='unfused'))\n"
        "print('ok', x.grad.abs().sum().item() > 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok True"


@pytest.mark.slow
def test_torch_compile_fused_interface_cpu():
    dim, rank = 12, 3
    params = make_params(dim, rank)
    x = torch.randn(2, dim, 4, 5)

    def core(x, *p):
        return ss2d.ss2d_core(x, *p, backend="fused")

    compiled = torch.compile(core, fullgraph=True)
    y_eager, grads_eager = run_core(x, params, "fused")
    leaves = [x.clone().requires_grad_()] + [params[k].clone().requires_grad_() for k in PARAM_NAMES]
    y = compiled(*leaves)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(y.detach(), y_eager, rtol=1e-5, atol=1e-5)
    for g, g_eager in zip([t.grad for t in leaves], grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the selective scan's tolerances (rtol, atol): y is fp32 arithmetic on the given inputs whatever x's dtype
Y_TOL = (6e-4, 2e-3)
DX_TOL = {torch.float32: (1.2e-3, 4e-3), torch.float16: (6e-3, 1e-2), torch.bfloat16: (6e-2, 1e-1)}
XDBL_TOL = (3e-3, 2e-2)  # like ddelta: rtol 5x, atol 10x
WEIGHT_TOL = (1e-3, 1e-3)


def op_grads_cuda(x, params, seed=1):
    """Runs the fused ops on CUDA and the float64 oracle of their contract from the same inputs; returns both
    (y, [dx, dx_dbl, d dt_weight, d dt_bias, dA_log, dDs])."""
    inputs = op_inputs(x, params)
    g = torch.Generator(device="cuda").manual_seed(seed)
    dy = torch.randn(x.shape, generator=g, device="cuda")

    def run(leaves, fn):
        y = fn(*leaves)
        return y.detach(), list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))

    fused = run([t.detach().clone().requires_grad_() for t in inputs], ss2d.scan_routes)
    oracle = run([t.detach().double().requires_grad_() for t in inputs], ss2d.scan_routes_reference)
    return fused, oracle


def check_op(fused, oracle, dtype):
    (y, grads), (y_ref, grads_ref) = fused, oracle
    assert_close(y, y_ref, *Y_TOL, "y")
    names = ("dx", "dx_dbl", "d dt_weight", "d dt_bias", "dA_log", "dDs")
    tols = (DX_TOL[dtype], XDBL_TOL) + (WEIGHT_TOL,) * 4
    for name, g, g_ref, tol in zip(names, grads, grads_ref, tols):
        assert torch.isfinite(g).all(), name
        assert_close(g, g_ref, *tol, name)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype


# (batch, D, H, W, dt rank): odd channel counts (partial warps), thin maps, maps shorter than one tile (64
# steps) and spanning several, partial last chunks, every x_dbl width (8, 16, 32, 64, 68). Small batches cut the
# routes into segments of 4 chunks (several, some with a partial last one, wherever a map has more than 4
# chunks); 300 samples of one channel group (or 140 of two) fill an H100 with one block per (batch, channel
# group) and run unsegmented, and with at least 64 chunks their forward splits each route over a block's warps
# (73 chunks: a partial last chunk and a tile of one chunk; 130 chunks of 16 steps: a tile of two).
CUDA_SHAPES = [(2, 37, 5, 7, 6), (1, 64, 13, 11, 12), (3, 100, 1, 33, 24), (2, 32, 17, 1, 2), (1, 40, 24, 40, 6),
               (2, 70, 9, 23, 30), (1, 33, 1, 1, 6), (2, 48, 31, 3, 12), (300, 32, 3, 5, 6), (2, 40, 7, 9, 32),
               (3, 36, 5, 6, 48), (1, 64, 13, 3, 62), (2, 40, 5, 9, 64), (1, 33, 6, 7, 66), (300, 32, 33, 35, 6),
               (140, 37, 40, 52, 14)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_kernels_match_fp64_oracle(dtype, shape):
    batch, dim, height, width, rank = shape
    params = make_params(dim, rank, seed=dim, device="cuda")
    x = torch.randn(batch, height, width, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(7)).to(dtype)
    check_op(*op_grads_cuda(x, params), dtype)


@pytest.mark.cuda
def test_fused_kernels_detection_size_map():
    """A Mask R-CNN stage-1 map at 1333x800 input (200 x 336): no on-chip buffer scales with the map."""
    dim, rank = 24, 2
    params = make_params(dim, rank, seed=5, device="cuda")
    x = torch.randn(1, 200, 336, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(8)).half()
    check_op(*op_grads_cuda(x, params), torch.float16)


def s4d_params(dim, rank, d_state, seed, device="cuda"):
    """make_params with vanilla VMamba's A init (A_n = -n, n = 1..N, per channel and route) slightly perturbed: the
    decays the v0 models start from."""
    params = make_params(dim, rank, d_state=d_state, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.arange(1, d_state + 1, dtype=torch.float32).log().repeat(4 * dim, 1)
    params["A_logs"] = (a + 0.1 * torch.randn(a.shape, generator=g)).to(device)
    return params


# d_state above 1 (csrc/ss2d_states_*.cu): (batch, D, H, W, dt rank, N). Channel counts that are not a multiple
# of 16 (partial warps of the backward's lane pairs), odd and unequal sides, maps shorter than one 8-step group
# (1 x 1, 1 x 5), exactly one group (2 x 4) and one 32-step chunk (4 x 8), several whole chunks (8 x 8, 8 x 16,
# 24 x 40), last chunks of 1 to 4 groups, whole (5 x 8: 40 steps; 7 x 8: 56) or with a partial last group (5 x 7:
# 35 steps; 13 x 11: 143; 17 x 1: 17; 31 x 3: 93), ranks 1 to 66, and every state count padding (2, 3 -> 4;
# 5 -> 8; 9, 13, 16 -> 16).
STATE_SHAPES = [(2, 37, 5, 7, 6, 4), (2, 37, 5, 7, 6, 16), (1, 64, 13, 11, 12, 16), (3, 100, 1, 33, 24, 4),
                (2, 32, 17, 1, 2, 16), (1, 33, 1, 1, 6, 16), (2, 40, 1, 5, 3, 2), (2, 48, 8, 8, 8, 3),
                (2, 40, 8, 16, 16, 5), (1, 70, 9, 23, 32, 9), (2, 36, 7, 6, 48, 16), (1, 40, 5, 9, 64, 16),
                (1, 33, 6, 7, 66, 16), (1, 33, 6, 7, 1, 16), (4, 96, 24, 40, 6, 16), (3, 64, 31, 3, 12, 8),
                (2, 24, 2, 4, 6, 13), (1, 20, 4, 8, 5, 16), (2, 37, 5, 8, 6, 16), (1, 40, 7, 8, 12, 16)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", STATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_state_kernels_match_fp64_oracle(dtype, shape):
    batch, dim, height, width, rank, d_state = shape
    params = s4d_params(dim, rank, d_state, seed=dim + d_state)
    x = torch.randn(batch, height, width, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(7)).to(dtype)
    check_op(*op_grads_cuda(x, params), dtype)


# Vanilla VMamba-T's four stages at 224 px (D = 2 x 96 .. 2 x 768, dt rank ceil(d_model / 16), 16 states), batch 2
VANILLA_TINY_STAGES = [(2, 192, 56, 56, 6), (2, 384, 28, 28, 12), (2, 768, 14, 14, 24), (2, 1536, 7, 7, 48)]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", VANILLA_TINY_STAGES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_state_kernels_vanilla_tiny_stages(dtype, shape):
    batch, dim, height, width, rank = shape
    params = s4d_params(dim, rank, 16, seed=rank)
    x = torch.randn(batch, height, width, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(9)).to(dtype)
    check_op(*op_grads_cuda(x, params), dtype)


@pytest.mark.cuda
def test_fused_state_kernels_detection_size_map():
    """A detection-size stage-1 map of a v0 backbone (batch 2, 100 x 167, D 192, 16 states): one warp per route walks
    16700 steps (1044 chunks, the last partial)."""
    dim, rank = 192, 6
    params = s4d_params(dim, rank, 16, seed=11)
    x = torch.randn(2, 100, 167, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(8)).half()
    check_op(*op_grads_cuda(x, params), torch.float16)


@pytest.mark.cuda
@pytest.mark.parametrize("d_state", [4, 16])
@pytest.mark.parametrize("channel_first", [True, False])
def test_fused_state_core_matches_unfused(d_state, channel_first):
    """ss2d_core in fp32 with more than one state: the fused core (x_dbl GEMM, the state kernels) against the unfused
    one (route copies, per-route GEMMs, the CUDA selective scan, cross-merge), forward and every gradient."""
    dim, rank = 72, 5
    params = s4d_params(dim, rank, d_state, seed=d_state)
    x = torch.randn(2, dim, 19, 14, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    assert ss2d.select_core(x, rank, d_state, backend="fused") == "fused"
    y_ref, grads_ref = run_core(x, params, "unfused", channel_first)
    y, grads = run_core(x, params, "fused", channel_first)
    assert_close(y, y_ref, *Y_TOL, "y")
    for name, g, g_ref in zip(("x",) + PARAM_NAMES, grads, grads_ref):
        assert_close(g, g_ref, *WEIGHT_TOL, name)


@pytest.mark.cuda
@pytest.mark.parametrize("d_state", [1, 16])
def test_opcheck_dispatcher_ops(d_state):
    """Schema, fake kernels and dispatch of selective_scan_ss2d::fwd / ::bwd (torch.library.opcheck)."""
    params = make_params(12, 3, d_state=d_state, device="cuda")
    x = torch.randn(2, 4, 5, 12, device="cuda").half()
    inputs = op_inputs(x, params)
    torch.library.opcheck(torch.ops.selective_scan_ss2d.fwd.default, inputs)
    _, ckpt = torch.ops.selective_scan_ss2d.fwd(*inputs)
    dy = torch.randn(x.shape, device="cuda")
    torch.library.opcheck(torch.ops.selective_scan_ss2d.bwd.default, [dy] + inputs + [ckpt])


@pytest.mark.cuda
def test_fused_ops_reject_bad_inputs():
    """The dispatcher ops refuse a call that does not match the kernels' contract, naming the argument."""
    params = make_params(12, 3, device="cuda")
    x = torch.randn(1, 4, 5, 12, device="cuda")
    inputs = op_inputs(x, params)
    with pytest.raises(RuntimeError, match="`x_dbl` must be"):
        torch.ops.selective_scan_ss2d.fwd(x, inputs[1].half(), *inputs[2:])
    with pytest.raises(RuntimeError, match=r"`A_log` must have shape \(48, N\), got \(4, 12\)"):
        torch.ops.selective_scan_ss2d.fwd(*inputs[:4], inputs[4].view(4, 12), inputs[5])
    with pytest.raises(RuntimeError, match=r"`x_dbl` must have shape \(1, 4, 5, 44\), got \(1, 4, 5, 20\)"):
        torch.ops.selective_scan_ss2d.fwd(*inputs[:4], inputs[4].expand(48, 4).contiguous(), inputs[5])
    wide = op_inputs(x, make_params(12, 3, d_state=17, device="cuda"))
    with pytest.raises(RuntimeError, match="d_state is 17; the fused CUDA kernels support 1 to 16"):
        torch.ops.selective_scan_ss2d.fwd(*wide)
    with pytest.raises(RuntimeError, match=r"`dt_bias` must have shape \(4, 12\), got \(48\)"):
        torch.ops.selective_scan_ss2d.fwd(*inputs[:3], inputs[3].view(-1), *inputs[4:])
    _, ckpt = torch.ops.selective_scan_ss2d.fwd(*inputs)
    with pytest.raises(RuntimeError, match=r"`dy` must have shape \(1, 4, 5, 12\), got \(1, 5, 4, 12\)"):
        torch.ops.selective_scan_ss2d.bwd(torch.zeros(1, 5, 4, 12, device="cuda"), *inputs, ckpt)
    states = op_inputs(x, make_params(12, 3, d_state=4, device="cuda"))
    with pytest.raises(RuntimeError, match=r"`ckpt` must have shape \(1, 4, 1, 4, 12\), got \(1, 4, 2, 12\)"):
        torch.ops.selective_scan_ss2d.bwd(torch.zeros(1, 4, 5, 12, device="cuda"), *states, ckpt)


def ss2d_module_grads(module, x, core, dtype, seed=2):
    """Output and gradients of SS2D `module` with its core set to `core` ("fused" / "unfused"; None: as is)."""
    if core is not None:
        module.core = core
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = module(x)
    dy = torch.randn(y.shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")
    y.float().backward(dy)
    return y.detach().float(), [x.grad] + [p.grad.clone() for p in module.parameters()]


MODULE_TOL = {torch.float32: (1e-3, 1e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}


def assert_module_cores_agree(module, x, dtype):
    """The whole module's output and every gradient under autocast, fused core against the unfused one."""
    y, grads = ss2d_module_grads(module, x, "fused", dtype)
    y_ref, grads_ref = ss2d_module_grads(module, x, "unfused", dtype)
    rtol, atol = MODULE_TOL[dtype]
    assert_close(y, y_ref, rtol, atol, "y")
    names = ["x"] + [n for n, _ in module.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, rtol, atol, name)


@pytest.mark.cuda
@pytest.mark.parametrize("channel_first", [True, False], ids=["ln2d", "ln"])
@pytest.mark.parametrize("config", [(24, 2.0, 9, 13), (96, 2.0, 14, 14), (200, 1.0, 7, 5)],
                         ids=["d24", "d96", "d200"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_ss2d_module_matches_unfused(dtype, config, channel_first):
    """Whole SS2D (in_proj .. out_proj), fused core vs the unfused one (Triton cross-scan/merge, CUDA scan),
    under autocast. The unfused path rounds dt_proj's output to the autocast dtype, hence looser tolerances."""
    d_model, ratio, height, width = config
    torch.manual_seed(0)
    module = SS2D(d_model=d_model, d_state=1, ssm_ratio=ratio, forward_type="v05_noz", conv_bias=False,
                  channel_first=channel_first).cuda()
    with torch.no_grad():
        module.A_logs.uniform_(-0.5, 0.7)
        module.Ds.normal_()
    assert module.core_for(torch.empty(1, module.d_inner, 2, 2, device="cuda")) == "fused"
    shape = (2, d_model, height, width) if channel_first else (2, height, width, d_model)
    x = torch.randn(shape, device="cuda")
    assert_module_cores_agree(module, x, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["vmamba_tiny_s1l8", "vmamba_base_s2l15", "vanilla_vmamba_tiny", "vanilla_vmamba_base"])
def test_model_dispatch(name):
    """Every stage runs the fused core by default: dt ranks up to 66 (VMamba-T 6 / 12 / 24 / 48, VMamba-B 8 / 16 /
    32 / 64) and the vanilla (v0) models' 16 states."""
    import classification.models as models

    model = getattr(models, name)(num_classes=10)
    ops = [stage.blocks[0].op for stage in model.layers]
    assert [op.core_for(torch.empty(1, op.d_inner, 2, 2, device="cuda")) for op in ops] == ["fused"] * 4


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_v0_ss2d_module_matches_unfused(dtype):
    """A vanilla VMamba (v0) SS2D block, 16 states, fused core vs the unfused one under autocast (the unfused path
    casts its scan inputs to fp32, as v0 does, but rounds the projections to the autocast dtype)."""
    torch.manual_seed(0)
    module = SS2D(d_model=48, d_state=16, ssm_ratio=2.0, forward_type="v0", core="fused").cuda()
    with torch.no_grad():
        module.Ds.normal_()
    assert module.core_for(torch.empty(1, module.d_inner, 2, 2, device="cuda")) == "fused"
    x = torch.randn(2, 13, 10, 48, device="cuda")
    assert_module_cores_agree(module, x, dtype)


@pytest.mark.cuda
def test_torch_compile_fused_ss2d_module():
    torch.manual_seed(0)
    module = SS2D(d_model=32, d_state=1, ssm_ratio=2.0, forward_type="v05_noz", conv_bias=False,
                  channel_first=True).cuda()
    x = torch.randn(2, 32, 11, 9, device="cuda")
    y_eager, grads_eager = ss2d_module_grads(module, x, "fused", torch.float16)
    compiled = torch.compile(module, fullgraph=True)
    y, grads = ss2d_module_grads(compiled, x, None, torch.float16)
    assert_close(y, y_eager, 1e-3, 1e-3, "y")
    for g, g_eager in zip(grads, grads_eager):
        assert_close(g, g_eager, 1e-3, 1e-3)
