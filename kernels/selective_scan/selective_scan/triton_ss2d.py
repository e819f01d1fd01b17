"""The fused SS2D core in Triton: forward and backward kernels with the contract of the ops
`selective_scan_ss2d::fwd` / `::bwd` (ss2d.py), for GPUs where the CUDA extension is not built. Triton compiles them
when first called.

Inputs as the ops take them: x (B, H, W, D) channels-last, x_dbl (B, H, W, 4, R + 2N) in x's dtype (route k's row
[dt-rank values, B, C]), SS2D's dt_projs_weight (4, D, R), dt_projs_bias (4, D), A_logs (4D, N) and Ds (4D,) in fp32.

Layout. One program owns a block of up to BLOCK_D channels of one sample and walks the four cross2d routes in turn,
each in chunks of steps, with the chunk as (channels, states, steps) tiles in registers (the pieces of
triton_scan.py: a chunk's recurrence is one associative scan, entered with the state the previous chunk ended in).
A step's position in its route comes from a (4, H * W) int32 table of the routes' raster positions (row-major,
column-major and their reverses; built once per map size and kept), read per chunk rather than divided out of the step
number at every step, so x, y, dy and dx are read and written in place in the (B, H, W, D) maps, BLOCK_D contiguous
channels per position: no (B, 4, D, L) route copies. dt = softplus(W_dt r + bias) is computed per chunk from the
chunk's x_dbl rank values r with `tl.dot`s over slices of RANK_SLICE ranks, in full fp32 (not TF32: dt enters
exp(sum dt A) over thousands of steps).

Merging the routes. The program that owns a channel block owns all four routes of it, so it is the only writer of
those channels of y: route 0 stores y, routes 1-3 load, add and store, with a block barrier between routes. Each
element is therefore the same fp32 sum in the same order on every run (deterministic, no atomics), and y is written
once per route without a zero-filled buffer or per-route copies to sum afterwards. Where that grid (batch x channel
blocks) has fewer programs than the GPU has SMs, each program walks one route instead, into its own fp32 map, and
the host sums the four maps: four times the programs for small batches, still deterministic.

Backward. Per route, the program walks its chunks from the last, reads each chunk once in step order (x, dy, the
x_dbl row, dt computed once) and recomputes the chunk's states from the state the forward saved at the chunk's start
(checkpoints (B, 4, chunks, N, D) fp32). The adjoint g_t = dL/dh_t = C_t dy_t + decay_{t+1} g_{t+1} runs as a second
associative scan in reversed step order, on tiles that `tl.gather` takes from the step-order ones (lane shuffles):
dy and C reversed, and dt reversed and shifted by one step, so the decay each step needs is its successor's without
computing dt again. The chunk to the right enters that scan as decay_{t+1} g_{t+1} of its first step, carried in
registers; the scan's result is flipped back into step order (`tl.associative_scan(..., reverse=True)` is wrong for
non-commutative combines on GPUs, triton issue #4362). From the gradient of dt's pre-activation it forms, in-kernel,
the gradient of the x_dbl rank values (W_dt^T ddt) and of W_dt (ddt r^T, summed over the chunks), again a slice of
ranks per `tl.dot`. dx gathers its routes like y (an fp32 sum; the last route writes x's dtype). Sums over channels
(the x_dbl row gradients) are written per channel block, sums over positions (W_dt, dt bias, A_log, D) per sample;
the host adds the partials, so results do not depend on scheduling.

Everything accumulates in fp32 whatever the input dtype; y is fp32, gradients take their input's dtype.

The kernels also run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported): that is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import triton_scan
from .cross_scan import route_positions

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

__all__ = ["BLOCK_D", "RANK_SLICE", "channel_block", "MAX_D_STATE", "MAX_RANK", "available", "check_supported",
           "chunk_steps", "checkpoint_shape", "launch_warps", "routes_per_program", "forward", "backward"]

# Channels per program: BLOCK_D, or MIN_BLOCK_D for more than MAX_STATES_WIDE_BLOCK states (compiled for sm_90, the
# backward's 32-channel tiles spill past 4 states: 56 bytes per thread at 8, 664 at 16, none with 16 channels) and for
# maps of at most 16 channels (not less: the dt `tl.dot`s contract over the block's channels).
BLOCK_D = 32
MIN_BLOCK_D = 16
MAX_STATES_WIDE_BLOCK = 4
# Elements of one (channels, states, steps) tile: sets the chunk length for a given number of states, between
# MIN_CHUNK and MAX_CHUNK. The W_dt gradient's `tl.dot` contracts over a chunk's steps, and Triton 3.6 refuses dots
# that contract over fewer than 16; compiled for sm_90, the backward spills about 370 bytes per thread with 64-step
# chunks and none with 32 (ptxas resource usage, Triton 3.8).
TILE_ELEMENTS = 2048
MIN_CHUNK = 16
MAX_CHUNK = 32
# dt ranks per `tl.dot` of the dt projection and its gradients (at least 8, the narrowest fp32 dot): a dot over all
# of a wide rank at once holds its operands in registers and spills.
RANK_SLICE = 16
# The widest x_dbl row is R + 2N values; R up to the CUDA kernels' limit (ss2d.MAX_RANK), N up to the scan's.
MAX_RANK = 66
MAX_D_STATE = triton_scan.MAX_D_STATE
# Warps per program (forward, backward). At d_state 1 fewer warps are faster on an H100 (batch 128, fp16, VMamba-T's
# stage shapes, Triton 3.6): 2 / 4 against 4 / 8 take the forward at stage 1 from 3.70 to 2.73 ms, the backward
# from 9.29 to 7.44 ms at stage 1 and from 3.25 to 2.22 ms at stage 3; above d_state 1 the wider tiles spill with
# fewer warps (compiled for sm_90: 400 bytes per thread in the backward at d_state 2).
WARPS_STATE_1 = (2, 4)
WARPS = (4, 8)
K = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


available = triton_scan.available  # whether triton is importable


def _widest_block(d_state: int) -> int:
    return BLOCK_D if _next_power_of_2(d_state) <= MAX_STATES_WIDE_BLOCK else MIN_BLOCK_D


def channel_block(dim: int, d_state: int) -> int:
    """Channels per program for maps of `dim` channels and `d_state` states (the comment at BLOCK_D)."""
    return min(_widest_block(d_state), max(MIN_BLOCK_D, _next_power_of_2(dim)))


def chunk_steps(d_state: int) -> int:
    """Steps per chunk: the checkpoint interval and the steps a tile holds (32 for d_state 1)."""
    return max(MIN_CHUNK, min(MAX_CHUNK, TILE_ELEMENTS // (_widest_block(d_state) * _next_power_of_2(d_state))))


def launch_warps(d_state: int) -> tuple:
    """(forward, backward) warps per program for `d_state` states (the comment at WARPS)."""
    return WARPS_STATE_1 if d_state == 1 else WARPS


def checkpoint_shape(x_shape, d_state: int) -> tuple:
    """Shape of the checkpoints the forward saves for x of shape (B, H, W, D): (B, 4, chunks, N, D)."""
    batch, height, width, dim = x_shape
    return batch, K, -(-height * width // chunk_steps(d_state)), d_state, dim


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _shape(sizes) -> str:
    """Sizes as the CUDA kernels' errors print them: (2, 3), (48)."""
    return "(" + ", ".join(str(size) for size in sizes) + ")"


def check_supported(x, x_dbl, dt_weight, dt_bias, A_log, Ds, caller: str = "selective_scan_ss2d (triton)") -> None:
    """Raises a clear error naming the argument if the Triton kernels cannot take this call (the messages of the
    CUDA kernels' checks where they apply)."""
    if triton is None:
        raise RuntimeError(f"{caller}: triton is not installed")
    if not (x.is_cuda or (x.device.type == "cpu" and triton_scan._interpreting())):
        raise ValueError(f"{caller}: the Triton kernels take CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                         f"`x` is on {x.device}")
    if x.dim() != 4:
        raise ValueError(f"{caller}: `x` must be (B, H, W, D), got shape {_shape(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{caller}: the Triton kernels take float32/float16/bfloat16 `x`, not {x.dtype}")
    batch, height, width, dim = x.shape
    if A_log.dim() != 2 or A_log.shape[0] != K * dim:
        raise ValueError(f"{caller}: `A_log` must have shape ({K * dim}, N), got {_shape(A_log.shape)}")
    d_state = A_log.shape[1]
    if not 1 <= d_state <= MAX_D_STATE:
        raise ValueError(f"{caller}: d_state is {d_state}; the Triton kernels support 1 to {MAX_D_STATE}")
    if dt_weight.dim() != 3 or dt_weight.shape[:2] != (K, dim):
        raise ValueError(f"{caller}: `dt_weight` must have shape ({K}, {dim}, R), got {_shape(dt_weight.shape)}")
    rank = dt_weight.shape[2]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"{caller}: dt rank is {rank}; the Triton kernels support 1 to {MAX_RANK}")
    for name, t, dtype, shape in (("x_dbl", x_dbl, x.dtype, (batch, height, width, K * (rank + 2 * d_state))),
                                  ("dt_weight", dt_weight, torch.float32, dt_weight.shape),
                                  ("dt_bias", dt_bias, torch.float32, (K, dim)),
                                  ("A_log", A_log, torch.float32, A_log.shape),
                                  ("Ds", Ds, torch.float32, (K * dim,))):
        if t.device != x.device:
            raise ValueError(f"{caller}: `{name}` is on {t.device}, `x` on {x.device}")
        if t.dtype != dtype:
            raise TypeError(f"{caller}: `{name}` must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{caller}: `{name}` must have shape {_shape(shape)}, got {_shape(t.shape)}")


if triton is not None:
    from .triton_scan import _chunk_states, _last_step, _softplus, _softplus_slope

    @triton.jit
    def _route_positions(positions_ptr, route, step, length):
        """Raster positions (h * W + w) cross2d route `route` visits at `step`s, read from the routes' table
        (_route_table), and which steps exist."""
        exists = (step >= 0) & (step < length)
        return tl.load(positions_ptr + route * length + step, mask=exists, other=0), exists

    @triton.jit
    def _row_values(entries, first, index, index_mask, step_mask):
        """(len(index), steps) fp32 tile: the values first + index of the steps' x_dbl rows (`entries` point at the
        rows' starts)."""
        return tl.load(entries[None, :] + first + index[:, None], mask=index_mask[:, None] & step_mask[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _dt(w_rows, entries, bias, channel_mask, step_mask, rank, SLICE: tl.constexpr):
        """(dt, pre-activation) (channels, steps): W_dt r + bias for the block's W_dt rows (`w_rows` point at them)
        and the steps' x_dbl rank values r (`entries` point at the rows), SLICE ranks per `tl.dot`; dt is 0 where
        masked: there a step neither decays the state nor feeds it."""
        index = tl.arange(0, SLICE)
        pre = tl.zeros((w_rows.shape[0], entries.shape[0]), tl.float32) + bias[:, None]
        for first in range(0, rank, SLICE):
            index_mask = first + index < rank
            W = tl.load(w_rows[:, None] + first + index[None, :], mask=channel_mask[:, None] & index_mask[None, :],
                        other=0.0)
            pre = tl.dot(W, _row_values(entries, first, index, index_mask, step_mask), pre, input_precision="ieee")
        return tl.where(channel_mask[:, None] & step_mask[None, :], _softplus(pre), 0.0), pre

    @triton.jit
    def _program_block(dim, n_state, BLOCK: tl.constexpr, N_PAD: tl.constexpr):
        """The program's sample, its block of channels and the (padded) states, with which of them exist."""
        channel = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        state = tl.arange(0, N_PAD)
        return tl.program_id(0).to(tl.int64), channel, channel < dim, state, state < n_state

    @triton.jit
    def _route_parameters(w_ptr, bias_ptr, A_log_ptr, Ds_ptr, checkpoint_ptr, sample, route, channel, channel_mask,
                          state, state_mask, dim, rank, n_state, num_chunks):
        """Pointers to the W_dt rows, the dt bias, A = -exp(A_log) (channels, N_PAD) and D of the block's channels in
        route `route`, and pointers to their checkpoints (chunk 0; a chunk is n_state * dim further); padded states
        get A = 0 (and B = C = 0), so they stay 0 and add nothing."""
        rows = route * dim + channel
        bias = tl.load(bias_ptr + rows, mask=channel_mask, other=0.0)
        state_masks = channel_mask[:, None] & state_mask[None, :]
        A_log = tl.load(A_log_ptr + rows[:, None] * n_state + state[None, :], mask=state_masks, other=0.0)
        A = tl.where(state_masks, -tl.exp(A_log), 0.0)
        D = tl.load(Ds_ptr + rows, mask=channel_mask, other=0.0)
        checkpoint_rows = (checkpoint_ptr + ((sample * 4 + route) * num_chunks * n_state + state[None, :]) * dim
                           + channel[:, None])
        return w_ptr + rows * rank, bias, A, D, checkpoint_rows

    @triton.jit
    def _chunk_inputs(positions_ptr, x_ptr, x_dbl_ptr, w_rows, bias, sample, route, step, channel, channel_mask, state,
                      state_mask, height, width, dim, rank, n_state, SLICE: tl.constexpr):
        """What the forward and the backward read for a chunk of `step`s of a route: the steps' raster positions and
        mask, the (channels, steps) mask and offsets into the maps, x in fp32, pointers to the steps' x_dbl rows,
        (dt, its pre-activation) and B (states, steps)."""
        position, step_mask = _route_positions(positions_ptr, route, step, height * width)
        rows = sample * height * width + position
        mask = channel_mask[:, None] & step_mask[None, :]
        offsets = rows[None, :] * dim + channel[:, None]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        entries = x_dbl_ptr + (rows * 4 + route) * (rank + 2 * n_state)
        dt, pre_activation = _dt(w_rows, entries, bias, channel_mask, step_mask, rank, SLICE)
        B = _row_values(entries, rank, state, state_mask, step_mask)
        return position, step_mask, mask, offsets, x, entries, dt, pre_activation, B

    @triton.jit
    def _ss2d_fwd_kernel(
        positions_ptr, x_ptr, x_dbl_ptr, w_ptr, bias_ptr, A_log_ptr, Ds_ptr, y_ptr, checkpoint_ptr,
        height, width, dim, rank, n_state, num_chunks,
        BLOCK: tl.constexpr, N_PAD: tl.constexpr, CHUNK_STEPS: tl.constexpr, SLICE: tl.constexpr,
        ROUTES: tl.constexpr,
    ):
        sample, channel, channel_mask, state, state_mask = _program_block(dim, n_state, BLOCK, N_PAD)
        channel_state_mask = channel_mask[:, None] & state_mask[None, :]
        # the program walks ROUTES routes and adds them into the y map of its group of routes
        y_ptr += tl.program_id(2).to(tl.int64) * tl.num_programs(0) * height * width * dim
        for routes_walked in range(ROUTES):
            route = tl.program_id(2) * ROUTES + routes_walked
            w_rows, bias, A, D, checkpoint_rows = _route_parameters(
                w_ptr, bias_ptr, A_log_ptr, Ds_ptr, checkpoint_ptr, sample, route, channel, channel_mask, state,
                state_mask, dim, rank, n_state, num_chunks)
            h = tl.zeros((BLOCK, N_PAD), tl.float32)
            for chunk in range(num_chunks):
                tl.store(checkpoint_rows + chunk * n_state * dim, h, mask=channel_state_mask)
                _, step_mask, mask, offsets, x, entries, dt, _, B = _chunk_inputs(
                    positions_ptr, x_ptr, x_dbl_ptr, w_rows, bias, sample, route,
                    chunk * CHUNK_STEPS + tl.arange(0, CHUNK_STEPS), channel, channel_mask, state, state_mask, height,
                    width, dim, rank, n_state, SLICE)
                C = _row_values(entries, rank + n_state, state, state_mask, step_mask)
                states = _chunk_states(tl.exp(dt[:, None, :] * A[:, :, None]), (dt * x)[:, None, :] * B[None, :, :], h)
                y = tl.sum(states * C[None, :, :], axis=1) + D[:, None] * x
                # the first route writes y, the later ones add to it (the module docstring says why this is safe)
                y += tl.load(y_ptr + offsets, mask=mask & (routes_walked > 0), other=0.0)
                tl.store(y_ptr + offsets, y, mask=mask)
                h = _last_step(states)
            tl.debug_barrier()  # the next route reads y where other threads of the program wrote it

    @triton.jit
    def _ss2d_bwd_kernel(
        positions_ptr, dy_ptr, x_ptr, x_dbl_ptr, w_ptr, bias_ptr, A_log_ptr, Ds_ptr, checkpoint_ptr,
        dx_sum_ptr, dx_ptr, d_rows_ptr, dw_ptr, dbias_ptr, dA_log_ptr, dDs_ptr,
        height, width, dim, rank, n_state, num_chunks,
        BLOCK: tl.constexpr, N_PAD: tl.constexpr, CHUNK_STEPS: tl.constexpr, SLICE: tl.constexpr,
        ROUTES: tl.constexpr,
    ):
        sample, channel, channel_mask, state, state_mask = _program_block(dim, n_state, BLOCK, N_PAD)
        channel_state_mask = channel_mask[:, None] & state_mask[None, :]
        length = height * width
        row_width = rank + 2 * n_state
        slice_index = tl.arange(0, SLICE)
        # `tl.gather` indices that reverse a chunk's steps, and reverse and shift them a step (the adjoint's decays)
        back_step = tl.arange(0, CHUNK_STEPS)[None, :]
        reversed_steps = tl.broadcast_to(CHUNK_STEPS - 1 - back_step, (BLOCK, CHUNK_STEPS))
        shifted_back = tl.broadcast_to((CHUNK_STEPS - back_step) % CHUNK_STEPS, (BLOCK, CHUNK_STEPS))
        reversed_states = tl.broadcast_to(CHUNK_STEPS - 1 - back_step, (N_PAD, CHUNK_STEPS))
        # this program's partial x_dbl row gradients: (B, channel blocks, L, 4, R + 2N)
        partial_rows = (sample * tl.num_programs(1) + tl.program_id(1)) * length
        # the program walks ROUTES routes and adds them into the dx map of its group of routes
        group_map = tl.program_id(2).to(tl.int64) * tl.num_programs(0) * length * dim
        dx_sum_ptr += group_map
        dx_ptr += group_map
        for routes_walked in range(ROUTES):
            route = tl.program_id(2) * ROUTES + routes_walked
            w_rows, bias, A, D, checkpoint_rows = _route_parameters(
                w_ptr, bias_ptr, A_log_ptr, Ds_ptr, checkpoint_ptr, sample, route, channel, channel_mask, state,
                state_mask, dim, rank, n_state, num_chunks)
            route_rows = sample * 4 * dim + route * dim + channel  # (sample, route, channel) of the partial sums
            # decay_{t+1} g_{t+1} of the first step of the chunk to the right (zero after the route's last step)
            adjoint_after = tl.zeros((BLOCK, N_PAD), tl.float32)
            dA = tl.zeros((BLOCK, N_PAD), tl.float32)
            dD = tl.zeros((BLOCK,), tl.float32)
            dbias = tl.zeros((BLOCK,), tl.float32)
            for reversed_chunk in range(num_chunks):
                chunk = num_chunks - 1 - reversed_chunk
                position, step_mask, mask, offsets, x, entries, dt, pre_activation, B = _chunk_inputs(
                    positions_ptr, x_ptr, x_dbl_ptr, w_rows, bias, sample, route,
                    chunk * CHUNK_STEPS + tl.arange(0, CHUNK_STEPS), channel, channel_mask, state, state_mask, height,
                    width, dim, rank, n_state, SLICE)
                dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
                C = _row_values(entries, rank + n_state, state, state_mask, step_mask)
                inputs = (dt * x)[:, None, :] * B[None, :, :]
                entering = tl.load(checkpoint_rows + chunk * n_state * dim, mask=channel_state_mask, other=0.0)
                states = _chunk_states(tl.exp(dt[:, None, :] * A[:, :, None]), inputs, entering)

                # the adjoint scan in reversed step order: g_t = C_t dy_t + decay_{t+1} g_{t+1}. Reversed step j is
                # step CHUNK_STEPS - 1 - j and takes the decay of step CHUNK_STEPS - j; j = 0 takes none, the chunk
                # to the right enters as decay_{t+1} g_{t+1} (adjoint_after)
                back_dt = tl.where(back_step == 0, 0.0, tl.gather(dt, shifted_back, axis=1))
                back_inputs = (tl.gather(dy, reversed_steps, axis=1)[:, None, :]
                               * tl.gather(C, reversed_states, axis=1)[None, :, :])
                adjoints_back = _chunk_states(tl.exp(back_dt[:, None, :] * A[:, :, None]), back_inputs, adjoint_after)
                first_dt = tl.sum(tl.where(back_step == 0, dt, 0.0), axis=1)
                adjoint_after = tl.exp(first_dt[:, None] * A) * _last_step(adjoints_back)
                adjoints = tl.flip(adjoints_back, 2)

                # dL/d(dt_t A) = g_t decay_t h_{t-1} = g_t (h_t - input_t)
                through_decay = adjoints * (states - inputs)
                dA += tl.sum(through_decay * dt[:, None, :], axis=2)
                adjoint_dtu = tl.sum(adjoints * B[None, :, :], axis=1)  # dL/d(dt x)
                ddt = tl.sum(through_decay * A[:, :, None], axis=1) + adjoint_dtu * x
                ddt = tl.where(mask, ddt * _softplus_slope(pre_activation), 0.0)  # gradient of dt's pre-activation
                dbias += tl.sum(ddt, axis=1)
                dD += tl.sum(dy * x, axis=1)

                d_entries = d_rows_ptr + ((partial_rows + position) * 4 + route) * row_width
                d_row_type = d_rows_ptr.dtype.element_ty
                # the dt projection's gradients, SLICE ranks at a time: x_dbl's rank values (W_dt^T ddt) and W_dt
                # (ddt r^T, added to the program's partial sum over the chunks)
                for first in range(0, rank, SLICE):
                    index = first + slice_index
                    index_mask = index < rank
                    w_mask = channel_mask[:, None] & index_mask[None, :]
                    W = tl.load(w_rows[:, None] + index[None, :], mask=w_mask, other=0.0)
                    tl.store(d_entries[None, :] + index[:, None],
                             tl.dot(tl.trans(W), ddt, input_precision="ieee").to(d_row_type),
                             mask=index_mask[:, None] & step_mask[None, :])
                    rank_values = _row_values(entries, first, slice_index, index_mask, step_mask)
                    dw_partial = dw_ptr + route_rows[:, None] * rank + index[None, :]
                    dW = tl.load(dw_partial, mask=w_mask & (reversed_chunk > 0), other=0.0)
                    tl.store(dw_partial, tl.dot(ddt, tl.trans(rank_values), dW, input_precision="ieee"), mask=w_mask)
                state_step_mask = state_mask[:, None] & step_mask[None, :]
                tl.store(d_entries[None, :] + rank + state[:, None],
                         tl.sum(adjoints * (dt * x)[:, None, :], axis=0).to(d_row_type), mask=state_step_mask)
                tl.store(d_entries[None, :] + rank + n_state + state[:, None],
                         tl.sum(states * dy[:, None, :], axis=0).to(d_row_type), mask=state_step_mask)

                # dx gathers the routes like y in the forward; the last one writes dx's dtype
                dx = adjoint_dtu * dt + dy * D[:, None]
                dx += tl.load(dx_sum_ptr + offsets, mask=mask & (routes_walked > 0), other=0.0)
                tl.store(dx_sum_ptr + offsets, dx, mask=mask & (routes_walked < ROUTES - 1))
                tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask & (routes_walked == ROUTES - 1))
                tl.debug_barrier()  # the next chunk adds to the W_dt partial sums other threads may have stored
            tl.store(dA_log_ptr + route_rows[:, None] * n_state + state[None, :], dA * A, mask=channel_state_mask)
            tl.store(dbias_ptr + route_rows, dbias, mask=channel_mask)
            tl.store(dDs_ptr + route_rows, dD, mask=channel_mask)
            tl.debug_barrier()  # the next route reads dx where other threads of the program wrote it


def routes_per_program(x, channel_blocks: int) -> int:
    """4 (a program walks all four routes of its channel block into one output map) unless that grid has fewer
    programs than the GPU has SMs; then 1: four times the programs, each route into its own fp32 map, the four maps
    summed after (more memory traffic, but no idle SMs at small batches)."""
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    return K if x.shape[0] * channel_blocks >= sm_count else 1


@functools.lru_cache(maxsize=32)
def _route_table(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(4, H * W) int32: cross_scan.route_positions of the cross2d routes, which the kernels read rather than divide
    by H at every step; kept per map size and device."""
    return route_positions(height, width, "cross2d", device).to(torch.int32)


def _launch_sizes(x, dt_weight, A_log, routes):
    """The grid, the kernels' size arguments and their constexpr sizes for a call walking `routes` routes per
    program (None: routes_per_program)."""
    batch, height, width, dim = x.shape
    rank, d_state = dt_weight.shape[2], A_log.shape[1]
    num_chunks = -(-height * width // chunk_steps(d_state))
    block = channel_block(dim, d_state)
    blocks = triton.cdiv(dim, block)
    routes = routes or routes_per_program(x, blocks)
    if routes not in (1, K):
        raise ValueError(f"selective_scan_ss2d (triton): a program walks 1 or 4 routes, not {routes}")
    constants = dict(BLOCK=block, N_PAD=_next_power_of_2(d_state), CHUNK_STEPS=chunk_steps(d_state),
                     SLICE=RANK_SLICE, ROUTES=routes)
    return (batch, blocks, K // routes), (height, width, dim, rank, d_state, num_chunks), constants


def forward(x, x_dbl, dt_weight, dt_bias, A_log, Ds, routes: Optional[int] = None):
    """(y, checkpoints) as the op `selective_scan_ss2d::fwd` returns them: the merged y (B, H, W, D) fp32 and the
    states entering each chunk of each route, (B, 4, chunks, N, D) fp32 (checkpoint_shape). routes: routes a program
    walks, 4 or 1 (None: routes_per_program; the results agree to fp32 rounding)."""
    check_supported(x, x_dbl, dt_weight, dt_bias, A_log, Ds)
    x, x_dbl, dt_weight, dt_bias, A_log, Ds = (t.contiguous() for t in (x, x_dbl, dt_weight, dt_bias, A_log, Ds))
    checkpoints = x.new_empty(checkpoint_shape(x.shape, A_log.shape[1]), dtype=torch.float32)
    if x.numel() == 0:
        return x.new_empty(x.shape, dtype=torch.float32), checkpoints
    grid, sizes, constants = _launch_sizes(x, dt_weight, A_log, routes)
    y = x.new_empty((grid[2],) + x.shape, dtype=torch.float32)  # one map per group of routes
    with triton_scan._launch_context(x):
        _ss2d_fwd_kernel[grid](_route_table(*x.shape[1:3], x.device), x, x_dbl, dt_weight, dt_bias, A_log, Ds, y,
                               checkpoints, *sizes, **constants, num_warps=launch_warps(A_log.shape[1])[0])
    return y[0] if grid[2] == 1 else y.sum(0), checkpoints


def backward(dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, checkpoints, routes: Optional[int] = None):
    """(dx, dx_dbl, d dt_weight, d dt_bias, dA_log, dDs) as the op `selective_scan_ss2d::bwd` returns them, from
    `forward`'s checkpoints; dx and dx_dbl in their inputs' dtypes, the parameters' gradients fp32. routes: as
    `forward` takes it (the two need not agree)."""
    check_supported(x, x_dbl, dt_weight, dt_bias, A_log, Ds)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"selective_scan_ss2d (triton): `dy` must have shape {_shape(x.shape)}, "
                         f"got {_shape(dy.shape)}")
    expected = checkpoint_shape(x.shape, A_log.shape[1])
    if tuple(checkpoints.shape) != expected:
        raise ValueError(f"selective_scan_ss2d (triton): `ckpt` has shape {_shape(checkpoints.shape)}; the Triton "
                         f"forward saves {_shape(expected)} for these inputs")
    dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, checkpoints = (
        t.contiguous() for t in (dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds, checkpoints))
    if x.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (x, x_dbl, dt_weight, dt_bias, A_log, Ds))
    grid, sizes, constants = _launch_sizes(x, dt_weight, A_log, routes)
    batch, blocks, groups = grid
    if groups == 1:
        dx = torch.empty_like(x)
        dx_sum = dx if x.dtype == torch.float32 else torch.empty_like(x, dtype=torch.float32)
    else:  # one fp32 map per route, summed below
        dx = dx_sum = x.new_empty((groups,) + x.shape, dtype=torch.float32)
    # x_dbl row gradients are sums over channels: one partial per channel block, in x_dbl's dtype when there is one
    d_rows = x_dbl.new_empty((batch, blocks) + x_dbl.shape[1:],
                             dtype=x_dbl.dtype if blocks == 1 else torch.float32)
    dw = dt_weight.new_empty((batch,) + dt_weight.shape)
    dbias = dt_bias.new_empty((batch,) + dt_bias.shape)
    dA_log = A_log.new_empty((batch,) + A_log.shape)
    dDs = Ds.new_empty((batch,) + Ds.shape)
    with triton_scan._launch_context(x):
        _ss2d_bwd_kernel[grid](_route_table(*x.shape[1:3], x.device), dy, x, x_dbl, dt_weight, dt_bias, A_log, Ds,
                               checkpoints, dx_sum, dx, d_rows, dw, dbias, dA_log, dDs, *sizes, **constants,
                               num_warps=launch_warps(A_log.shape[1])[1])
    dx_dbl = d_rows.squeeze(1) if blocks == 1 else d_rows.sum(1).to(x_dbl.dtype)
    if groups > 1:
        dx = dx.sum(0).to(x.dtype)
    return dx, dx_dbl, dw.sum(0), dbias.sum(0), dA_log.sum(0), dDs.sum(0)
