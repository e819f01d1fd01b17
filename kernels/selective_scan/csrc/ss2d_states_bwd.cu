// Fused SS2D backward for d_state 2..16 (see ss2d_states.cuh). The gradient reaching h_t[n] is
// dh_t[n] = C_t[n] dy_t + g_{t+1}[n], with the carry g_t[n] = a_t[n] dh_t[n].
//
// Lane pairs: a warp owns one (sample, route, 16 channels), lane = 2 channel + part, and part p of a channel holds
// its states [p kStates / 2, (p + 1) kStates / 2): their carries, A gradients, decays and recomputed values. That
// halves every per-state array a lane holds, so the kernel fits 128 registers and 13.75 KB of shared memory per warp
// at 16 states and dt rank 6 (states_bwd_floats): 15 warps per SM on sm_90, where lane = channel needed about 206
// registers and 36 KB (6 warps). Per step the pair adds its two halves of the per-channel sums (the dt
// pre-activation, dh . B and the decay term of dt's gradient) with one shuffle each.
//
// Walk: chunks of kStatesChunk steps = kChunkGroups groups of kStatesStep, from the last. Per chunk the warp walks
// groups 0 .. G - 2 forward from the checkpoint once, keeping the states entering groups 1 .. G - 1 in shared
// memory; then, group by group from the last, it recomputes the group's h_{t-1} into shared memory from the states
// entering it (group 0 from the checkpoint, read again) and walks the group in reverse. So each group's forward runs
// twice, the last one's once. A step's x, dy and dt sit in shared memory as well, so the step loops run without
// unrolling and the kernel's code stays small enough for the instruction caches.
//
// Per step, the route's part of dx is stored into its own map du_k in x's dtype by the channel's first lane, as the
// N = 1 backward does (the caller sums the four maps). The gradients of the route's x_dbl row ([d dt-rank values,
// dB, dC], each a sum over the warp's 16 channels) are summed over the 16 lanes of each part with
// warp_sum_scatter at lane stride 2: dB and dC of the part's states per step, and the part's half of the rank
// values (each part owns half of them, their W_dt values and W_dt gradient sums) once per group, from the steps'
// dt gradients dz kept in shared memory: per rank value, one sum over the 16 channels for all 8 steps. Parameter
// gradients are summed per lane (W_dt's in shared memory: any dt rank) and added once at the end.
#include "ss2d_states.cuh"

namespace selective_scan {
namespace ss2d {

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPairLanes = 2;  // lanes per channel
constexpr int kPairChannels = kLanes / kPairLanes;  // channels per warp
// Resident warps per SM the kernel is compiled for (128 registers). Its shared memory (states_bwd_floats, plus the
// 1 KB each block reserves) allows 15 on sm_90 at 16 states and dt ranks up to 8, 14 at 12, 13 at 24.
constexpr int kStatesBwdWarpsPerSm = 16;
// x_dbl row values each lane loads before storing them (StatesStage::load_rows)
constexpr int kRowLoadBatch = 8;
constexpr int kChunkGroups = kStatesChunk / kStatesStep;  // step groups per chunk
static_assert(kStatesChunk % kStatesStep == 0 && kChunkGroups >= 2, "a chunk is two or more whole step groups");
// Slots of a lane's states in shared memory (kStates / 2 floats per lane each). Slot r - 1 holds the states entering
// group r (0 < r < kChunkGroups); group q's h_{t-1} at step i goes to slot max(q - 1, 0) + i: the first of them is
// its entry's slot, the others overwrite the entries of later groups, spent by then, and never an earlier group's.
constexpr int kStateSlots = kChunkGroups - 2 + kStatesStep;

// Floats of shared memory per warp: StatesStage (rows, the lanes' W_dt values), the lanes' W_dt gradient sums
// [rank_pad / 2][32], the state slots [kStateSlots][kStates / 2][32], and the group's x, dy and dt per channel
// [3][kStatesStep][16]. At 16 states: 13.75 KB at dt rank 6, 15 KB at 12, 16.25 KB at 24, 20 KB at 48, 23.75 KB
// at 66.
template <int kStates>
__host__ __device__ int states_bwd_floats(const Shape& s) {
  return StatesStage<kStates, kPairLanes>::floats(s) +
         (states_rank_pad(s.rank) + kStateSlots * kStates) / kPairLanes * kLanes + 3 * kStatesStep * kPairChannels;
}

template <typename T, int kStates>
__global__ void __launch_bounds__(kLanes, kStatesBwdWarpsPerSm) ss2d_states_bwd_kernel(const BwdParams p) {
  constexpr int kLaneStates = kStates / kPairLanes;
  extern __shared__ float4 shared_words[];
  const Shape& s = p.s;
  const Task task(s, blockIdx.x % kRoutes, blockIdx.x / kRoutes, kPairLanes);
  const int lane = task.lane, part = lane % kPairLanes, channel = lane / kPairLanes;
  const int width = s.row_width(), first_state = part * kLaneStates;
  float* const shared = reinterpret_cast<float*>(shared_words);
  StatesStage<kStates, kPairLanes> stage(s, shared);
  float* const dw_sum = shared + StatesStage<kStates, kPairLanes>::floats(s);
  float* const slots = dw_sum + stage.share * kLanes;  // state m of slot r at [(r * kLaneStates + m) * kLanes + lane]
  // step i's x, dy and dt of the lane's channel at [i * kPairChannels + channel]
  float* const xs = slots + kStateSlots * kLaneStates * kLanes;
  float* const dys = xs + kStatesStep * kPairChannels;
  float* const dts = dys + kStatesStep * kPairChannels;
  stage.load_weights(p, task);
  for (int j = 0; j < stage.share; ++j) dw_sum[j * kLanes + lane] = 0.f;
  const StatesRoute<kStates, kPairLanes> route(p, task);
  const long base = task.map_offset(s);
  const T* x = static_cast<const T*>(p.x) + base;
  const float* dy = p.dy + base;
  T* du = static_cast<T*>(p.du) + task.k * s.batch * static_cast<long>(s.length) * s.dim + base;
  float* dxdbl = p.dxdbl + task.rows_offset(s, width);
  float g[kLaneStates], dA[kLaneStates], dbias = 0.f, dD = 0.f;
#pragma unroll
  for (int m = 0; m < kLaneStates; ++m) g[m] = dA[m] = 0.f;

  // the lane's states entering chunk c
  const auto load_checkpoint = [&](int c, float (&h)[kLaneStates]) {
    const long at = states_ckpt_offset(s, task, c) + static_cast<long>(first_state) * s.dim;
#pragma unroll
    for (int m = 0; m < kLaneStates; ++m)
      h[m] = task.active && first_state + m < s.d_state ? p.ckpt[at + static_cast<long>(m) * s.dim] : 0.f;
  };
  // the lane's states in slot r (each lane reads back only what it stored: no warp synchronisation)
  const auto slot_states = [&](int r, int m) -> float& { return slots[(r * kLaneStates + m) * kLanes + lane]; };
  // the group's rows, x and (with_dy) dy into shared memory; x and dy zero for inactive channels. The channel's
  // lanes load alternate steps.
  int my_pos;
  const auto load_group = [&](int t0, int steps, bool with_dy) {
    my_pos = chunk_position(s, task, t0, steps);
    stage.template load_rows<T, kRowLoadBatch>(s, task, p.xdbl, my_pos, steps);
#pragma unroll
    for (int i0 = 0; i0 < kStatesStep; i0 += kPairLanes) {
      const int i = i0 + part, at = __shfl_sync(kFullMask, my_pos, i) * s.dim;
      xs[i * kPairChannels + channel] = i < steps ? task.on * load_float(x + at) : 0.f;
      if (with_dy) dys[i * kPairChannels + channel] = i < steps ? task.on * __ldg(dy + at) : 0.f;
    }
    __syncwarp();
  };
  // dt of step i; advances the lane's states through it (h_{t-1} -> h_t)
  const auto step_forward = [&](int i, float (&h)[kLaneStates]) {
    float e, B[kLaneStates], C[kLaneStates];
    const float dt = softplus(stage.dt_preact(route.bias, i, lane), e);
    const float dtx = dt * xs[i * kPairChannels + channel];
    stage.state_inputs(i, lane, B, C);
#pragma unroll
    for (int m = 0; m < kLaneStates; ++m) h[m] = fmaf(fast_exp2(dt * route.A2[m]), h[m], dtx * B[m]);
    return dt;
  };

  // The step loops are not unrolled: a step's values sit in shared memory, so the walk's code stays a few KB (fully
  // unrolled over a group it took over 100 KB, beyond the instruction caches).
  for (int c = s.num_chunks - 1; c >= 0; --c) {
    const int c0 = c * kStatesChunk;
    const int groups = min(kChunkGroups, (s.length - c0 + kStatesStep - 1) / kStatesStep);  // whole but the last
    // walk groups 0 .. groups - 2, saving the states entering groups 1 .. groups - 2; h ends entering the last
    float h[kLaneStates];
    load_checkpoint(c, h);
#pragma unroll 1
    for (int r = 0; r < groups - 1; ++r) {
      if (r > 0) {
#pragma unroll
        for (int m = 0; m < kLaneStates; ++m) slot_states(r - 1, m) = h[m];
      }
      load_group(c0 + r * kStatesStep, kStatesStep, false);
#pragma unroll 1
      for (int i = 0; i < kStatesStep; ++i) step_forward(i, h);
    }
#pragma unroll 1
    for (int q = groups - 1; q >= 0; --q) {
      const int t0 = c0 + q * kStatesStep, steps = min(kStatesStep, s.length - t0);
      if (q < groups - 1) {  // the states entering group q (h holds those entering the last)
        if (q == 0) {
          load_checkpoint(c, h);
        } else {
#pragma unroll
          for (int m = 0; m < kLaneStates; ++m) h[m] = slot_states(q - 1, m);
        }
      }
      load_group(t0, steps, true);
      // recompute: h_{t-1} of each step into the slots from max(q - 1, 0), dt into dts
      const int first_slot = max(q - 1, 0);
#pragma unroll 1
      for (int i = 0; i < steps; ++i) {
#pragma unroll
        for (int m = 0; m < kLaneStates; ++m) slot_states(first_slot + i, m) = h[m];
        const float dt = step_forward(i, h);
        if (part == 0) dts[i * kPairChannels + channel] = dt;
      }
      __syncwarp();
      // the adjoint, from the group's last step
#pragma unroll 1
      for (int i = steps - 1; i >= 0; --i) {
        const int at = i * kPairChannels + channel;
        const float dt = dts[at], xt = xs[at], dyt = dys[at], dtx = dt * xt;
        float B[kLaneStates], C[kLaneStates];
        stage.state_inputs(i, lane, B, C);
        float row_grads[2 * kLaneStates];  // per lane: dB then dC of its states
        float dh_B = 0.f, dh_h_decay_A2 = 0.f;
#pragma unroll
        for (int m = 0; m < kLaneStates; ++m) {
          const float h_prev = slot_states(first_slot + i, m);
          const float a = fast_exp2(dt * route.A2[m]);
          const float h_t = fmaf(a, h_prev, dtx * B[m]);
          const float dh = fmaf(C[m], dyt, g[m]);  // y_t = C . h_t + D x_t
          row_grads[m] = dh * dtx;                 // h_t = a h_{t-1} + dt B x_t
          row_grads[kLaneStates + m] = dyt * h_t;
          dh_B = fmaf(dh, B[m], dh_B);
          const float dh_h_decay = dh * h_prev * a;
          dh_h_decay_A2 = fmaf(dh_h_decay, route.A2[m], dh_h_decay_A2);
          dA[m] = fmaf(dh_h_decay, dt, dA[m]);  // d a / dA = a dt
          g[m] = a * dh;
        }
        // the channel's sums over both parts (the same in both lanes)
        dh_B += __shfl_xor_sync(kFullMask, dh_B, 1);
        dh_h_decay_A2 += __shfl_xor_sync(kFullMask, dh_h_decay_A2, 1);
        // d a / d dt = a A, A = A2 ln 2
        const float dz = fmaf(xt, dh_B, dh_h_decay_A2 * kLn2) * softplus_slope_from_value(dt);
        dbias += dz;
        dD = fmaf(dyt, xt, dD);
        const int pos = __shfl_sync(kFullMask, my_pos, i);
        if (task.active && part == 0) du[pos * s.dim] = from_float<T>(fmaf(route.Dk, dyt, dt * dh_B));
        {  // dB, dC: lane 2 v + p (v < 2 kLaneStates) adds value v of part p's
          float* const row = dxdbl + static_cast<long>(pos) * kRoutes * width;
          const float sum = warp_sum_scatter<kPairLanes>(row_grads, lane);
          const int v = channel, n = first_state + v % kLaneStates;
          if (v < 2 * kLaneStates && n < s.d_state)
            atomicAdd(row + s.rank + (v < kLaneStates ? 0 : s.d_state) + n, sum);
        }
        __syncwarp();  // both lanes of the pair have read dt: dz takes its place
        if (part == 0) dts[at] = dz;
      }
      __syncwarp();
      // The rank values' gradients, once per group: d r_i[j] = sum over channels of W_dt[k, d, j] dz_i and W_dt's
      // gradient sums dz_i r_i[j], for the part's share of j, all of the group's steps at once. Lane 2 v + p (v < 8)
      // adds step v's value j of part p's.
      float dzs[kStatesStep];
#pragma unroll
      for (int i = 0; i < kStatesStep; ++i) dzs[i] = i < steps ? dts[i * kPairChannels + channel] : 0.f;
      const int my_step = channel % kStatesStep;
      float* const my_row = dxdbl + static_cast<long>(__shfl_sync(kFullMask, my_pos, my_step)) * kRoutes * width;
      for (int jj = 0; jj < stage.share; ++jj) {
        const float w = stage.w[jj * kLanes + lane];
        float terms[kStatesStep], dw = 0.f;
#pragma unroll
        for (int i = 0; i < kStatesStep; ++i) {
          terms[i] = dzs[i] * w;
          if (i < steps) dw = fmaf(dzs[i], stage.rank_values(i, lane)[jj], dw);  // rows past the group: stale
        }
        dw_sum[jj * kLanes + lane] += dw;
        const float sum = warp_sum_scatter<kPairLanes>(terms, lane);
        const int j = part * stage.share + jj;
        if (channel < kStatesStep && my_step < steps && j < s.rank) atomicAdd(my_row + j, sum);
      }
    }
  }
  if (!task.active) return;
  const long kd = task.route_channel(s);
  for (int jj = 0; jj < stage.share; ++jj) {
    const int j = part * stage.share + jj;
    if (j < s.rank)
      atomicAdd(p.ddt_weight + (static_cast<long>(task.k) * s.rank + j) * s.dim + task.d, dw_sum[jj * kLanes + lane]);
  }
  if (part == 0) {
    atomicAdd(p.ddt_bias + kd, dbias);
    atomicAdd(p.dDs + kd, dD);
  }
#pragma unroll
  for (int m = 0; m < kLaneStates; ++m)  // dA / dA_log = A
    if (first_state + m < s.d_state)
      atomicAdd(p.dA_log + kd * s.d_state + first_state + m, dA[m] * route.A2[m] * kLn2);
}

cudaError_t launch_ss2d_states_bwd(const BwdParams& params, ScalarKind dtype, cudaStream_t stream) {
  BwdParams p = params;
  p.s.groups = (p.s.dim + kPairChannels - 1) / kPairChannels;
  return dispatch_dtype_states(dtype, p.s.d_state, [&](auto tag, auto states) {
    constexpr int kStates = decltype(states)::value;
    // at most 23.75 KB (16 states, dt rank 66): under the 48 KB a launch may ask for without opting in
    const size_t bytes = states_bwd_floats<kStates>(p.s) * sizeof(float);
    ss2d_states_bwd_kernel<decltype(tag), kStates><<<num_route_sets(p.s) * kRoutes, kLanes, bytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace ss2d
}  // namespace selective_scan
