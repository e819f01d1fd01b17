"""The selective scan in Triton: forward and backward kernels with the contract of the ops `selective_scan::fwd` /
`::bwd` (ops.py), for GPUs where the CUDA extension is not built. Triton compiles them when first called.

Layout. One program owns a block of channels of one sample; all its channels lie in one B/C group, so the B and C
rows of a step are loaded once and shared. The program walks the sequence in chunks of CHUNK steps and holds a
chunk as (channels, states, steps) tiles in registers, the state carried from chunk to chunk in registers too:

    decay_t = exp(dt_t A), input_t = dt_t u_t B_t,    h_t = decay_t h_{t-1} + input_t,    y_t = C_t . h_t + D u_t.

Inside a chunk the recurrence is an associative scan over the steps of the affine maps h -> decay h + input (every
factor is a decay <= 1 for A <= 0, so nothing overflows however long the sequence), entered with the state the
previous chunk ended in. The forward saves the state entering every chunk: checkpoints (batch, channels, chunks, N)
in fp32, the layout of the compiled kernels' checkpoints with CHUNK steps between them.

Backward. The program walks its chunks from the last: it recomputes the chunk's states from its checkpoint (the
forward's scan again), then the adjoint g_t = dL/dh_t = C_t dy_t + decay_{t+1} g_{t+1} with a second associative
scan, entered with the adjoint of the next chunk's first step. That scan runs on tiles loaded in reversed step
order and its result is flipped back (`tl.associative_scan(..., reverse=True)` is wrong for non-commutative
combines on GPUs, triton issue #4362); decay_{t+1} comes from a second load of delta one step ahead. Per-step
gradients (du, ddelta) are stored per chunk; dB / dC are summed over the program's channels (one partial per
channel block, summed on the host when a group spans several blocks); dA, dD and d delta_bias are summed over the
chunks in registers, one partial per sample, summed on the host. Sums therefore do not depend on scheduling.

Everything accumulates in fp32 whatever the input dtype; y is fp32 or u's dtype, gradients take their input's dtype.
The chunk-level pieces (`_softplus`, `_chunk_states`, `_last_step`) are what a fused SS2D kernel reuses.

The kernels also run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported): that is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

__all__ = ["CHUNK", "MAX_D_STATE", "available", "check_supported", "forward", "backward"]

# Steps per chunk: the checkpoint interval, and the steps a tile holds.
CHUNK = 64
# States a program holds per channel (padded to a power of two); the CUDA kernel's limit too.
MAX_D_STATE = 16
# Elements of one (channels, states, steps) tile: the channel block is as wide as this allows.
TILE_ELEMENTS = 2048
FORWARD_WARPS = 4
BACKWARD_WARPS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> bool:
    """Whether triton is importable."""
    return triton is not None


def _interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


def check_supported(u: torch.Tensor, n_state: int, caller: str = "selective_scan (triton)") -> None:
    """Raises a clear error if the Triton kernels cannot take a call with `u` and `n_state` states."""
    if triton is None:
        raise RuntimeError(f"{caller}: triton is not installed")
    if not (u.is_cuda or (u.device.type == "cpu" and _interpreting())):
        raise ValueError(f"{caller}: the Triton kernels take CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                         f"`u` is on {u.device}")
    if u.dtype not in _DTYPES:
        raise TypeError(f"{caller}: the Triton kernels take float32/float16/bfloat16 `u`, not {u.dtype} "
                        f"(use backend='torch')")
    if n_state > MAX_D_STATE:
        raise ValueError(f"{caller}: `A` has N = {n_state} states; the Triton kernels support at most {MAX_D_STATE} "
                         f"(use backend='torch')")


def _tile(per_group: int, n_state: int) -> tuple[int, int, int]:
    """(channels per program, padded states, programs per B/C group). The channel block is a power of two no wider
    than TILE_ELEMENTS allows; where a group is wider, a power-of-two divisor of the group size that keeps the block
    at least half that wide avoids masked channels."""
    n_pad = triton.next_power_of_2(n_state)
    limit = max(1, TILE_ELEMENTS // (n_pad * CHUNK))
    if per_group <= limit:
        block = triton.next_power_of_2(per_group)
    else:
        divisor = min(per_group & -per_group, limit)
        block = divisor if 2 * divisor >= limit else limit
    return block, n_pad, triton.cdiv(per_group, block)


if triton is not None:
    # F.softplus's threshold in the reference (torch_scan.SOFTPLUS_THRESHOLD): above it softplus(x) is x.
    _SOFTPLUS_THRESHOLD = tl.constexpr(20.0)

    @triton.jit
    def _softplus(x):
        """log1p(exp(x)), accurate for very negative x too (where it is exp(x)), and x above the threshold."""
        e = tl.exp(tl.minimum(x, _SOFTPLUS_THRESHOLD))
        w = 1.0 + e
        # log(w) * e / (w - 1) corrects the rounding of 1 + e (the same identity as a careful log1p)
        log1p = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
        return tl.where(x > _SOFTPLUS_THRESHOLD, x, log1p)

    @triton.jit
    def _softplus_slope(x):
        return tl.where(x > _SOFTPLUS_THRESHOLD, 1.0, tl.sigmoid(x))

    @triton.jit
    def _compose(decay_first, input_first, decay_second, input_second):
        """The affine map h -> decay h + input applied first, then the second one, as one map."""
        return decay_first * decay_second, decay_second * input_first + input_second

    @triton.jit
    def _chunk_states(decay, inputs, entering):
        """h_t = decay_t h_{t-1} + inputs_t along the last axis of (channels, states, steps) tiles, with h_{-1} =
        entering (channels, states)."""
        cumulative_decay, local = tl.associative_scan((decay, inputs), 2, _compose)
        return local + cumulative_decay * entering[:, :, None]

    @triton.jit
    def _last_step(x):
        """x[:, :, -1] of a (channels, states, steps) tile."""
        steps = tl.arange(0, x.shape[2])[None, None, :]
        return tl.sum(tl.where(steps == x.shape[2] - 1, x, 0.0), axis=2)

    @triton.jit
    def _channel_block(per_group, per_row, blocks_per_group, BLOCK_D: tl.constexpr):
        """The program's B/C group, its channels, their delta rows and which of them exist."""
        program = tl.program_id(1)
        group = program // blocks_per_group
        local = (program % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
        channel = group * per_group + local
        return group, channel, channel // per_row, local < per_group

    @triton.jit
    def _time_step(delta_rows, step, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """(dt, pre-activation) at `step` for a block of channels; dt is 0 where masked: past the sequence end a
        step neither decays the state nor feeds it."""
        x = tl.load(delta_rows + step[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += bias[:, None]
        dt = x
        if SOFTPLUS:
            dt = _softplus(x)
        return tl.where(mask, dt, 0.0), x

    @triton.jit
    def _parameters(A_ptr, D_ptr, bias_ptr, channel, row, state, channel_mask, state_mask, n_state,
                    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_ROW: tl.constexpr):
        """A (channels, states), D and the dt bias (channels) of a block; padded states get A = 0 (decay 1) and
        B = C = 0, so they stay 0 and add nothing."""
        A = tl.load(A_ptr + channel[:, None] * n_state + state[None, :],
                    mask=channel_mask[:, None] & state_mask[None, :], other=0.0)
        D = tl.zeros(channel.shape, tl.float32)
        if HAS_D:
            D = tl.load(D_ptr + channel, mask=channel_mask, other=0.0)
        bias = tl.zeros(channel.shape, tl.float32)
        if HAS_BIAS:
            if BIAS_PER_ROW:
                bias = tl.load(bias_ptr + row, mask=channel_mask, other=0.0)
            else:
                bias = tl.load(bias_ptr + channel, mask=channel_mask, other=0.0)
        return A, D, bias

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, last_state_ptr, checkpoint_ptr,
        channels, length, n_state, per_group, per_row, blocks_per_group, num_chunks,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_ROW: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CHUNK_STEPS: tl.constexpr,
    ):
        sample = tl.program_id(0).to(tl.int64)
        group, channel, row, channel_mask = _channel_block(per_group, per_row, blocks_per_group, BLOCK_D)
        state = tl.arange(0, N_PAD)
        state_mask = state < n_state
        channel_state_mask = channel_mask[:, None] & state_mask[None, :]
        A, D, bias = _parameters(A_ptr, D_ptr, bias_ptr, channel, row, state, channel_mask, state_mask, n_state,
                                 HAS_D, HAS_BIAS, BIAS_PER_ROW)
        rows = sample * channels + channel  # (sample, channel) rows of u, y, the states and checkpoints
        u_rows = u_ptr + rows[:, None] * length
        y_rows = y_ptr + rows[:, None] * length
        delta_rows = delta_ptr + (sample * (channels // per_row) + row)[:, None] * length
        bc_offset = ((sample * (channels // per_group) + group) * n_state + state)[:, None] * length
        checkpoint_rows = checkpoint_ptr + (rows[:, None] * num_chunks * n_state + state[None, :])

        h = tl.zeros((BLOCK_D, N_PAD), tl.float32)
        for chunk in range(num_chunks):
            tl.store(checkpoint_rows + chunk * n_state, h, mask=channel_state_mask)
            step = chunk * CHUNK_STEPS + tl.arange(0, CHUNK_STEPS)
            step_mask = step < length
            mask = channel_mask[:, None] & step_mask[None, :]
            bc_mask = state_mask[:, None] & step_mask[None, :]
            u = tl.load(u_rows + step[None, :], mask=mask, other=0.0).to(tl.float32)
            dt, _ = _time_step(delta_rows, step, mask, bias, HAS_BIAS, SOFTPLUS)
            B = tl.load(B_ptr + bc_offset + step[None, :], mask=bc_mask, other=0.0).to(tl.float32)
            C = tl.load(C_ptr + bc_offset + step[None, :], mask=bc_mask, other=0.0).to(tl.float32)
            decay = tl.exp(dt[:, None, :] * A[:, :, None])
            states = _chunk_states(decay, (dt * u)[:, None, :] * B[None, :, :], h)
            y = tl.sum(states * C[None, :, :], axis=1)
            if HAS_D:
                y += D[:, None] * u
            tl.store(y_rows + step[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
            h = _last_step(states)
        tl.store(last_state_ptr + rows[:, None] * n_state + state[None, :], h, mask=channel_state_mask)

    @triton.jit
    def _scan_bwd_kernel(
        dy_ptr, dlast_state_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, checkpoint_ptr,
        du_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
        channels, length, n_state, per_group, per_row, blocks_per_group, num_chunks,
        HAS_DLAST: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_PER_ROW: tl.constexpr,
        SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, CHUNK_STEPS: tl.constexpr,
    ):
        sample = tl.program_id(0).to(tl.int64)
        group, channel, row, channel_mask = _channel_block(per_group, per_row, blocks_per_group, BLOCK_D)
        state = tl.arange(0, N_PAD)
        state_mask = state < n_state
        channel_state_mask = channel_mask[:, None] & state_mask[None, :]
        A, D, bias = _parameters(A_ptr, D_ptr, bias_ptr, channel, row, state, channel_mask, state_mask, n_state,
                                 HAS_D, HAS_BIAS, BIAS_PER_ROW)
        rows = sample * channels + channel
        state_offsets = rows[:, None] * n_state + state[None, :]
        u_rows = u_ptr + rows[:, None] * length
        dy_rows = dy_ptr + rows[:, None] * length
        delta_rows = delta_ptr + (sample * (channels // per_row) + row)[:, None] * length
        bc_offset = ((sample * (channels // per_group) + group) * n_state + state)[:, None] * length
        # this program's partial dB / dC: (samples, programs per sample, N, L)
        partial_offset = ((sample * tl.num_programs(1) + tl.program_id(1)) * n_state + state)[:, None] * length
        checkpoint_rows = checkpoint_ptr + (rows[:, None] * num_chunks * n_state + state[None, :])

        # the adjoint of the first step of the chunk to the right; the last step's is dL/d(last state)
        adjoint_after = tl.zeros((BLOCK_D, N_PAD), tl.float32)
        if HAS_DLAST:
            adjoint_after = tl.load(dlast_state_ptr + state_offsets, mask=channel_state_mask, other=0.0).to(tl.float32)
        dA = tl.zeros((BLOCK_D, N_PAD), tl.float32)
        dD = tl.zeros((BLOCK_D,), tl.float32)
        dbias = tl.zeros((BLOCK_D,), tl.float32)
        for reversed_chunk in range(num_chunks):
            chunk = num_chunks - 1 - reversed_chunk
            step = chunk * CHUNK_STEPS + tl.arange(0, CHUNK_STEPS)
            step_mask = step < length
            mask = channel_mask[:, None] & step_mask[None, :]
            bc_mask = state_mask[:, None] & step_mask[None, :]
            u = tl.load(u_rows + step[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_rows + step[None, :], mask=mask, other=0.0).to(tl.float32)
            dt, pre_activation = _time_step(delta_rows, step, mask, bias, HAS_BIAS, SOFTPLUS)
            B = tl.load(B_ptr + bc_offset + step[None, :], mask=bc_mask, other=0.0).to(tl.float32)
            inputs = (dt * u)[:, None, :] * B[None, :, :]
            entering = tl.load(checkpoint_rows + chunk * n_state, mask=channel_state_mask, other=0.0)
            states = _chunk_states(tl.exp(dt[:, None, :] * A[:, :, None]), inputs, entering)

            # the adjoint scan in reversed step order: g_t = C_t dy_t + decay_{t+1} g_{t+1}
            back = chunk * CHUNK_STEPS + (CHUNK_STEPS - 1) - tl.arange(0, CHUNK_STEPS)
            back_mask = channel_mask[:, None] & (back < length)[None, :]
            dt_next, _ = _time_step(delta_rows, back + 1, channel_mask[:, None] & (back + 1 < length)[None, :],
                                    bias, HAS_BIAS, SOFTPLUS)
            dy_back = tl.load(dy_rows + back[None, :], mask=back_mask, other=0.0).to(tl.float32)
            C_back = tl.load(C_ptr + bc_offset + back[None, :], mask=state_mask[:, None] & (back < length)[None, :],
                             other=0.0).to(tl.float32)
            adjoints_back = _chunk_states(tl.exp(dt_next[:, None, :] * A[:, :, None]),
                                          dy_back[:, None, :] * C_back[None, :, :], adjoint_after)
            adjoint_after = _last_step(adjoints_back)
            adjoints = tl.flip(adjoints_back, 2)

            tl.store(dC_ptr + partial_offset + step[None, :], tl.sum(states * dy[:, None, :], axis=0),
                     mask=bc_mask)
            tl.store(dB_ptr + partial_offset + step[None, :], tl.sum(adjoints * (dt * u)[:, None, :], axis=0),
                     mask=bc_mask)
            # dL/d(dt_t A) = g_t decay_t h_{t-1} = g_t (h_t - input_t)
            through_decay = adjoints * (states - inputs)
            dA += tl.sum(through_decay * dt[:, None, :], axis=2)
            adjoint_dtu = tl.sum(adjoints * B[None, :, :], axis=1)  # dL/d(dt u)
            ddt = tl.sum(through_decay * A[:, :, None], axis=1) + adjoint_dtu * u
            du = adjoint_dtu * dt
            if HAS_D:
                du += dy * D[:, None]
                dD += tl.sum(dy * u, axis=1)
            if SOFTPLUS:
                ddt *= _softplus_slope(pre_activation)
            ddt = tl.where(mask, ddt, 0.0)
            dbias += tl.sum(ddt, axis=1)
            tl.store(du_ptr + rows[:, None] * length + step[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(ddt_ptr + rows[:, None] * length + step[None, :], ddt.to(ddt_ptr.dtype.element_ty), mask=mask)
        tl.store(dA_ptr + state_offsets, dA, mask=channel_state_mask)
        if HAS_D:
            tl.store(dD_ptr + rows, dD, mask=channel_mask)
        if HAS_BIAS:
            tl.store(dbias_ptr + rows, dbias, mask=channel_mask)


def _launch_context(u: torch.Tensor):
    """Triton launches on the current CUDA device: make it u's."""
    return torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext()


def _contiguous(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _layout(u, delta, A, B):
    """Sizes the kernels take: (batch, channels, length, n_state, groups, rows, block, n_pad, blocks_per_group)."""
    batch, channels, length = u.shape
    n_state, groups, rows = A.shape[1], B.shape[1], delta.shape[1]
    block, n_pad, blocks_per_group = _tile(channels // groups, n_state)
    return batch, channels, length, n_state, groups, rows, block, n_pad, blocks_per_group


def forward(u, delta, A, B, C, D, delta_bias, delta_softplus: bool, out_float: bool):
    """(y, last_state, checkpoints) as the op `selective_scan::fwd` returns them: y (batch, channels, L) in fp32 or
    u's dtype, last_state (batch, channels, N) fp32, checkpoints (batch, channels, ceil(L / CHUNK), N) fp32.
    delta, B, C in u's dtype; A, D, delta_bias fp32 (the op's contract)."""
    check_supported(u, A.shape[1])
    u, delta, A, B, C, D, delta_bias = _contiguous(u, delta, A, B, C, D, delta_bias)
    batch, channels, length, n_state, groups, rows, block, n_pad, blocks_per_group = _layout(u, delta, A, B)
    y = u.new_empty((batch, channels, length), dtype=torch.float32 if out_float else u.dtype)
    last_state = u.new_zeros((batch, channels, n_state), dtype=torch.float32)
    num_chunks = triton.cdiv(length, CHUNK)
    checkpoints = u.new_empty((batch, channels, num_chunks, n_state), dtype=torch.float32)
    if y.numel() == 0:
        return y, last_state, checkpoints
    bias_per_row = delta_bias is not None and delta_bias.shape[0] != channels
    with _launch_context(u):
        _scan_fwd_kernel[(batch, groups * blocks_per_group)](
            u, delta, A, B, C, D, delta_bias, y, last_state, checkpoints,
            channels, length, n_state, channels // groups, channels // rows, blocks_per_group, num_chunks,
            HAS_D=D is not None, HAS_BIAS=delta_bias is not None, BIAS_PER_ROW=bias_per_row,
            SOFTPLUS=bool(delta_softplus), BLOCK_D=block, N_PAD=n_pad, CHUNK_STEPS=CHUNK, num_warps=FORWARD_WARPS)
    return y, last_state, checkpoints


def backward(dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints, delta_softplus: bool):
    """(du, ddelta, dA, dB, dC, dD, ddelta_bias) as the op `selective_scan::bwd` returns them (dD / ddelta_bias
    empty when D / delta_bias are None), from `forward`'s checkpoints."""
    check_supported(u, A.shape[1])
    dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints = _contiguous(
        dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints)
    batch, channels, length, n_state, groups, rows, block, n_pad, blocks_per_group = _layout(u, delta, A, B)
    num_chunks = triton.cdiv(length, CHUNK)
    if tuple(checkpoints.shape) != (batch, channels, num_chunks, n_state):
        raise ValueError(f"selective_scan (triton): `checkpoints` has shape {tuple(checkpoints.shape)}; the Triton "
                         f"forward saves ({batch}, {channels}, {num_chunks}, {n_state}) for these inputs")
    empty = u.new_empty(0)
    if u.numel() == 0:
        return (torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(C), empty if D is None else torch.zeros_like(D),
                empty if delta_bias is None else torch.zeros_like(delta_bias))
    per_row = channels // rows
    du = torch.empty_like(u)
    # ddelta is written per channel: straight into its dtype, or in fp32 and summed over a delta row's channels
    ddt = torch.empty_like(delta) if per_row == 1 else u.new_empty((batch, channels, length), dtype=torch.float32)
    # one dB / dC partial per channel block: in B's dtype when a block holds a whole group, else fp32 and summed
    partial_dtype = B.dtype if blocks_per_group == 1 else torch.float32
    dB = u.new_empty((batch, groups, blocks_per_group, n_state, length), dtype=partial_dtype)
    dC = torch.empty_like(dB)
    dA = u.new_empty((batch, channels, n_state), dtype=torch.float32)
    dD = u.new_empty((batch, channels), dtype=torch.float32) if D is not None else None
    dbias = u.new_empty((batch, channels), dtype=torch.float32) if delta_bias is not None else None
    bias_per_row = delta_bias is not None and delta_bias.shape[0] != channels
    with _launch_context(u):
        _scan_bwd_kernel[(batch, groups * blocks_per_group)](
            dy, dlast_state, u, delta, A, B, C, D, delta_bias, checkpoints,
            du, ddt, dB, dC, dA, dD, dbias,
            channels, length, n_state, channels // groups, per_row, blocks_per_group, num_chunks,
            HAS_DLAST=dlast_state is not None, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
            BIAS_PER_ROW=bias_per_row, SOFTPLUS=bool(delta_softplus), BLOCK_D=block, N_PAD=n_pad,
            CHUNK_STEPS=CHUNK, num_warps=BACKWARD_WARPS)
    ddelta = ddt if per_row == 1 else ddt.view(batch, rows, per_row, length).sum(2).to(delta.dtype)
    dB, dC = (t.sum(2).to(B.dtype) if blocks_per_group > 1 else t.squeeze(2) for t in (dB, dC))
    if dbias is not None:
        dbias = dbias.sum(0)
        dbias = (dbias.view(rows, per_row).sum(1) if bias_per_row else dbias).to(delta_bias.dtype)
    return (du, ddelta, dA.sum(0).to(A.dtype), dB, dC, empty if D is None else dD.sum(0).to(D.dtype),
            empty if delta_bias is None else dbias)
