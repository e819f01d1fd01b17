"""The fused SS2D core in Triton (selective_scan/triton_ss2d.py): the forward and every gradient of the ops'
contract against the float64 reference (ss2d.scan_routes_reference) at the tolerances test_ss2d.py holds the fused
CUDA kernels to. Here the Triton interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1, in a subprocess:
the variable must be set before triton is imported); the tests marked cuda compile them for a GPU and compare them
with the CUDA extension at VMamba-T's stage shapes and a detection-size map."""

import os
import pathlib
import re
import subprocess
import tempfile
import textwrap
import zlib

import pytest
import torch

import selective_scan
from selective_scan import ss2d, triton_ss2d
from test_ss2d import PARAM_NAMES, check_op, make_params

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (batch, D, H, W, dt rank, d_state, dtype, routes per program): small maps with odd sides and H != W (one of them
# 1), each dtype, dt ranks from 1 to 66 (the dt projection's slices of 16 ranks: one partial slice, exact slices,
# several with a partial last one), d_state 1 (the v2 models), 3 (padded states) and 16 (the v0 models), one channel
# block with masked channels or two, routes of one chunk, of several with a partial last one and of exact chunks,
# programs walking all four routes into one map or one route each.
CASES = {
    "fp32-R6-two-samples": (2, 13, 5, 7, 6, 1, F32, 4),
    "fp16-R24-two-blocks": (1, 40, 3, 7, 24, 1, F16, 4),
    "bf16-R48-one-column": (1, 16, 11, 1, 48, 1, BF16, 1),
    "fp32-R66-one-row": (1, 8, 1, 9, 66, 1, F32, 4),
    "fp32-R12-exact-chunks-route-programs": (1, 16, 8, 16, 12, 1, F32, 1),
    "bf16-R1-N3": (1, 12, 5, 6, 1, 3, BF16, 4),
    "fp16-R2-N16-route-programs": (1, 8, 3, 5, 2, 16, F16, 1),
}
# VMamba-T's SS2D cores at 224 px per stage: (D, H, W, dt rank), d_state 1.
STAGES = [(96, 56, 56, 6), (192, 28, 28, 12), (384, 14, 14, 24), (768, 7, 7, 48)]


def op_inputs(batch, dim, height, width, rank, d_state, dtype, device, seed):
    """The fused ops' inputs: x (B, H, W, D) in `dtype`, x_dbl = project(x, W_proj) and SS2D's other parameters."""
    params = make_params(dim, rank, d_state=d_state, seed=seed, device=device)
    x = torch.randn(batch, height, width, dim, device=device, generator=torch.Generator(device).manual_seed(seed))
    x = x.to(dtype)
    return [x, ss2d.project(x, params["x_proj_weight"]).detach()] + [params[k] for k in PARAM_NAMES[1:]]


def output_gradient(x, seed):
    return torch.randn(x.shape, device=x.device, generator=torch.Generator(x.device).manual_seed(seed + 1))


def op_grads(inputs, impl, seed):
    """y and the gradients of the op's six inputs for a fixed random output gradient: `impl` as scan_routes takes it
    ("triton", "op"), or "float64" for the reference from the same (rounded) inputs."""
    dy = output_gradient(inputs[0], seed)
    if impl == "float64":
        leaves = [t.detach().double().requires_grad_() for t in inputs]
        y = ss2d.scan_routes_reference(*leaves)
    else:
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = ss2d.scan_routes(*leaves, impl=impl)
    return y.detach(), list(torch.autograd.grad(y, leaves, dy.to(y.dtype)))


def seed_of(name):
    return zlib.crc32(name.encode()) % 10_000


def check_case(name, device):
    """The kernels walking the case's number of routes per program against the float64 reference; the autograd path
    (scan_routes, routes per program as the kernels choose) against them."""
    batch, dim, height, width, rank, d_state, dtype, routes = CASES[name]
    seed = seed_of(name)
    inputs = op_inputs(batch, dim, height, width, rank, d_state, dtype, device, seed)
    y, ckpt = triton_ss2d.forward(*inputs, routes=routes)
    assert y.dtype == F32 and tuple(ckpt.shape) == triton_ss2d.checkpoint_shape(inputs[0].shape, d_state)
    grads = triton_ss2d.backward(output_gradient(inputs[0], seed), *inputs, ckpt, routes=routes)
    assert all(g.dtype == F32 for g in grads[2:])
    oracle = op_grads(inputs, "float64", seed)
    check_op((y, list(grads)), oracle, dtype)
    check_op(op_grads(inputs, "triton", seed), oracle, dtype)


def check_cases(device):
    for name in CASES:
        check_case(name, device)
        print("checked", name)


def check_errors_and_empty_inputs():
    """Under the interpreter: calls the kernels cannot take raise errors naming the problem; an empty batch gives
    empty outputs and zero gradients."""
    inputs = op_inputs(1, 8, 3, 4, 2, 1, F32, "cpu", 0)

    def rejected(error, match, args, kernel=triton_ss2d.forward):
        try:
            kernel(*args)
        except error as e:
            assert match in str(e), e
        else:
            raise AssertionError(f"accepted: {match}")

    rejected(ValueError, "d_state is 17", op_inputs(1, 8, 3, 4, 2, 17, F32, "cpu", 0))
    rejected(ValueError, "dt rank is 67", op_inputs(1, 8, 3, 4, 67, 1, F32, "cpu", 0))
    rejected(TypeError, "float64", [inputs[0].double(), inputs[1].double()] + inputs[2:])
    rejected(TypeError, "`x_dbl` must be torch.float32, got torch.float16", [inputs[0], inputs[1].half()] + inputs[2:])
    rejected(ValueError, "`x_dbl` must have shape (1, 3, 4, 16), got (1, 3, 4, 15)",
             [inputs[0], inputs[1][..., :-1]] + inputs[2:])
    rejected(ValueError, "`dt_bias` must have shape (4, 8), got (32)", inputs[:3] + [inputs[3].view(-1)] + inputs[4:])
    rejected(ValueError, "`A_log` must have shape (32, N), got (4, 8)",
             inputs[:4] + [inputs[4].view(4, 8)] + inputs[5:])
    rejected(TypeError, "`Ds` must be torch.float32", inputs[:5] + [inputs[5].half()])
    _, ckpt = triton_ss2d.forward(*inputs)
    rejected(ValueError, "a program walks 1 or 4 routes, not 2", inputs + [2])
    rejected(ValueError, "`dy` must have shape (1, 3, 4, 8), got (1, 4, 3, 8)",
             [torch.zeros(1, 4, 3, 8)] + inputs + [ckpt], triton_ss2d.backward)
    rejected(ValueError, "`ckpt` has shape (1, 4, 1, 1, 4)",
             [torch.zeros(inputs[0].shape)] + inputs + [ckpt[..., :4]], triton_ss2d.backward)
    empty = op_inputs(0, 8, 3, 4, 2, 1, F16, "cpu", 0)
    y, grads = op_grads(empty, "triton", 0)
    assert y.shape == (0, 3, 4, 8) and all(not g.any() for g in grads)
    print("errors and empty inputs checked")


def test_interpreted_kernels_match_float64_reference(triton_interpreted_call):
    out = triton_interpreted_call('check_cases("cpu")')
    assert out.split("\n")[:-1] == [f"checked {name}" for name in CASES]


def test_interpreted_errors_and_empty_inputs(triton_interpreted_call):
    assert "errors and empty inputs checked" in triton_interpreted_call("check_errors_and_empty_inputs()")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = op_inputs(1, 8, 3, 4, 2, 1, F32, "cpu", 0)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        triton_ss2d.forward(*inputs)
    with pytest.raises(ValueError, match="`impl` must be one of"):
        ss2d.scan_routes(*inputs, impl="cuda")


def test_chunks_and_limits():
    """The chunk is the checkpoint interval: 32 steps at d_state 1, shorter for more states (the tiles' size); the
    rank limit is the CUDA kernels', so the same models run fused whichever kernel is registered."""
    assert [triton_ss2d.chunk_steps(n) for n in (1, 2, 3, 4, 16)] == [32, 32, 16, 16, 16]
    assert triton_ss2d.checkpoint_shape((2, 5, 7, 13), 1) == (2, 4, 2, 1, 13)
    # 32 channels per program, 16 for narrow maps and for more than 4 states
    assert [triton_ss2d.channel_block(d, n) for d, n in ((768, 1), (768, 4), (768, 8), (768, 16), (8, 1))] == \
        [32, 32, 16, 16, 16]
    assert triton_ss2d.MAX_RANK == ss2d.MAX_RANK


def compiled_for_sm90(kernel, pointers, constants, num_warps):
    """Resource usage ("REG:n STACK:n ...") of `kernel` compiled by Triton for an H100 (sm_90), without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
    sizes = {name: "i32" for name in ("height", "width", "dim", "rank", "n_state", "num_chunks")}
    signature = dict(pointers, **sizes, **{name: "constexpr" for name in constants})
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    with tempfile.TemporaryDirectory() as directory:
        cubin = os.path.join(directory, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin], capture_output=True, text=True, check=True)
    return re.search(r"REG:\d+ STACK:(\d+)", usage.stdout)


@pytest.mark.parametrize("d_state, routes", [(1, 4), (1, 1), (8, 4), (16, 4), (16, 1)])
def test_kernels_compile_for_sm90(d_state, routes):
    """The interpreter does not lower the kernels (nor refuse what the compiler refuses): compile them for an H100
    (Triton's own ptxas, no GPU needed) with fp16 x and the channel block of a wide map, and check that neither
    spills more than a word to local memory (docs/kernels.md: the rank slices, the chunk length, the channel block
    and the warps are chosen for that)."""
    pytest.importorskip("triton")
    constants = dict(BLOCK=triton_ss2d.channel_block(768, d_state), N_PAD=d_state,
                     CHUNK_STEPS=triton_ss2d.chunk_steps(d_state),
                     SLICE=triton_ss2d.RANK_SLICE, ROUTES=routes)
    fp32 = ("w_ptr", "bias_ptr", "A_log_ptr", "Ds_ptr")
    forward = dict(positions_ptr="*i32", x_ptr="*fp16", x_dbl_ptr="*fp16",
                   **{name: "*fp32" for name in fp32 + ("y_ptr", "checkpoint_ptr")})
    backward = dict(positions_ptr="*i32", dy_ptr="*fp32", x_ptr="*fp16", x_dbl_ptr="*fp16",
                    dx_ptr="*fp16" if routes == 4 else "*fp32",
                    **{name: "*fp32" for name in fp32 + ("checkpoint_ptr", "dx_sum_ptr", "d_rows_ptr", "dw_ptr",
                                                         "dbias_ptr", "dA_log_ptr", "dDs_ptr")})
    for kernel, pointers, warps in zip((triton_ss2d._ss2d_fwd_kernel, triton_ss2d._ss2d_bwd_kernel),
                                       (forward, backward), triton_ss2d.launch_warps(d_state)):
        usage = compiled_for_sm90(kernel, {name: pointers[name] for name in kernel.arg_names if name in pointers},
                                  constants, warps)
        assert usage is not None, kernel.fn.__name__
        # at most one 8-byte value: Triton 3.8 puts one on the stack in the d_state-1 backward at 4 warps (the
        # faster setting on an H100); the spills this guards against are hundreds of bytes
        assert int(usage.group(1)) <= 8, (kernel.fn.__name__, usage.group(0))


def test_the_extensions_cuda_kernels_stay_the_fused_ops_kernels():
    if not selective_scan.extension_built():
        pytest.skip(f"the extension has no CUDA kernels ({selective_scan.build_info()})")
    assert not ss2d.triton_is_cuda_kernel()
    assert "the fused CUDA kernels support at most 16" in ss2d.fused_unsupported_reason(6, 17)  # their limits


WITHOUT_EXTENSION = textwrap.dedent("""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from selective_scan import ops, ss2d, triton_ss2d

    def has_cuda_kernel(op):
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"selective_scan_ss2d::{op}", "CUDA")

    cuda = torch.device("cuda")
    fake = FakeTensorMode()
    with fake:  # CUDA tensors as torch.compile sees them: enough for the dispatch rule
        x = torch.empty(2, 5, 7, 12, device="cuda", dtype=torch.float16)
        x_cf = x.permute(0, 3, 1, 2)
    # the Triton kernels are the fused ops' CUDA kernel from the import on, as they are the scan's
    assert not ops.extension_built() and ss2d.triton_is_cuda_kernel() and ops.triton_is_cuda_kernel()
    assert has_cuda_kernel("fwd") and has_cuda_kernel("bwd") and ss2d.kernel_runs_on(cuda)
    assert ss2d.select_core(x_cf, 6, 1) == "fused" and ss2d.select_core(x_cf, 6, 16) == "fused"
    assert ss2d.fused_unsupported_reason(66, 16, x=x) is None
    assert "d_state is 17" in ss2d.fused_unsupported_reason(6, 17, x=x)
    assert "dt rank 67" in ss2d.fused_unsupported_reason(67, 1, x=x)
    assert ss2d.select_core(x_cf, 6, 17) == "unfused"
    # without x the CUDA kernels' limits still (the same numbers, their message)
    assert "the fused CUDA kernels support at most 16" in ss2d.fused_unsupported_reason(6, 17)
    with fake:  # what torch.compile sees: the Triton forward's outputs
        x_dbl = torch.empty(2, 5, 7, 4 * (6 + 2 * 3), device="cuda", dtype=torch.float16)
        params = [torch.empty(4, 12, 6, device="cuda"), torch.empty(4, 12, device="cuda"),
                  torch.empty(48, 3, device="cuda"), torch.empty(48, device="cuda")]
        y, ckpt = torch.ops.selective_scan_ss2d.fwd(x, x_dbl, *params)
    assert y.dtype == torch.float32 and tuple(y.shape) == (2, 5, 7, 12)
    assert tuple(ckpt.shape) == triton_ss2d.checkpoint_shape(x.shape, 3) == (2, 4, 3, 3, 12)
    print("registered")
""")


def test_registration_as_the_missing_cuda_kernel(triton_interpreted):
    """Without the extension (as installed where it cannot be built) the Triton kernels are the fused ops' CUDA
    kernel from the import on: CUDA tensors take the fused core by default (the v0 models' d_state 16 too), and the
    fake kernel gives their checkpoints."""
    assert triton_interpreted(WITHOUT_EXTENSION, extension=False).split() == ["registered"]


# ------------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_cases_match_float64_reference(name):
    check_case(name, "cuda")


def check_against_extension(inputs, dtype, seed):
    """The Triton kernels against the float64 reference, then (where the extension has CUDA kernels) against it."""
    fused = op_grads(inputs, "triton", seed)
    check_op(fused, op_grads(inputs, "float64", seed), dtype)
    if not selective_scan.cuda_available():
        pytest.skip(f"the CUDA extension is not built ({selective_scan.build_info()})")
    check_op(fused, op_grads(inputs, "op", seed), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("stage", range(len(STAGES)))
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["fp16", "bf16", "fp32"])
def test_cuda_stage_shapes_match_float64_and_the_extension(dtype, stage):
    dim, height, width, rank = STAGES[stage]
    seed = seed_of(f"stage{stage}-{dtype}")
    check_against_extension(op_inputs(2, dim, height, width, rank, 1, dtype, "cuda", seed), dtype, seed)


@pytest.mark.cuda
def test_cuda_detection_size_map():
    """A Mask R-CNN stage-1 map at 1333x800 input (200 x 336), batch 1: 1050 chunks per route."""
    check_against_extension(op_inputs(1, 24, 200, 336, 2, 1, F16, "cuda", 8), F16, 8)
