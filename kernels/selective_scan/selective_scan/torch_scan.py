"""Selective scan in plain PyTorch: the CPU implementation and the oracle the CUDA kernel is tested against.

The recurrence h_t = a_t * h_{t-1} + b_t (a_t = exp(dt_t * A)) is evaluated with a chunked scan: a short
loop over the fixed chunk length inside every chunk at once, the chunk carries scanned recursively with the
same routine, then one fix-up pass. Every step only multiplies by a_t, so nothing is exponentiated with a
growing argument and there is no overflow however large dt * |A| gets (unlike a log-space cumsum).

Internal layout is time-major, (L, batch, channels, N): a step of the loop then touches one contiguous
block per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Chunk length of the torch scan. Each level of the recursion costs CHUNK small in-place steps and two full
# passes (cumprod, fix-up); 16 keeps both low for the VMamba lengths 49..3136 (measured in bench_scan.py).
CHUNK = 16
SOFTPLUS_THRESHOLD = 20.0


def linear_scan_time_major(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """h[t] = a[t] * h[t-1] + b[t] along dim 0 with h[-1] = 0; a and b have the same shape (L, ...)."""
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


def _time_step(delta, delta_bias, softplus, channels, dtype):
    """Returns (dt, pre-activation) as (batch, channels, L) in the compute dtype."""
    x = _expand_rows(delta.to(dtype), channels)
    if delta_bias is not None:
        x = x + _expand_bias(delta_bias.to(dtype), delta.shape[1], channels)[:, None]
    if softplus:
        return F.softplus(x, beta=1.0, threshold=SOFTPLUS_THRESHOLD), x
    return x, x


def _group_view(x_time_major: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, batch, G, N) -> (L, batch, G, 1, N), broadcastable against (L, batch, G, channels/G, N)."""
    return x_time_major.unsqueeze(3)


def _decays_and_inputs(u, dt, A, Bs, groups, dtype):
    """Time-major a = exp(dt*A) and b = dt*u*B, both (L, batch, G, channels/G, N)."""
    batch, channels, length = u.shape
    per_group = channels // groups
    n_state = A.shape[1]
    dt_tm = dt.permute(2, 0, 1).reshape(length, batch, groups, per_group, 1)
    a = torch.exp(dt_tm * A.to(dtype).view(1, 1, groups, per_group, n_state))
    dtu_tm = (dt * u.to(dtype)).permute(2, 0, 1).reshape(length, batch, groups, per_group, 1)
    Bs_tm = _group_view(Bs.to(dtype).permute(3, 0, 1, 2), groups)
    b = dtu_tm * Bs_tm
    return a, b, dt_tm


def scan_forward(u, delta, A, Bs, Cs, D, delta_bias, delta_softplus, out_float):
    """Returns y (batch, channels, L) and the last state (batch, channels, N) in fp32 (fp64 for fp64 input)."""
    dtype = _compute_dtype(u, delta, A, Bs, Cs)
    batch, channels, length = u.shape
    groups, n_state = Bs.shape[1], A.shape[1]
    out_dtype = dtype if out_float or u.dtype == torch.float64 else u.dtype
    if batch * channels * length == 0:
        return u.new_zeros((batch, channels, length), dtype=out_dtype), u.new_zeros(
            (batch, channels, n_state), dtype=dtype)
    dt, _ = _time_step(delta, delta_bias, delta_softplus, channels, dtype)
    a, b, _ = _decays_and_inputs(u, dt, A, Bs, groups, dtype)
    h = linear_scan_time_major(a, b)
    Cs_tm = _group_view(Cs.to(dtype).permute(3, 0, 1, 2), groups)
    y = (h * Cs_tm).sum(-1).reshape(length, batch, channels).permute(1, 2, 0)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u.to(dtype)
    last_state = h[-1].reshape(batch, channels, n_state)
    return y.to(out_dtype).contiguous(), last_state.contiguous()


def scan_backward(dy, u, delta, A, Bs, Cs, D, delta_bias, delta_softplus, dlast_state=None):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of the forward above; dD/ddelta_bias are None
    when D/delta_bias are None. dlast_state, if given, is the gradient flowing into the last state."""
    dtype = _compute_dtype(u, delta, A, Bs, Cs)
    batch, channels, length = u.shape
    groups, n_state = Bs.shape[1], A.shape[1]
    per_group = channels // groups
    if batch * channels * length == 0:
        return _zero_grads(u, delta, A, Bs, Cs, D, delta_bias)
    dt, pre_activation = _time_step(delta, delta_bias, delta_softplus, channels, dtype)
    a, b, dt_tm = _decays_and_inputs(u, dt, A, Bs, groups, dtype)
    h = linear_scan_time_major(a, b)
    dy = dy.to(dtype)
    dy_tm = dy.permute(2, 0, 1).reshape(length, batch, groups, per_group, 1)
    Cs_tm = _group_view(Cs.to(dtype).permute(3, 0, 1, 2), groups)
    Bs_tm = _group_view(Bs.to(dtype).permute(3, 0, 1, 2), groups)

    # g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1}: the same scan run backwards in time.
    g_source = dy_tm * Cs_tm
    if dlast_state is not None:
        g_source[-1] += dlast_state.to(dtype).reshape(batch, groups, per_group, n_state)
    a_next_reversed = torch.cat([torch.zeros_like(a[:1]), a.flip(0)[:-1]])
    g = linear_scan_time_major(a_next_reversed, g_source.flip(0)).flip(0)

    h_prev = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
    g_through_decay = g * h_prev * a  # dL/d(dt*A) per state
    dA = (g_through_decay * dt_tm).sum((0, 1)).reshape(channels, n_state)
    g_B = (g * Bs_tm).sum(-1, keepdim=True)  # dL/d(dt*u)
    u_tm = u.to(dtype).permute(2, 0, 1).reshape(length, batch, groups, per_group, 1)
    ddt_tm = (g_through_decay * A.to(dtype).view(1, 1, groups, per_group, n_state)).sum(-1, keepdim=True)
    ddt_tm = ddt_tm + g_B * u_tm
    du_tm = g_B * dt_tm
    dBs = (g * (dt_tm * u_tm)).sum(3).permute(1, 2, 3, 0)
    dCs = (h * dy_tm).sum(3).permute(1, 2, 3, 0)

    du = du_tm.reshape(length, batch, channels).permute(1, 2, 0)
    dD = None
    if D is not None:
        du = du + D.to(dtype)[:, None] * dy
        dD = (dy * u.to(dtype)).sum((0, 2))
    ddt = ddt_tm.reshape(length, batch, channels).permute(1, 2, 0)
    if delta_softplus:
        ddt = torch.where(pre_activation <= SOFTPLUS_THRESHOLD, ddt * torch.sigmoid(pre_activation), ddt)
    rows = delta.shape[1]
    ddelta_bias = None
    if delta_bias is not None:
        per_channel = ddt.sum((0, 2))
        ddelta_bias = per_channel if delta_bias.shape[0] == channels else per_channel.view(rows, -1).sum(1)
    ddelta = ddt if rows == channels else ddt.reshape(batch, rows, channels // rows, length).sum(2)
    return (du.to(u.dtype).contiguous(), ddelta.to(delta.dtype).contiguous(), dA.to(A.dtype),
            dBs.to(Bs.dtype).contiguous(), dCs.to(Cs.dtype).contiguous(),
            None if dD is None else dD.to(D.dtype),
            None if ddelta_bias is None else ddelta_bias.to(delta_bias.dtype))


def _zero_grads(u, delta, A, Bs, Cs, D, delta_bias):
    return (torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(Bs),
            torch.zeros_like(Cs), None if D is None else torch.zeros_like(D),
            None if delta_bias is None else torch.zeros_like(delta_bias))
