"""CPU tests of the selective scan: the chunked torch path against the naive float64 loop, gradients,
validation, empty inputs, and the op registration (torch.compile, jit trace, autocast)."""

import pytest
import torch

import selective_scan
from selective_scan import scan_flops, selective_scan_fn, selective_scan_ref
from selective_scan import torch_scan
from selective_scan.torch_scan import CHUNK, chunk_length, linear_scan_time_major


def make_inputs(batch, channels, length, d_state, groups, delta_rows=None, bias_len=None, dtype=torch.float64,
                with_D=True, seed=0):
    """Inputs as in mamba's selective-scan reference test (A = -0.5 rand, delta = 0.5 rand, bias = 0.5 rand,
    rest randn)."""
    g = torch.Generator().manual_seed(seed)
    delta_rows = delta_rows or channels
    u = torch.randn(batch, channels, length, generator=g, dtype=dtype)
    delta = 0.5 * torch.rand(batch, delta_rows, length, generator=g, dtype=dtype)
    A = -0.5 * torch.rand(channels, d_state, generator=g, dtype=dtype)
    B = torch.randn(batch, groups, d_state, length, generator=g, dtype=dtype)
    C = torch.randn(batch, groups, d_state, length, generator=g, dtype=dtype)
    D = torch.randn(channels, generator=g, dtype=dtype) if with_D else None
    delta_bias = 0.5 * torch.rand(bias_len, generator=g, dtype=dtype) if bias_len else None
    return u, delta, A, B, C, D, delta_bias


def grads_of(fn, inputs, y_weight, state_weight):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y, last = fn(*leaves)
    loss = (y * y_weight).sum() + (last * state_weight).sum()
    diff = [t for t in leaves if t is not None]
    return y.detach(), last.detach(), torch.autograd.grad(loss, diff)


CASES = [
    # batch, channels, L, N, groups, delta_rows, bias_len, with_D, softplus
    (2, 8, 1, 1, 4, None, 8, True, True),
    (2, 8, 17, 2, 2, None, None, False, False),
    (1, 12, 64, 4, 3, 6, 12, True, True),     # delta groups, per-channel bias
    (2, 8, 300, 1, 4, 4, 4, True, True),      # delta groups, per-delta-row bias, multi-level chunking
    (1, 6, 333, 16, 1, None, 6, True, False),
    (3, 4, CHUNK * CHUNK + 1, 3, 4, None, 4, False, True),
]


@pytest.mark.parametrize("case", CASES, ids=[f"L{c[2]}-N{c[3]}-G{c[4]}" for c in CASES])
def test_torch_path_matches_loop_float64(case):
    batch, channels, length, d_state, groups, delta_rows, bias_len, with_D, softplus = case
    inputs = make_inputs(batch, channels, length, d_state, groups, delta_rows, bias_len, with_D=with_D)
    g = torch.Generator().manual_seed(1)
    y_weight = torch.randn(batch, channels, length, generator=g, dtype=torch.float64)
    state_weight = torch.randn(batch, channels, d_state, generator=g, dtype=torch.float64)

    def run(fn):
        return lambda *t: fn(*t, delta_softplus=softplus, return_last_state=True)

    y, last, grads = grads_of(run(lambda *t, **k: selective_scan_fn(*t, **k, backend="torch")), inputs,
                              y_weight, state_weight)
    y_ref, last_ref, grads_ref = grads_of(run(selective_scan_ref), inputs, y_weight, state_weight)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    names = [n for n, t in zip("u delta A B C D delta_bias".split(), inputs) if t is not None]
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype,out_float,tol", [
    (torch.float32, True, (6e-4, 2e-3)),
    (torch.float16, False, (3e-3, 5e-3)),
    (torch.bfloat16, False, (3e-2, 5e-2)),
    (torch.bfloat16, True, (6e-4, 2e-3)),
])
def test_low_precision_inputs_match_float64_at_the_scan_tolerance(dtype, out_float, tol):
    inputs64 = make_inputs(2, 8, 200, 2, 4, bias_len=8)
    u, delta, B, C = (t.to(dtype) for t in (inputs64[0], inputs64[1], inputs64[3], inputs64[4]))
    A, D, bias = (t.float() for t in (inputs64[2], inputs64[5], inputs64[6]))
    y = selective_scan_fn(u, delta, A, B, C, D, bias, True, out_float, backend="torch")
    assert y.dtype == (torch.float32 if out_float else dtype)
    y_ref = selective_scan_ref(u, delta, A, B, C, D, bias, True)  # same rounded inputs, float64 math
    torch.testing.assert_close(y.double(), y_ref, rtol=tol[0], atol=tol[1])


def test_no_overflow_with_large_decay():
    """dt*|A| far beyond exp's range in a cumulative-sum formulation: h must stay finite and exact."""
    u, delta, A, B, C, D, _ = make_inputs(1, 4, 500, 16, 2)
    A = -torch.arange(1, 17, dtype=torch.float64).repeat(4, 1)  # v0 models: A down to -16
    delta = 5.0 + delta * 10
    y, last = selective_scan_fn(u.float(), delta.float(), A.float(), B.float(), C.float(), D.float(),
                                delta_softplus=True, return_last_state=True, backend="torch")
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, D, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.double(), last_ref, rtol=1e-4, atol=1e-4)


def _compare_with_loop(inputs, softplus, y_tol=1e-10, grad_tol=1e-9, seed=1):
    batch, channels, length = inputs[0].shape
    d_state = inputs[2].shape[1]
    g = torch.Generator().manual_seed(seed)
    y_weight = torch.randn(batch, channels, length, generator=g, dtype=torch.float64)
    state_weight = torch.randn(batch, channels, d_state, generator=g, dtype=torch.float64)

    def run(fn):
        return lambda *t: fn(*t, delta_softplus=softplus, return_last_state=True)

    y, last, grads = grads_of(run(lambda *t, **k: selective_scan_fn(*t, **k, backend="torch")), inputs,
                              y_weight, state_weight)
    ref_inputs = [None if t is None else t.double() for t in inputs]
    y_ref, last_ref, grads_ref = grads_of(run(selective_scan_ref), ref_inputs, y_weight, state_weight)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
    torch.testing.assert_close(y.double(), y_ref, rtol=y_tol, atol=y_tol)
    torch.testing.assert_close(last.double(), last_ref, rtol=y_tol, atol=y_tol)
    names = [n for n, t in zip("u delta A B C D delta_bias".split(), inputs) if t is not None]
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=grad_tol, atol=grad_tol,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


def _unsafe_fraction(delta, bias, A, softplus):
    """Fraction of (row, chunk) pairs that take the stable path."""
    dt = delta + bias[:, None]
    dt = torch.nn.functional.softplus(dt) if softplus else dt
    chunks = torch_scan._Chunks(dt, A, torch_scan._monotone(A, dt, softplus))
    total = chunks.e.shape[0] * chunks.e.shape[1]
    return 0.0 if chunks.unsafe is None else chunks.unsafe[0].numel() / total


def test_chunk_length_policy():
    assert chunk_length(1) == 1 and chunk_length(49) == 49 and chunk_length(64) == 64  # one chunk
    assert chunk_length(3136) == 16 and chunk_length(784) == 16 and chunk_length(196) == 14  # divisors
    assert chunk_length(331) == torch_scan.PREFERRED_CHUNK  # prime: padded


MIXED_CASES = [
    # L, N, softplus: one chunk / divisor chunks / padded chunks; N = 1 (one matmul per channel) and N > 1
    (60, 1, True),
    (336, 1, True),
    (331, 1, True),
    (210, 16, True),
    (67, 4, False),
]


@pytest.mark.parametrize("length,d_state,softplus", MIXED_CASES, ids=[f"L{c[0]}-N{c[1]}" for c in MIXED_CASES])
def test_safe_and_unsafe_chunks_match_loop_float64(length, d_state, softplus):
    """Bursts of large dt * |A| (A down to -16, as in the v0 models) make some chunks exceed LOG_SPAN_LIMIT:
    those take the stable step-by-step path, the rest the closed form; both must be exact."""
    u, delta, A, B, C, D, bias = make_inputs(2, 8, length, d_state, 4, bias_len=8)
    A = -torch.linspace(0.05, 16.0, 8 * d_state, dtype=torch.float64).view(8, d_state)
    burst = torch.zeros(length, dtype=torch.float64)
    burst[length // 3: length // 3 + 5] = 12.0  # dt*|A| up to ~200 per step there
    burst[-3:] = 30.0  # and at the very end (padding region of the last chunk)
    delta = delta + burst
    assert 0 < _unsafe_fraction(delta, bias, A, softplus) < 1
    _compare_with_loop((u, delta, A, B, C, D, bias), softplus)


def test_non_monotone_decays_match_loop_float64():
    """A > 0 somewhere and dt < 0 (no softplus): chunk-local cumsums are not monotone; the safety check then
    looks at both extremes of every chunk."""
    u, delta, A, B, C, D, bias = make_inputs(1, 6, 150, 2, 3, bias_len=6)
    g = torch.Generator().manual_seed(5)
    A = 0.6 * torch.rand(6, 2, generator=g, dtype=torch.float64) - 0.4
    delta = 4.0 * torch.rand(1, 6, 150, generator=g, dtype=torch.float64) - 2.0
    delta[..., 40:48] = 40.0  # a burst: |dt * A| up to 16 per step, some chunks exceed the limit
    assert not torch_scan._monotone(A, delta, False) and 0 < _unsafe_fraction(delta, bias, A, False) < 1
    _compare_with_loop((u, delta, A, B, C, D, bias), softplus=False, y_tol=1e-9, grad_tol=1e-8)


def test_softplus_threshold_branch_matches_loop_float64():
    u, delta, A, B, C, D, bias = make_inputs(1, 4, 90, 1, 2, bias_len=4)
    delta[..., 10:20] = 25.0  # x > 20: softplus(x) = x, gradient 1
    _compare_with_loop((u, delta, A, B, C, D, bias), softplus=True)


@pytest.mark.parametrize("d_state", [1, 16])
def test_float32_with_large_decays_matches_float64(d_state):
    """fp32 with chunk spreads up to the limit and beyond: forward and gradients at tight tolerances."""
    u, delta, A, B, C, D, bias = make_inputs(1, 8, 400, d_state, 2, bias_len=8)
    A = -torch.linspace(0.5, 16.0, 8 * d_state, dtype=torch.float64).view(8, d_state)
    delta = 3.0 * delta - 1.0  # dt in (0.3, 1.2): spreads of 16 steps from ~3 to ~300
    inputs = [t.float() for t in (u, delta, A, B, C, D, bias)]
    _compare_with_loop(inputs, softplus=True, y_tol=2e-5, grad_tol=2e-4)


def test_reduction_path_without_matmuls(monkeypatch):
    """The cumsum/sum path used off CPU or under a reduced float32 matmul precision (TF32/bf16 matmuls would
    spoil the oracle): same results."""
    monkeypatch.setattr(torch_scan, "_use_matmul", lambda x: False)
    u, delta, A, B, C, D, bias = make_inputs(2, 8, 331, 1, 4, bias_len=8)
    delta = delta.clone()
    delta[..., 100:104] = 40.0  # some unsafe chunks too
    _compare_with_loop((u, delta, A * 4, B, C, D, bias), softplus=True)
    test_torch_path_matches_loop_float64(CASES[4])


@pytest.mark.slow
def test_gradcheck_float64_unsafe_chunks():
    u, delta, A, B, C, D, bias = make_inputs(1, 2, 70, 2, 1, bias_len=2)
    delta = delta.clone()
    delta[..., 30:34] = 30.0
    A = A * 8
    assert 0 < _unsafe_fraction(delta, bias, A, True) < 1
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]

    def fn(*t):
        return selective_scan_fn(*t, delta_softplus=True, return_last_state=True, backend="torch")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_linear_scan_against_sequential_loop():
    g = torch.Generator().manual_seed(3)
    for length in (1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK * CHUNK + 7):
        a = torch.rand(length, 3, generator=g, dtype=torch.float64)
        b = torch.randn(length, 3, generator=g, dtype=torch.float64)
        h = linear_scan_time_major(a, b)
        expected, state = [], torch.zeros(3, dtype=torch.float64)
        for t in range(length):
            state = a[t] * state + b[t]
            expected.append(state)
        torch.testing.assert_close(h, torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_gradcheck_float64():
    u, delta, A, B, C, D, bias = make_inputs(1, 4, 37, 2, 2, delta_rows=2, bias_len=4)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, bias)]

    def fn(*t):
        y, last = selective_scan_fn(*t, delta_softplus=True, return_last_state=True, backend="torch")
        return y, last

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_non_contiguous_inputs():
    u, delta, A, B, C, D, bias = make_inputs(2, 8, 40, 2, 4, bias_len=8, dtype=torch.float32)
    u_nc = u.transpose(1, 2).contiguous().transpose(1, 2)
    B_nc = B.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    A_nc = A.t().contiguous().t()
    assert not (u_nc.is_contiguous() or B_nc.is_contiguous() or A_nc.is_contiguous())
    expected = selective_scan_fn(u, delta, A, B, C, D, bias, True, backend="torch")
    got = selective_scan_fn(u_nc, delta, A_nc, B_nc, C, D, bias, True, backend="torch")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("batch,length", [(0, 10), (2, 0)])
def test_empty_inputs(batch, length):
    u, delta, A, B, C, D, bias = make_inputs(batch, 4, length, 2, 2, bias_len=4, dtype=torch.float32)
    u.requires_grad_()
    y, last = selective_scan_fn(u, delta, A, B, C, D, bias, True, return_last_state=True)
    assert y.shape == (batch, 4, length) and last.shape == (batch, 4, 2)
    assert torch.all(last == 0)
    y.sum().backward()
    assert u.grad.shape == u.shape


def _valid():
    return dict(zip("u delta A B C D delta_bias".split(),
                    make_inputs(2, 8, 10, 2, 4, bias_len=8, dtype=torch.float32)))


@pytest.mark.parametrize("name,value,error,match", [
    ("u", torch.zeros(2, 8), ValueError, "`u` must have 3"),
    ("delta", torch.zeros(2, 3, 10), ValueError, "`delta`"),
    ("delta", torch.zeros(2, 8, 11), ValueError, "`delta`"),
    ("A", torch.zeros(8, 2, 1), ValueError, "`A` must have 2"),
    ("A", torch.zeros(6, 2), ValueError, "`A`"),
    ("B", torch.zeros(2, 3, 2, 10), ValueError, "groups"),
    ("B", torch.zeros(2, 4, 3, 10), ValueError, "`B`"),
    ("C", torch.zeros(2, 2, 2, 10), ValueError, "`C`"),
    ("D", torch.zeros(7), ValueError, "`D`"),
    ("delta_bias", torch.zeros(5), ValueError, "`delta_bias`"),
    ("u", torch.zeros(2, 8, 10, dtype=torch.int32), TypeError, "`u` has unsupported dtype"),
    ("B", "not a tensor", TypeError, "`B` must be a torch.Tensor"),
])
def test_validation_names_the_argument(name, value, error, match):
    kwargs = _valid()
    kwargs[name] = value
    with pytest.raises(error, match=match):
        selective_scan_fn(**kwargs)


def test_backend_errors():
    kwargs = _valid()
    with pytest.raises(ValueError, match="`backend`"):
        selective_scan_fn(**kwargs, backend="bogus")
    if not selective_scan.cuda_available():
        with pytest.raises(RuntimeError, match="backend='cuda'.*unavailable"):
            selective_scan_fn(**kwargs, backend="cuda")


def test_scan_flops_rule():
    assert scan_flops(128, 3136, 384, 1) == 9 * 128 * 3136 * 384 + 128 * 384 * 3136
    assert scan_flops(2, 10, 8, 16, with_D=False) == 9 * 2 * 10 * 8 * 16


def test_build_info_is_one_line():
    info = selective_scan.build_info()
    assert info and "\n" not in info
    assert info.startswith("CPU kernels for") or info.startswith("extension not importable")


def test_jit_trace_records_the_op_name():
    kwargs = _valid()
    traced = torch.jit.trace(lambda u, delta: selective_scan_fn(u, delta, kwargs["A"], kwargs["B"], kwargs["C"],
                                                                 kwargs["D"], kwargs["delta_bias"], True),
                             (kwargs["u"], kwargs["delta"]), check_trace=False)
    assert "selective_scan::fwd" in {node.kind() for node in traced.graph.nodes()}


def test_autocast_keeps_input_dtypes():
    kwargs = _valid()
    expected = selective_scan_fn(**kwargs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan_fn(**kwargs, delta_softplus=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    kwargs = {k: v.requires_grad_() if v is not None else v for k, v in _valid().items()}

    def fn(u, delta, A, B, C, D, delta_bias):
        y, last = selective_scan_fn(u, delta, A, B, C, D, delta_bias, delta_softplus=True, return_last_state=True)
        return (y * y).sum() + last.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(**kwargs)
    grads = torch.autograd.grad(loss, list(kwargs.values()))
    loss_ref = fn(**kwargs)
    grads_ref = torch.autograd.grad(loss_ref, list(kwargs.values()))
    torch.testing.assert_close(loss, loss_ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)
