// Fused SS2D forward (see ss2d_fused.cuh): each warp walks its route segment chunk by chunk from the state
// entering the segment, saves the state entering every chunk for the backward, and adds C h + D x into y at
// every position.
#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {

// Steps t0 .. t0 + n - 1. kFull: n == kChunk (no bound checks).
template <typename T, int kV, bool kFull>
__device__ __forceinline__ void forward_chunk(const FwdParams& p, const Task& task, const RouteParams<kV - 2>& rp,
                                              RowStage<kV>& stage, const T* x, float* y, int t0,
                                              int n, float& h) {
  constexpr int kChunk = chunk_for_kv(kV);
  const Shape& s = p.s;
  const int my_pos = chunk_position(s, task, t0, n);
  stage.template load<T>(s, task, p.xdbl, my_pos, n);
  float xv[kChunk];
  int off[kChunk];
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    if (kFull || i < n) {
      off[i] = __shfl_sync(kFullMask, my_pos, i) * s.dim;
      xv[i] = load_float(x + off[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    if (kFull || i < n) {
      const float4 bc = stage.word(i, 0);  // B, C
      float e;
      const float dt = softplus(dt_preact(rp, stage, i), e);
      h = fmaf(fast_exp2(dt * rp.A2), h, dt * bc.x * xv[i]);
      atomicAdd(y + off[i], task.on * fmaf(bc.y, h, rp.Dk * xv[i]));
    }
  }
}

// Capped at 128 registers (4 blocks, 16 warps per SM; unbounded it takes ~130).
template <typename T, int kV>
__global__ void __launch_bounds__(kLanes * kWarpsPerBlock, kFwdBlocksPerSm) ss2d_fwd_kernel(const FwdParams p) {
  constexpr int kChunk = chunk_for_kv(kV);
  __shared__ RowStage<kV> stages[kWarpsPerBlock];
  const Shape& s = p.s;
  const Task task(s);
  RowStage<kV>& stage = stages[task.k];
  const RouteParams<kV - 2> rp(p, task);
  const long base = task.map_offset(s);
  const T* x = static_cast<const T*>(p.x) + base;
  float* y = p.y + base;
  float h = task.segment_start(s, p.start);
  task.for_each_chunk<kChunk, false>(s, [&](auto full, int c, int t0, int n) {
    if (task.active) p.ckpt[task.bkd(s, c, s.num_chunks)] = h;
    forward_chunk<T, kV, decltype(full)::value>(p, task, rp, stage, x, y, t0, n, h);
  });
}

cudaError_t launch_ss2d_fwd(const FwdParams& p, ScalarKind dtype, int kv, cudaStream_t stream) {
  return dispatch_dtype_kv(dtype, kv, [&](auto tag, auto width) {
    ss2d_fwd_kernel<decltype(tag), decltype(width)::value><<<num_blocks(p.s), kLanes * kWarpsPerBlock, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace ss2d
}  // namespace selective_scan
