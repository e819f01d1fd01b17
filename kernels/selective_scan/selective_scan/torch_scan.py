"""Selective scan in plain PyTorch: the reference implementation (what runs without the compiled extension, and for
float64) and the oracle the compiled kernels are tested against.

The recurrence h_t = a_t * h_{t-1} + b_t with a_t = exp(x_t), x_t = dt_t * A, is evaluated in chunks of T
steps laid along the last (contiguous) axis, (rows, chunks, T). Inside a chunk, with the chunk-local
inclusive cumulative sum s_t = x_1 + ... + x_t and e_t = exp(s_t), the zero-initialised state is the closed
form

    h_t = e_t * sum_{k <= t} b_k / e_k            (one cumsum of b / e, one multiply)

and the backward (reverse) scan g_t = src_t + a_{t+1} g_{t+1} is

    g_t = (1 / e_t) * sum_{k >= t} e_k src_k       (one reverse cumsum of e * src, one divide).

Both are exact algebra; they are only safe in floating point while every |s_t| of the chunk stays below
LOG_SPAN_LIMIT (e_t and 1 / e_t representable, rounding of s_t small). That is checked per chunk from the
cumsum itself (for dt * A <= 0, the usual case, one strided read of the chunk ends). Chunks that fail the
check are recomputed with the stable step-by-step scan (`linear_scan_time_major`: it only ever multiplies
by a_t, so it cannot overflow however large dt * |A| gets), and nothing else is. The chunk carries (state
at every chunk end, from the chunk sums and the chunk decays exp(S_c)) go through the same stable scan on
the small (rows, chunks) tensors and are folded into the first (forward) or last (reverse) entry of each
chunk before its cumsum, so they cost no extra full pass.

Cumulative sums within a chunk are products with a triangular matrix of ones (faster than torch.cumsum on
CPU for these lengths, and the reverse one needs no flip); for N = 1 the multiply by A is folded into that
matmul. Scratch buffers are reused in place. The model case N = 1 never materialises anything larger than
(batch, channels, L). On the CPU (1 thread) this is about 4x faster forward and 3x forward+backward than a
step-by-step chunked scan at VMamba-T's stage shapes (benchmarks/bench_scan.py --device cpu).
"""

from __future__ import annotations

import math

import torch

# Chunk length of the stable fallback scan (`linear_scan_time_major`).
CHUNK = 16
SOFTPLUS_THRESHOLD = 20.0
# A chunk uses the closed form only if every |chunk-local cumsum of dt*A| is at most this. exp(+-40) is far
# inside the fp32 range (exp overflows at 88.7) and the relative error it adds to a term is about
# LOG_SPAN_LIMIT * eps * sqrt(T) (~1e-5 in fp32 at the limit, ~1e-14 in fp64).
LOG_SPAN_LIMIT = 40.0
# Chunk length of the closed form: sequences up to SINGLE_CHUNK_MAX are one chunk; longer ones use the divisor
# of L in [MIN_CHUNK, MAX_CHUNK] closest to PREFERRED_CHUNK (no padding), else PREFERRED_CHUNK (padded).
# Cumulative sums within a chunk are products with a triangular matrix of ones: for these lengths that is
# faster than torch.cumsum on CPU, and the reverse one needs no flip. (Measured with bench_scan.py.)
SINGLE_CHUNK_MAX = 64
PREFERRED_CHUNK = 16
MIN_CHUNK, MAX_CHUNK = 8, 32


def linear_scan_time_major(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """h[t] = a[t] * h[t-1] + b[t] along dim 0 with h[-1] = 0; a and b have the same shape (L, ...).

    The stable scheme: a short loop over `chunk` steps inside every chunk at once, the chunk carries scanned
    recursively, then one fix-up pass. Every step only multiplies by a[t]: no overflow for any decay."""
    length = a.shape[0]
    if length <= chunk:
        h = b.clone()
        for t in range(1, length):
            h[t].addcmul_(a[t], h[t - 1])
        return h
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        # Padding at the end (a = 1, b = 0) cannot change any earlier state.
        pad_shape = (pad,) + tuple(a.shape[1:])
        a = torch.cat([a, a.new_ones(pad_shape)])
        b = torch.cat([b, b.new_zeros(pad_shape)])
    a = a.reshape((num_chunks, chunk) + tuple(a.shape[1:]))
    h = b.reshape(a.shape).clone()
    for t in range(1, chunk):
        h[:, t].addcmul_(a[:, t], h[:, t - 1])
    decay_in_chunk = torch.cumprod(a, dim=1)
    # State at the end of every chunk, from the chunk-local end states and the chunks' total decays.
    chunk_end_state = linear_scan_time_major(decay_in_chunk[:, -1], h[:, -1], chunk)
    h[1:].addcmul_(decay_in_chunk[1:], chunk_end_state[:-1].unsqueeze(1))
    return h.reshape((num_chunks * chunk,) + tuple(h.shape[2:]))[:length]


# ------------------------------------------------------------------------------------ chunked closed form


def chunk_length(length: int) -> int:
    """Chunk length of the closed form for a sequence of `length` (see PREFERRED_CHUNK)."""
    if length <= SINGLE_CHUNK_MAX:
        return max(length, 1)
    divisors = [t for t in range(MIN_CHUNK, MAX_CHUNK + 1) if length % t == 0]
    if not divisors:
        return PREFERRED_CHUNK
    return min(divisors, key=lambda t: (abs(t - PREFERRED_CHUNK), -t))


_TRIANGLES: dict = {}


def _triangle(length: int, dtype: torch.dtype, device: torch.device, reverse: bool) -> torch.Tensor:
    key = (length, dtype, device, reverse)
    m = _TRIANGLES.get(key)
    if m is None:
        ones = torch.ones(length, length, dtype=dtype, device=device)
        # x @ triu: out_t = sum_{k <= t} x_k; x @ tril: out_t = sum_{k >= t} x_k.
        m = _TRIANGLES[key] = torch.tril(ones) if reverse else torch.triu(ones)
    return m


def _use_matmul(x: torch.Tensor) -> bool:
    """Sums as matmuls only where a matmul is exact fp32/fp64 arithmetic and faster: on CPU at the "highest"
    float32 matmul precision (elsewhere TF32/bf16 matmuls could be in effect, and GPU reductions are fast)."""
    return x.device.type == "cpu" and (x.dtype == torch.float64 or torch.get_float32_matmul_precision() == "highest")


def _cumsum_last(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Cumulative sum along the last axis (from the end when reverse), as a new tensor."""
    if _use_matmul(x):
        return torch.matmul(x, _triangle(x.shape[-1], x.dtype, x.device, reverse))
    return x.flip(-1).cumsum(-1).flip(-1) if reverse else x.cumsum(-1)


def _sum_last(x: torch.Tensor) -> torch.Tensor:
    """x.sum(-1), on CPU as a matrix-vector product (much faster than a reduction over a short last axis)."""
    if _use_matmul(x):
        return torch.matmul(x, x.new_ones(x.shape[-1], 1)).squeeze(-1)
    return x.sum(-1)


def _sum_dim2(x: torch.Tensor) -> torch.Tensor:
    """(a, b, P, ...) -> (a, b, ...) summed over dim 2, on CPU as a batched vector-matrix product."""
    if not _use_matmul(x):
        return x.sum(2)
    a, b, p = x.shape[:3]
    rest = x.shape[3:]
    flat = x.reshape(a * b, p, -1)
    return torch.matmul(x.new_ones(1, p), flat).view((a, b) + tuple(rest))


def _pad_last(x: torch.Tensor, padded_length: int, value: float) -> torch.Tensor:
    pad = padded_length - x.shape[-1]
    if pad == 0:
        return x
    return torch.cat([x, x.new_full(x.shape[:-1] + (pad,), value)], -1)


class _Chunks:
    """Chunk-local cumulative log decays of x = dt * A, laid out (rows, chunks, T), shared by the forward and
    the reverse scan: e = exp(s) with s the chunk-local inclusive cumsum of x, the chunk decays
    E = e[..., -1], and the chunks where the closed form is unsafe (some |s_t| > LOG_SPAN_LIMIT).

    dt is (batch, channels, L) and A (channels, N); s = A * cumsum(dt), so the cumsum runs over
    (batch, channels, L) whatever N is (for N = 1 the multiply is folded into the matmul). Rows are
    (batch, channels, N) flattened. dt is not kept: the caller may overwrite it afterwards."""

    def __init__(self, dt: torch.Tensor, A: torch.Tensor, monotone: bool):
        batch, channels, length = dt.shape
        n_state = A.shape[1]
        self.length = length
        self.chunk = chunk = chunk_length(length)
        self.num_chunks = num_chunks = -(-length // chunk)
        self.padded = num_chunks * chunk
        self.rows = rows = batch * channels * n_state
        dt = _pad_last(dt, self.padded, 0.0).view(batch, channels, num_chunks, chunk)
        A5 = A.view(1, channels, n_state, 1, 1)
        if n_state == 1 and num_chunks >= 2 * chunk and _use_matmul(dt):
            # s = dt @ (A_c * triu(ones)): cumsum and multiply by A in one batched matmul per channel
            weights = _triangle(chunk, dt.dtype, dt.device, False) * A.view(channels, 1, 1)
            s = dt.new_empty(batch, channels, num_chunks, chunk)
            for i in range(batch):
                torch.bmm(dt[i], weights, out=s[i])
        elif n_state == 1:
            s = _cumsum_last(dt).mul_(A.view(1, channels, 1, 1))
        else:
            s = _cumsum_last(dt).unsqueeze(2) * A5
        s = s.view(rows, num_chunks, chunk)
        self.unsafe = self.unsafe_log_decay = None
        if monotone:  # every x <= 0: s is non-increasing, its extreme is the chunk's last entry
            unsafe = s[..., -1] < -LOG_SPAN_LIMIT if bool(s[..., -1].amin() < -LOG_SPAN_LIMIT) else None
        else:
            unsafe = (s.amin(-1) < -LOG_SPAN_LIMIT) | (s.amax(-1) > LOG_SPAN_LIMIT)
            unsafe = unsafe if bool(unsafe.any()) else None
        if unsafe is not None:
            self.unsafe = unsafe.nonzero(as_tuple=True)
            x = dt.unsqueeze(2) * A5  # only on this rare path: the (rows, chunks, T) log decays
            self.unsafe_log_decay = x.reshape(rows, num_chunks, chunk)[self.unsafe]
        self.e = s.exp_()
        self.chunk_decay = self.e[..., -1]

    def chunked(self, x: torch.Tensor) -> torch.Tensor:
        return _pad_last(x, self.padded, 0.0).view(x.shape[0], self.num_chunks, self.chunk)

    def unchunked(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.padded)[:, :self.length]

    def _chunk_scan(self, inputs: torch.Tensor, reverse: bool) -> torch.Tensor:
        """Stable scan over the chunk axis of (rows, chunks): c_k = E_k c_{k-1} + inputs_k (reverse: from the
        last chunk down, c_k = E_k c_{k+1} + inputs_k). Runs time-major with an inner chunk of about
        sqrt(chunks) (fewest small ops)."""
        key = "_decay_reversed" if reverse else "_decay_forward"
        decay = getattr(self, key, None)
        if decay is None:
            decay = self.chunk_decay.flip(-1) if reverse else self.chunk_decay
            decay = decay.t().contiguous()
            setattr(self, key, decay)
        inputs = (inputs.flip(-1) if reverse else inputs).t().contiguous()
        inner = max(4, math.isqrt(self.num_chunks))
        out = linear_scan_time_major(decay, inputs, inner).t()
        return out.flip(-1) if reverse else out

    def scan(self, b: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """h (rows, L) with h_t = exp(x_t) h_{t-1} + b_t, h_{-1} = 0; b is (rows, L), overwritten if consume."""
        padded = self.padded != self.length
        b = self.chunked(b)
        if self.unsafe is not None:
            decay = self.unsafe_log_decay.exp()
            local = linear_scan_time_major(decay.t().contiguous(), b[self.unsafe].t().contiguous()).t()
        # h_t = e_t * (carry into the chunk + sum_{k <= t in chunk} b_k / e_k)
        w = b.div_(self.e) if consume or padded else b / self.e
        if self.num_chunks > 1:
            local_end = self.chunk_decay * _sum_last(w)
            if self.unsafe is not None:
                local_end[self.unsafe] = local[:, -1]
            end_state = self._chunk_scan(local_end, reverse=False)
            carry = torch.zeros_like(end_state)
            carry[:, 1:] = end_state[:, :-1]
            w[:, 1:, 0] += carry[:, 1:]
        h = _cumsum_last(w).mul_(self.e)
        if self.unsafe is not None:
            if self.num_chunks > 1:
                local = local.addcmul(self.e[self.unsafe], carry[self.unsafe].unsqueeze(-1))
            h[self.unsafe] = local
        return self.unchunked(h)

    def reverse_scan(self, src: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """g (rows, L) with g_t = src_t + exp(x_{t+1}) g_{t+1}, g_L = 0; src is (rows, L), overwritten if
        consume."""
        padded = self.padded != self.length
        src = self.chunked(src)
        if self.unsafe is not None:
            local, carry_factor = _stable_reverse_local(self.unsafe_log_decay, src[self.unsafe])
        # g_t = (1 / e_t) * (sum_{k >= t in chunk} e_k src_k + E_c carry_c), carry_c = a_{c+1,0} g_{c+1,0}
        # entering chunk c from the right: carry_{c-1} = E_c carry_c + sum_k e_{c,k} src_{c,k}.
        weighted = src.mul_(self.e) if consume or padded else src * self.e
        if self.num_chunks > 1:
            total = _sum_last(weighted)
            if self.unsafe is not None:
                total[self.unsafe] = self.e[..., 0][self.unsafe] * local[:, 0]
            into_previous = self._chunk_scan(total, reverse=True)  # carry_{c-1}
            carry = torch.zeros_like(into_previous)
            carry[:, :-1] = into_previous[:, 1:]
            weighted[..., -1].addcmul_(self.chunk_decay, carry)
        g = _cumsum_last(weighted, reverse=True).div_(self.e)
        if self.unsafe is not None:
            if self.num_chunks > 1:
                local.addcmul_(carry_factor, carry[self.unsafe].unsqueeze(-1))
            g[self.unsafe] = local
        return self.unchunked(g)


def _stable_reverse_local(log_decay: torch.Tensor, src: torch.Tensor):
    """For (n, T) rows: the chunk-local reverse scan g_t = src_t + a_{t+1} g_{t+1} (g_T = 0) step by step,
    and exp(x_{t+1} + ... + x_{T-1}), the decay from t to the chunk end, summed without cancellation."""
    decay = log_decay.exp()
    a_reversed = torch.cat([torch.zeros_like(decay[:, :1]), decay.flip(-1)[:, :-1]], -1)
    local = linear_scan_time_major(a_reversed.t().contiguous(), src.flip(-1).t().contiguous()).t().flip(-1)
    tail = log_decay.flip(-1).cumsum(-1).flip(-1)  # sum_{j >= t}
    factor = torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], -1).exp_()
    return local.contiguous(), factor


# ------------------------------------------------------------------------------------------ the operator


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _expand_rows(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(batch, rows, L) -> (batch, channels, L): channel c reads row c // (channels // rows)."""
    batch, rows, length = x.shape
    if rows == channels:
        return x
    return x.unsqueeze(2).expand(batch, rows, channels // rows, length).reshape(batch, channels, length)


def _expand_bias(delta_bias: torch.Tensor, rows: int, channels: int) -> torch.Tensor:
    """delta_bias of length rows (applied before the delta-group broadcast) or channels -> (channels,)."""
    if delta_bias.shape[0] == channels:
        return delta_bias
    return delta_bias.repeat_interleave(channels // rows)


def _time_step(delta, delta_bias, softplus, channels, dtype, keep_pre_activation):
    """Returns (dt, pre-activation or None, dt_is_scratch) with dt (batch, channels, L) in the compute dtype.
    dt_is_scratch: dt is a fresh tensor the caller may overwrite. softplus is F.softplus(x, threshold=20)
    computed as log1p(exp(x)) (about twice as fast on CPU), x where x > 20."""
    x = _expand_rows(delta.to(dtype), channels)
    scratch = x is not delta
    if delta_bias is not None:
        x = x + _expand_bias(delta_bias.to(dtype), delta.shape[1], channels)[:, None]
        scratch = True
    if not softplus:
        return x, x, scratch
    large = bool(x.amax() > SOFTPLUS_THRESHOLD)
    dt = x.exp_() if scratch and not (large or keep_pre_activation) else torch.exp(x)
    dt.log1p_()
    if large:
        dt = torch.where(x > SOFTPLUS_THRESHOLD, x, dt)
    return dt, x if keep_pre_activation else None, True


def _monotone(A: torch.Tensor, dt: torch.Tensor, softplus: bool) -> bool:
    """Every dt * A <= 0 (then chunk-local cumsums are non-increasing)."""
    return bool((A <= 0).all()) and (softplus or bool((dt >= 0).all()))


def _no_autocast(fn):
    """The scan computes in fp32/fp64 whatever autocast region it is called from (its matmuls included)."""
    def wrapper(u, *args, **kwargs):
        with torch.autocast(u.device.type, enabled=False):
            return fn(u, *args, **kwargs)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@_no_autocast
def scan_forward(u, delta, A, Bs, Cs, D, delta_bias, delta_softplus, out_float):
    """Returns y (batch, channels, L) and the last state (batch, channels, N) in fp32 (fp64 for fp64 input)."""
    dtype = _compute_dtype(u, delta, A, Bs, Cs)
    batch, channels, length = u.shape
    groups, n_state = Bs.shape[1], A.shape[1]
    per_group = channels // groups
    out_dtype = dtype if out_float or u.dtype == torch.float64 else u.dtype
    if batch * channels * length == 0:
        return u.new_zeros((batch, channels, length), dtype=out_dtype), u.new_zeros(
            (batch, channels, n_state), dtype=dtype)
    A = A.to(dtype)
    uc = u.to(dtype)
    dt, _, scratch = _time_step(delta, delta_bias, delta_softplus, channels, dtype, keep_pre_activation=False)
    chunks = _Chunks(dt, A, _monotone(A, dt, delta_softplus))
    dtu = dt.mul_(uc) if scratch else dt * uc
    shape5 = (batch, groups, per_group, n_state, length)
    B5 = Bs.to(dtype).view(batch, groups, 1, n_state, length)
    C5 = Cs.to(dtype).view(batch, groups, 1, n_state, length)
    dtu5 = dtu.view(batch, groups, per_group, 1, length)
    b = dtu5.mul_(B5) if n_state == 1 else dtu5 * B5
    h = chunks.scan(b.view(-1, length), consume=True).view(shape5)
    last_state = h[..., -1].reshape(batch, channels, n_state).clone()  # before h is overwritten by y
    if n_state == 1:
        y = h.mul_(C5).view(batch, channels, length)
    else:
        y = torch.mul(h[:, :, :, 0], C5[:, :, :, 0])
        for n in range(1, n_state):
            y.addcmul_(h[:, :, :, n], C5[:, :, :, n])
        y = y.view(batch, channels, length)
    if D is not None:
        y.addcmul_(uc, D.to(dtype)[:, None])
    return y.to(out_dtype).contiguous(), last_state


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(batch, channels, L) x2 -> sum over batch and L of x * y, (channels,), without a full-size product."""
    if _use_matmul(x):
        return torch.einsum("bcl,bcl->c", x, y)
    return (x * y).sum((0, 2))


@_no_autocast
def _scan_backward(u, dy, delta, A, Bs, Cs, D, delta_bias, delta_softplus, dlast_state=None):
    dtype = _compute_dtype(u, delta, A, Bs, Cs)
    batch, channels, length = u.shape
    if batch * channels * length == 0:
        return _zero_grads(u, delta, A, Bs, Cs, D, delta_bias)
    groups, n_state = Bs.shape[1], A.shape[1]
    per_group = channels // groups
    shape5 = (batch, groups, per_group, n_state, length)
    A = A.to(dtype)
    uc = u.to(dtype)
    dy = dy.to(dtype)
    dt, pre_activation, _ = _time_step(delta, delta_bias, delta_softplus, channels, dtype,
                                       keep_pre_activation=delta_softplus)
    chunks = _Chunks(dt, A, _monotone(A, dt, delta_softplus))
    dtu = dt * uc
    B5 = Bs.to(dtype).view(batch, groups, 1, n_state, length)
    C5 = Cs.to(dtype).view(batch, groups, 1, n_state, length)
    A5 = A.view(1, groups, per_group, n_state, 1)
    dtu5 = dtu.view(batch, groups, per_group, 1, length)
    dy5 = dy.view(batch, groups, per_group, 1, length)
    b = dtu5 * B5
    h = chunks.scan(b.view(-1, length)).view(shape5)

    # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: the same chunks scanned backwards in time.
    source = dy5 * C5
    if dlast_state is not None:
        source[..., -1] += dlast_state.to(dtype).view(batch, groups, per_group, n_state)
    g = chunks.reverse_scan(source.view(-1, length), consume=True).view(shape5)

    dCs = _sum_dim2(h * dy5)  # (batch, G, N, L)
    dBs = _sum_dim2(g * dtu5)
    # dL/d(dt*A)_t = g_t a_t h_{t-1} = g_t (h_t - b_t)
    through_decay = h.sub_(b).mul_(g)
    del b
    if n_state == 1:
        dA = _row_dot(through_decay.view(batch, channels, length), dt).view(channels, 1)
        ddt = through_decay.mul_(A5).view(batch, channels, length)
        g_b = g.mul_(B5).view(batch, channels, length)  # dL/d(dt*u)
    else:
        dA = (through_decay * dt.view(batch, groups, per_group, 1, length)).sum((0, 4)).reshape(channels, n_state)
        ddt = (through_decay.mul_(A5)).sum(3).view(batch, channels, length)
        g_b = (g.mul_(B5)).sum(3).view(batch, channels, length)
    ddt.addcmul_(g_b, uc)
    du = g_b.mul_(dt)
    dD = None
    if D is not None:
        du.addcmul_(dy, D.to(dtype)[:, None])
        dD = _row_dot(dy, uc)
    if delta_softplus:
        x = pre_activation
        large = bool(x.amax() > SOFTPLUS_THRESHOLD)
        slope = torch.sigmoid(x) if large else x.sigmoid_()
        if large:
            slope = torch.where(x > SOFTPLUS_THRESHOLD, torch.ones_like(slope), slope)
        ddt.mul_(slope)
    rows = delta.shape[1]
    ddelta_bias = None
    if delta_bias is not None:
        per_channel = _sum_last(ddt).sum(0)
        ddelta_bias = per_channel if delta_bias.shape[0] == channels else per_channel.view(rows, -1).sum(1)
    ddelta = ddt if rows == channels else _sum_dim2(ddt.view(batch, rows, channels // rows, length))
    return (du.to(u.dtype).contiguous(), ddelta.to(delta.dtype).contiguous(), dA.to(A.dtype),
            dBs.to(Bs.dtype).contiguous(), dCs.to(Cs.dtype).contiguous(),
            None if dD is None else dD.to(D.dtype),
            None if ddelta_bias is None else ddelta_bias.to(delta_bias.dtype))


def scan_backward(dy, u, delta, A, Bs, Cs, D, delta_bias, delta_softplus, dlast_state=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of the forward above; dD/ddelta_bias are None
    when D/delta_bias are None. dlast_state, if given, is the gradient flowing into the last state."""
    return _scan_backward(u, dy, delta, A, Bs, Cs, D, delta_bias, delta_softplus, dlast_state)


def _zero_grads(u, delta, A, Bs, Cs, D, delta_bias):
    return (torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(Bs),
            torch.zeros_like(Cs), None if D is None else torch.zeros_like(D),
            None if delta_bias is None else torch.zeros_like(delta_bias))
