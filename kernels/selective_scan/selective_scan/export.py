"""The selective scan and SS2D's core without loops or data-dependent branches, for ONNX export.

The package's ops stay single ops in torch.export graphs (their fake kernels give the shapes) and AOTInductor calls
their compiled kernels. An ONNX runtime has no such kernels: `decompose_for_onnx` rewrites a program exported on the
CPU (ExportedProgram.run_decompositions) so that `selective_scan::fwd` and `selective_scan_ss2d::fwd` become the
standard tensor ops below, which torch.onnx translates op for op. (The CUDA-only LayerNorm op never appears in a
CPU program.) The ops' other output, the checkpoints a compiled backward reads, comes back empty: an inference
graph does not read it.

The recurrence h_t = exp(x_t) h_{t-1} + b_t (x = dt * A, a step's log decay) is evaluated in chunks of CHUNK steps.
Inside a chunk, with s_t the chunk-local inclusive cumsum of x and r = s at the chunk's middle step, the
zero-initialised state is the closed form

    h_t = exp(s_t - r) * sum_{k <= t} exp(r - s_k) b_k,

and the state entering each chunk comes from the same scan one level up, over the chunks' total log decays and
local end states (the recursion unrolls at export time: the sequence length is fixed per export). Each step's log
decay is clamped to +-STEP_LIMIT, so every exponent stays within +-(CHUNK / 2) * STEP_LIMIT = +-68 and nothing
overflows for any dt: a step (or, one level up, a chunk) that decays the state by more than exp(-17) = 4e-8, below
float32's unit roundoff (6e-8), is taken as decaying it by exactly that much, an error below the rounding of the
state it decays. (Growth beyond exp(17) per step is clamped likewise; VMamba's A = -exp(A_log) with dt >= 0 never
grows.) torch_scan.py's stable scan checks each chunk at run time instead, which an exported graph cannot do.

For ONNX Runtime's CPU provider, which runs one node at a time over whole tensors, the SS2D core is written for few
passes over memory (`ss2d_export`): each route on its own channels-last (B, L, D) maps gathered in the route's
order, softplus as log(sigmoid(.)) (its Softplus kernel is scalar code), the routes' chunk-level scans as one.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_scan", "selective_scan_export", "ss2d_export", "decompose_for_onnx"]

CHUNK = 8
STEP_LIMIT = 17.0
DT_LIMIT = 80.0


class _Chunks(NamedTuple):
    """The chunk-local part of a scan: h_t = e_t * (sums_t + exp(middle) * entering) within each chunk."""
    e: Tensor
    sums: Tensor
    middle: Tensor
    dim: int
    length: int


def _scan_chunks(log_a: Tensor, b: Tensor, dim: int):
    """The scan inside chunks of CHUNK steps along `dim` (the chunk-local zero-initialised states), plus what the
    scan over the chunks needs: each chunk's total log decay and its local end state (chunks along `dim`)."""
    length = b.shape[dim]
    log_a = log_a.clamp(-STEP_LIMIT, STEP_LIMIT).expand_as(b)
    num_chunks = -(-length // CHUNK)
    pad = num_chunks * CHUNK - length
    if pad:  # padding at the end (no decay, no input) cannot change an earlier state
        widths = [0, 0] * (b.dim() - 1 - dim) + [0, pad]
        log_a, b = F.pad(log_a, widths), F.pad(b, widths)
    step = dim + 1  # the axis of the steps within a chunk
    s = log_a.unflatten(dim, (num_chunks, CHUNK)).cumsum(step)
    middle = s.narrow(step, CHUNK // 2 - 1, 1)
    e = torch.exp(s - middle)
    sums = torch.cumsum(b.unflatten(dim, (num_chunks, CHUNK)) / e, step)
    last = CHUNK - 1
    end_state = (e.narrow(step, last, 1) * sums.narrow(step, last, 1)).squeeze(step)
    return _Chunks(e, sums, middle, dim, length), s.narrow(step, last, 1).squeeze(step), end_state


def _finish_chunks(chunks: _Chunks, end_states: Optional[Tensor]) -> Tensor:
    """The states of every step, from the chunk-local ones and the state at the end of every chunk (None: one
    chunk, nothing enters it)."""
    dim, step = chunks.dim, chunks.dim + 1
    sums = chunks.sums
    if end_states is not None:
        num_chunks = end_states.shape[dim]
        entering = torch.cat([torch.zeros_like(end_states.narrow(dim, 0, 1)),
                              end_states.narrow(dim, 0, num_chunks - 1)], dim)
        sums = sums + torch.exp(chunks.middle) * entering.unsqueeze(step)
    h = (chunks.e * sums).flatten(dim, step)
    return h.narrow(dim, 0, chunks.length) if h.shape[dim] != chunks.length else h


def linear_scan(log_a: Tensor, b: Tensor, dim: int) -> Tensor:
    """h with h_t = exp(log_a_t) * h_{t-1} + b_t along `dim` (h_{-1} = 0); log_a broadcasts against b."""
    dim = dim % b.dim()
    chunks, chunk_log_decay, chunk_end_state = _scan_chunks(log_a, b, dim)
    if chunk_end_state.shape[dim] == 1:
        return _finish_chunks(chunks, None)
    return _finish_chunks(chunks, linear_scan(chunk_log_decay, chunk_end_state, dim))


def _log_sigmoid(x: Tensor) -> Tensor:
    """log(sigmoid(x)) = -softplus(-x) for x >= -DT_LIMIT (sigmoid and log: ONNX Runtime's Softplus kernel is
    scalar code, several times slower; x below -DT_LIMIT counts as -DT_LIMIT, so dt saturates at 80)."""
    return torch.log(torch.sigmoid(x.clamp(min=-DT_LIMIT)))


def _contract_states(h: Tensor, C: Tensor, state_dim: int) -> Tensor:
    """sum_n h_n C_n over `state_dim` (a plain product for one state: a reduction over one element is a slow copy
    in ONNX Runtime)."""
    if h.shape[state_dim] == 1:
        return h.squeeze(state_dim) * C.squeeze(state_dim)
    return (h * C).sum(state_dim)


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def selective_scan_export(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                          delta_bias: Optional[Tensor], delta_softplus: bool, out_float: bool):
    """`selective_scan::fwd`'s contract (ops.selective_scan_fn's shapes): returns (y, last_state)."""
    dtype = _compute_dtype(u, delta, A, B, C)
    batch, channels, length = u.shape
    rows, groups, n_state = delta.shape[1], B.shape[1], A.shape[1]
    dt = delta.to(dtype).repeat_interleave(channels // rows, dim=1) if rows != channels else delta.to(dtype)
    if delta_bias is not None:
        bias = delta_bias.to(dtype)
        dt = dt + (bias.repeat_interleave(channels // rows) if bias.shape[0] != channels else bias)[:, None]
    if delta_softplus:
        dt = -_log_sigmoid(-dt)
    uc = u.to(dtype)
    per_group = channels // groups
    # (batch, groups, channels per group, N, L)
    B5 = B.to(dtype).unsqueeze(2)
    C5 = C.to(dtype).unsqueeze(2)
    dt5 = dt.view(batch, groups, per_group, 1, length)
    log_a = dt5 * A.to(dtype).view(1, groups, per_group, n_state, 1)
    h = linear_scan(log_a, (dt * uc).view(batch, groups, per_group, 1, length) * B5, dim=4)
    y = _contract_states(h, C5, 3).reshape(batch, channels, length)
    if D is not None:
        y = y + D.to(dtype)[:, None] * uc
    last_state = h.narrow(4, length - 1, 1).reshape(batch, channels, n_state)
    out_dtype = dtype if out_float or u.dtype == torch.float64 else u.dtype
    return y.to(out_dtype), last_state


def _route_indices(height: int, width: int, device: torch.device):
    """Per cross2d route k (the orders of cross_scan.route_positions), gather indices that are constants of the
    exported graph: `order` (L,) takes a raster (L, ...) map's rows to the route's order, `own_projection` (L,)
    takes the rows of the (L * 4, ...) view of x_dbl to the route's own projection k in its order, `inverse` (L,)
    takes the route's rows back to raster order."""
    raster = np.arange(height * width).reshape(height, width)
    orders = (raster.ravel(), raster.T.ravel(), raster.ravel()[::-1], raster.T.ravel()[::-1])

    def constant(index):  # from_numpy makes a real tensor even while a graph is traced: a graph constant
        return torch.from_numpy(np.ascontiguousarray(index)).to(device)

    return [(constant(order), constant(order * len(orders) + k), constant(np.argsort(order)))
            for k, order in enumerate(orders)]


def ss2d_export(x: Tensor, x_dbl: Tensor, dt_weight: Tensor, dt_bias: Tensor, A_log: Tensor, Ds: Tensor) -> Tensor:
    """`selective_scan_ss2d::fwd`'s contract (ss2d.scan_routes): x (B, H, W, D), x_dbl (B, H, W, 4 (R + 2N)),
    dt_weight (4, D, R), dt_bias (4, D), A_log (4D, N), Ds (4D,); returns the merged y (B, H, W, D) in fp32.

    Written for few passes over memory: each route is computed on its own (B, L, D) maps, whose chunk-local scans
    then share one scan over the chunks; dt enters only as -dt = log(sigmoid(-z)) for the pre-activation z (the
    minus signs folded into the weights and into B); the D term is added once, to x, with the routes' D summed."""
    dtype = _compute_dtype(x)
    batch, height, width, dim = x.shape
    routes, rank, n_state = dt_weight.shape[0], dt_weight.shape[2], A_log.shape[1]
    length = height * width
    x = x.to(dtype).reshape(batch, length, dim)
    x_dbl = x_dbl.to(dtype).reshape(batch, length * routes, rank + 2 * n_state)
    # -z = -(W_dt dt_rows + b_dt) in one matmul: a column of ones meets the bias row
    weights = -torch.cat([dt_weight.to(dtype).transpose(1, 2), dt_bias.to(dtype).unsqueeze(1)], 1)  # (4, R + 1, D)
    A_abs = torch.exp(A_log.to(dtype)).view(routes, dim, n_state)  # dt * A = -dt * |A|
    chunks, decays, end_states, readouts = [], [], [], []
    for k, (order, own_projection, inverse) in enumerate(_route_indices(height, width, x.device)):
        rows = x_dbl.index_select(1, own_projection)  # (B, L, R + 2N): the route's own projection, in its order
        dt_rows = torch.cat([rows[..., :rank], torch.ones_like(rows[..., :1])], 2)
        minus_dt = _log_sigmoid(torch.matmul(dt_rows, weights[k])).unsqueeze(3)  # (B, L, D, 1)
        u = (x if k == 0 else x.index_select(1, order)).unsqueeze(3)  # route 0 is raster order
        minus_B = -rows[..., rank:rank + n_state].unsqueeze(2)  # (B, L, 1, N)
        route_chunks, decay, end_state = _scan_chunks(minus_dt * A_abs[k], (minus_dt * u) * minus_B, dim=1)
        chunks.append(route_chunks)
        decays.append(decay)
        end_states.append(end_state)
        readouts.append((rows[..., rank + n_state:].unsqueeze(2), None if k == 0 else inverse))
    if end_states[0].shape[1] > 1:  # one scan over the chunks of all four routes
        end_states = linear_scan(torch.cat(decays, 2), torch.cat(end_states, 2), dim=1).chunk(routes, 2)
    else:
        end_states = [None] * routes
    y = x * Ds.to(dtype).view(routes, dim).sum(0)
    for route_chunks, end_state, (Cs, inverse) in zip(chunks, end_states, readouts):
        y_route = _contract_states(_finish_chunks(route_chunks, end_state), Cs, 3)
        y = y + (y_route if inverse is None else y_route.index_select(1, inverse))
    return y.view(batch, height, width, dim)


# ------------------------------------------------------------------------------------------ decompositions


def _scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float):
    y, last_state = selective_scan_export(u, delta, A, B, C, D, delta_bias, delta_softplus, out_float)
    return y, last_state, u.new_empty(0, dtype=torch.float32)


def _ss2d_fwd(x, x_dbl, dt_weight, dt_bias, A_log, Ds):
    return ss2d_export(x, x_dbl, dt_weight, dt_bias, A_log, Ds), x.new_empty(0, dtype=torch.float32)


_DECOMPOSITIONS = {torch.ops.selective_scan.fwd.default: _scan_fwd,
                   torch.ops.selective_scan_ss2d.fwd.default: _ss2d_fwd}


def decompose_for_onnx(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """`program` with every forward op of this package replaced by its standard-op formulation above; the rest of
    the graph is left to torch.onnx (which keeps e.g. layer_norm whole)."""
    return program.run_decompositions(_DECOMPOSITIONS)
