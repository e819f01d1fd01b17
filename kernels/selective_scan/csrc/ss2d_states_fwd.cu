// Fused SS2D forward for d_state 2..16 (see ss2d_states.cuh): each warp walks its route from the start, kStatesStep
// steps at a time, adds C . h + D x into y at every position and saves the states entering every chunk of
// kStatesChunk steps.
#include "ss2d_states.cuh"

namespace selective_scan {
namespace ss2d {

// Compiled for 24 resident warps per SM (80 registers on sm_90; VMamba's stage 1 at batch 128 is about 23 warps per
// SM of an H100). Unbounded, ptxas spills on sm_89.
constexpr int kStatesFwdWarpsPerSm = 24;

template <typename T, int kStates>
__global__ void __launch_bounds__(kLanes, kStatesFwdWarpsPerSm) ss2d_states_fwd_kernel(const FwdParams p) {
  extern __shared__ float4 shared_words[];
  const Shape& s = p.s;
  const Task task(s, blockIdx.x % kRoutes, blockIdx.x / kRoutes);
  StatesStage<kStates> stage(s, reinterpret_cast<float*>(shared_words));
  stage.load_weights(p, task);
  const StatesRoute<kStates> route(p, task);
  const long base = task.map_offset(s);
  const T* x = static_cast<const T*>(p.x) + base;
  float* y = p.y + base;
  float h[kStates];
#pragma unroll
  for (int n = 0; n < kStates; ++n) h[n] = 0.f;
  for (int t0 = 0; t0 < s.length; t0 += kStatesStep) {
    if (t0 % kStatesChunk == 0 && task.active) {
      const long at = states_ckpt_offset(s, task, t0 / kStatesChunk);
#pragma unroll
      for (int n = 0; n < kStates; ++n)
        if (n < s.d_state) p.ckpt[at + static_cast<long>(n) * s.dim] = h[n];
    }
    const int steps = min(kStatesStep, s.length - t0);
    const int my_pos = chunk_position(s, task, t0, steps);
    stage.template load_rows<T>(s, task, p.xdbl, my_pos, steps);
    float xv[kStatesStep];
    int off[kStatesStep];
#pragma unroll
    for (int i = 0; i < kStatesStep; ++i) {
      off[i] = __shfl_sync(kFullMask, my_pos, i) * s.dim;
      xv[i] = i < steps ? task.on * load_float(x + off[i]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kStatesStep; ++i) {
      if (i < steps) {
        float e, B[kStates], C[kStates];
        const float dt = softplus(stage.dt_preact(route.bias, i, task.lane), e);
        const float dtx = dt * xv[i];
        stage.state_inputs(i, task.lane, B, C);
        float out = route.Dk * xv[i];
#pragma unroll
        for (int n = 0; n < kStates; ++n) {
          h[n] = fmaf(fast_exp2(dt * route.A2[n]), h[n], dtx * B[n]);
          out = fmaf(C[n], h[n], out);
        }
        atomicAdd(y + off[i], task.on * out);
      }
    }
  }
}

cudaError_t launch_ss2d_states_fwd(const FwdParams& p, ScalarKind dtype, cudaStream_t stream) {
  return dispatch_dtype_states(dtype, p.s.d_state, [&](auto tag, auto states) {
    constexpr int kStates = decltype(states)::value;
    // at most 13 KB (16 states, dt rank 66)
    const size_t bytes = StatesStage<kStates>::floats(p.s) * sizeof(float);
    ss2d_states_fwd_kernel<decltype(tag), kStates><<<num_route_sets(p.s) * kRoutes, kLanes, bytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace ss2d
}  // namespace selective_scan
