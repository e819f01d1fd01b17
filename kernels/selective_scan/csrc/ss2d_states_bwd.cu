// Fused SS2D backward for d_state 2..16 (see ss2d_states.cuh). The gradient reaching h_t[n] is
// dh_t[n] = C_t[n] dy_t + g_{t+1}[n], with the carry g_t[n] = a_t[n] dh_t[n]. Each warp walks its route's chunks
// from the last. Per chunk it first walks the chunk forward from its checkpoint, keeping the states entering each
// group of kStatesStep steps in shared memory; then, group by group from the last, it recomputes the group's
// states (h_{t-1} of every step into shared memory, dt in registers) and walks the group in reverse. So the
// backward recomputes each step's forward twice (a chunk's last group once), and a warp holds a chunk's group
// entries and one group's states on chip: (kStatesChunk / kStatesStep + kStatesStep) x kStates floats per lane.
//
// Per step, the route's part of dx is stored into its own map du_k in x's dtype, as the N = 1 backward does (the
// caller sums the four maps). The gradients of the route's x_dbl row ([d dt-rank values, dB, dC], each a sum over
// the warp's 32 channels) are summed across the lanes with warp_sum_scatter, each lane ending with one value to
// add; parameter gradients are summed per lane (W_dt's in shared memory: any dt rank) and added once at the end.
#include "ss2d_states.cuh"

namespace selective_scan {
namespace ss2d {

constexpr float kLn2 = 0.6931471805599453f;

// Floats of shared memory per warp: StatesStage, W_dt's gradient sums [rank_pad][32], the states entering each
// step group of a chunk [groups][kStates][32], and h_{t-1} at each step of a group [kStatesStep][kStates][32].
template <int kStates>
__host__ __device__ int states_bwd_floats(const Shape& s) {
  return StatesStage<kStates>::floats(s) + states_rank_pad(s.rank) * kLanes +
         (kStatesChunk / kStatesStep + kStatesStep) * kStates * kLanes;
}

// Shared memory (36 KB per warp at 16 states and dt rank 6) allows 6 warps per SM on sm_90; registers are not the
// limit there, so they are not capped (about 206 at 16 states; left to choose, ptxas took 168 and spilled).
template <typename T, int kStates>
__global__ void __launch_bounds__(kLanes, 1) ss2d_states_bwd_kernel(const BwdParams p) {
  extern __shared__ float4 shared_words[];
  const Shape& s = p.s;
  const Task task(s, blockIdx.x % kRoutes, blockIdx.x / kRoutes);
  const int lane = task.lane, width = s.row_width();
  float* const shared = reinterpret_cast<float*>(shared_words);
  StatesStage<kStates> stage(s, shared);
  float* const dw_sum = shared + StatesStage<kStates>::floats(s);
  float* const entering = dw_sum + stage.rank_pad * kLanes;
  float* const before = entering + kStatesChunk / kStatesStep * kStates * kLanes;
  stage.load_weights(p, task);
  for (int j = 0; j < stage.rank_pad; ++j) dw_sum[j * kLanes + lane] = 0.f;
  const StatesRoute<kStates> route(p, task);
  const long base = task.map_offset(s);
  const T* x = static_cast<const T*>(p.x) + base;
  const float* dy = p.dy + base;
  T* du = static_cast<T*>(p.du) + task.k * s.batch * static_cast<long>(s.length) * s.dim + base;
  float* dxdbl = p.dxdbl + task.rows_offset(s, width);
  float g[kStates], dA[kStates], dbias = 0.f, dD = 0.f;
#pragma unroll
  for (int n = 0; n < kStates; ++n) g[n] = dA[n] = 0.f;

  // x (and dy) of the group's steps, zero for inactive lanes; the rows into shared memory
  float xv[kStatesStep], dyv[kStatesStep];
  int my_pos;
  const auto load_group = [&](int t0, int steps, bool with_dy) {
    my_pos = chunk_position(s, task, t0, steps);
    stage.template load_rows<T>(s, task, p.xdbl, my_pos, steps);
#pragma unroll
    for (int i = 0; i < kStatesStep; ++i) {
      const int at = __shfl_sync(kFullMask, my_pos, i) * s.dim;
      xv[i] = i < steps ? task.on * load_float(x + at) : 0.f;
      if (with_dy) dyv[i] = i < steps ? task.on * __ldg(dy + at) : 0.f;
    }
  };
  // dt of step i; advances h through it (h_{t-1} -> h_t)
  const auto step_forward = [&](int i, float (&h)[kStates]) {
    float e, B[kStates], C[kStates];
    const float dt = softplus(stage.dt_preact(route.bias, i, lane), e);
    const float dtx = dt * xv[i];
    stage.state_inputs(i, B, C);
#pragma unroll
    for (int n = 0; n < kStates; ++n) h[n] = fmaf(fast_exp2(dt * route.A2[n]), h[n], dtx * B[n]);
    return dt;
  };

  for (int c = s.num_chunks - 1; c >= 0; --c) {
    const int c0 = c * kStatesChunk;
    const int groups = (min(kStatesChunk, s.length - c0) + kStatesStep - 1) / kStatesStep;
    float h[kStates];
    const long ckpt_at = states_ckpt_offset(s, task, c);
#pragma unroll
    for (int n = 0; n < kStates; ++n)
      h[n] = task.active && n < s.d_state ? p.ckpt[ckpt_at + static_cast<long>(n) * s.dim] : 0.f;
    // the states entering each group (all groups but the last are full)
    for (int q = 0; q < groups; ++q) {
#pragma unroll
      for (int n = 0; n < kStates; ++n) entering[(q * kStates + n) * kLanes + lane] = h[n];
      if (q == groups - 1) break;
      load_group(c0 + q * kStatesStep, kStatesStep, false);
#pragma unroll
      for (int i = 0; i < kStatesStep; ++i) step_forward(i, h);
    }
    for (int q = groups - 1; q >= 0; --q) {
      const int t0 = c0 + q * kStatesStep, steps = min(kStatesStep, s.length - t0);
      load_group(t0, steps, true);
      // recompute: h_{t-1} of each step into `before` (each lane reads back only its own values: no barrier)
#pragma unroll
      for (int n = 0; n < kStates; ++n) h[n] = entering[(q * kStates + n) * kLanes + lane];
      float dts[kStatesStep];
#pragma unroll
      for (int i = 0; i < kStatesStep; ++i) {
        if (i < steps) {
#pragma unroll
          for (int n = 0; n < kStates; ++n) before[(i * kStates + n) * kLanes + lane] = h[n];
          dts[i] = step_forward(i, h);
        }
      }
      // the adjoint, from the group's last step
#pragma unroll
      for (int i = kStatesStep - 1; i >= 0; --i) {
        if (i >= steps) continue;
        const float dt = dts[i], xt = xv[i], dyt = dyv[i], dtx = dt * xt;
        float B[kStates], C[kStates];
        stage.state_inputs(i, B, C);
        float row_grads[2 * kStates];  // per lane: dB[n] then dC[n]
        float dh_B = 0.f, dh_h_decay_A2 = 0.f;
#pragma unroll
        for (int n = 0; n < kStates; ++n) {
          const float h_prev = before[(i * kStates + n) * kLanes + lane];
          const float a = fast_exp2(dt * route.A2[n]);
          const float h_t = fmaf(a, h_prev, dtx * B[n]);
          const float dh = fmaf(C[n], dyt, g[n]);  // y_t = C . h_t + D x_t
          row_grads[n] = dh * dtx;                 // h_t = a h_{t-1} + dt B x_t
          row_grads[kStates + n] = dyt * h_t;
          dh_B = fmaf(dh, B[n], dh_B);
          const float dh_h_decay = dh * h_prev * a;
          dh_h_decay_A2 = fmaf(dh_h_decay, route.A2[n], dh_h_decay_A2);
          dA[n] = fmaf(dh_h_decay, dt, dA[n]);  // d a / dA = a dt
          g[n] = a * dh;
        }
        // d a / d dt = a A, A = A2 ln 2
        const float dz = fmaf(xt, dh_B, dh_h_decay_A2 * kLn2) * softplus_slope_from_value(dt);
        dbias += dz;
        dD = fmaf(dyt, xt, dD);
        const int pos = __shfl_sync(kFullMask, my_pos, i);
        if (task.active) du[pos * s.dim] = from_float<T>(fmaf(route.Dk, dyt, dt * dh_B));
        float* const row = dxdbl + static_cast<long>(pos) * kRoutes * width;
        {  // dB, dC: lane m < 2 kStates adds value m
          const float sum = warp_sum_scatter(row_grads, lane);
          const int n = lane % kStates;
          if (lane < 2 * kStates && n < s.d_state)
            atomicAdd(row + s.rank + (lane < kStates ? 0 : s.d_state) + n, sum);
        }
        const float* r = stage.rows + i * stage.stride + 2 * kStates;
        for (int j0 = 0; j0 < stage.rank_pad; j0 += 8) {
          // d rank value j = sum over channels of W_dt[k, d, j] dz; lane m < 8 adds value j0 + m
          float terms[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            float& sum = dw_sum[(j0 + e) * kLanes + lane];
            sum = fmaf(dz, r[j0 + e], sum);
            terms[e] = dz * stage.w[(j0 + e) * kLanes + lane];
          }
          const float sum = warp_sum_scatter(terms, lane);
          if (lane < 8 && j0 + lane < s.rank) atomicAdd(row + j0 + lane, sum);
        }
      }
    }
  }
  if (!task.active) return;
  const long kd = task.route_channel(s);
  for (int j = 0; j < s.rank; ++j)
    atomicAdd(p.ddt_weight + (static_cast<long>(task.k) * s.rank + j) * s.dim + task.d, dw_sum[j * kLanes + lane]);
  atomicAdd(p.ddt_bias + kd, dbias);
#pragma unroll
  for (int n = 0; n < kStates; ++n)
    if (n < s.d_state) atomicAdd(p.dA_log + kd * s.d_state + n, dA[n] * route.A2[n] * kLn2);  // dA / dA_log = A
  atomicAdd(p.dDs + kd, dD);
}

cudaError_t launch_ss2d_states_bwd(const BwdParams& p, ScalarKind dtype, cudaStream_t stream) {
  return dispatch_dtype_states(dtype, p.s.d_state, [&](auto tag, auto states) {
    constexpr int kStates = decltype(states)::value;
    const auto kernel = ss2d_states_bwd_kernel<decltype(tag), kStates>;
    const int bytes = states_bwd_floats<kStates>(p.s) * static_cast<int>(sizeof(float));
    // the opt-in above 48 KB is per kernel and device: set it on every launch (a cheap attribute write)
    if (bytes > 48 * 1024) {
      const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (status != cudaSuccess) return status;
    }
    kernel<<<num_route_sets(p.s) * kRoutes, kLanes, bytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace ss2d
}  // namespace selective_scan
