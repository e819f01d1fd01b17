// Fused SS2D forward (see ss2d_fused.cuh). kWarps warps walk each route segment (BlockLayout), a tile of kWarps
// chunks at a time, warp w taking the tile's chunk w; they add C h + D x into y at every position and save the
// state entering every chunk for the backward.
//
// With one warp (kWarps 1) the warp walks its chunks in order from the segment's entering state. With more, each
// warp scans its chunk from a zero state, keeping per step the output's two parts y_i = u_i + v_i h_in (v_i: C_i
// times the decay since the chunk's start); the block then hands the states along its warps in shared memory (one
// multiply-add per warp), and each warp adds its outputs. Splitting a route over a block's warps lets a few
// samples fill the GPU: blocks go sample by sample, so the samples in flight keep their y, x and x_dbl rows in
// L2, and the four routes' adds into y are L2 rather than DRAM read-modify-writes (measured in docs/kernels.md:
// 0.65 against 0.82 ms at VMamba-T's stage 1). Short routes and segmented ones (small batches) keep one warp per
// route: there tiles were measured slower (a tile's idle warps at the route's end, and the summary pass).
#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {

// Steps t0 .. t0 + n - 1 of the warp's chunk from state h (updated to the chunk's end state). With one warp per
// route (kWarps 1) h is the true state and the outputs go into y at once; otherwise h starts from zero, the
// outputs' parts u, v are kept, and `decay` is multiplied by the chunk's decays. kFull: n == kChunk (no bound
// checks).
template <typename T, int kV, int kWarps, bool kFull, int kChunk = chunk_for_kv(kV)>
__device__ __forceinline__ void scan_chunk(const FwdParams& p, const Task& task, const RouteParams<kV - 2>& rp,
                                           RowStage<kV>& stage, const T* x, float* y, int my_pos, int n,
                                           float (&u)[kChunk], float (&v)[kChunk], float& decay, float& h) {
  const Shape& s = p.s;
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
      const float a = fast_exp2(dt * rp.A2);
      h = fmaf(a, h, dt * bc.x * xv[i]);
      u[i] = fmaf(bc.y, h, rp.Dk * xv[i]);
      if constexpr (kWarps == 1) {
        atomicAdd(y + off[i], task.on * u[i]);
      } else {
        decay *= a;
        v[i] = bc.y * decay;
      }
    }
  }
}

// Capped at 128 registers: 16 warps per SM (unbounded, a warp takes ~130).
template <typename T, int kV, int kWarps>
__global__ void __launch_bounds__(BlockLayout<kWarps>::kThreads,
                                  kFwdWarpsPerSm * kLanes / BlockLayout<kWarps>::kThreads)
    ss2d_fwd_kernel(const FwdParams p) {
  using Layout = BlockLayout<kWarps>;
  constexpr int kChunk = chunk_for_kv(kV);
  __shared__ RowStage<kV> stages[Layout::kThreads / kLanes];
  __shared__ float2 chunk_ends[2][kWarps][kLanes];  // per tile (double-buffered): (decay, end state from zero)
  const Shape& s = p.s;
  const Task task = Layout::task(s);
  const int warp = Layout::route_warp();
  RowStage<kV>& stage = stages[threadIdx.x / kLanes];
  const RouteParams<kV - 2> rp(p, task);
  const long base = task.map_offset(s);
  const T* x = static_cast<const T*>(p.x) + base;
  float* y = p.y + base;
  float carry = task.segment_start(s, p.start);  // the state entering the tile
  const int c1 = task.end_chunk(s);
  for (int tile = 0, c = task.first_chunk(s) + warp; c - warp < c1; ++tile, c += kWarps) {
    const int t0 = c * kChunk, n = c < c1 ? min(kChunk, s.length - t0) : 0;
    const int my_pos = n > 0 ? chunk_position(s, task, t0, n) : 0;
    // one warp continues from the carry; a tile's warps start from zero (past the segment's end: the identity)
    float u[kChunk], v[kChunk], decay = 1.f, h = kWarps == 1 ? carry : 0.f;
    if (n == kChunk) {
      scan_chunk<T, kV, kWarps, true>(p, task, rp, stage, x, y, my_pos, n, u, v, decay, h);
    } else if (n > 0) {
      scan_chunk<T, kV, kWarps, false>(p, task, rp, stage, x, y, my_pos, n, u, v, decay, h);
    }
    float h_in = carry;  // the state entering the warp's chunk
    if constexpr (kWarps == 1) {
      carry = h;
    } else {
      chunk_ends[tile & 1][warp][task.lane] = make_float2(decay, h);
      __syncthreads();
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float2 end = chunk_ends[tile & 1][w][task.lane];
        if (w == warp) h_in = carry;
        carry = fmaf(end.x, carry, end.y);
      }
    }
    if (n == 0) continue;
    if (task.active) p.ckpt[task.bkd(s, c, s.num_chunks)] = h_in;
    if constexpr (kWarps > 1) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i)
        if (i < n) atomicAdd(y + __shfl_sync(kFullMask, my_pos, i) * s.dim, task.on * fmaf(v[i], h_in, u[i]));
    }
  }
}

cudaError_t launch_ss2d_fwd(const FwdParams& p, ScalarKind dtype, int kv, cudaStream_t stream) {
  const bool tiled = p.s.num_segments == 1 && p.s.num_chunks >= kMinTiledChunks;
  return dispatch_dtype_kv(dtype, kv, [&](auto tag, auto width) {
    const auto launch = [&](auto warps) {
      using Layout = BlockLayout<decltype(warps)::value>;
      ss2d_fwd_kernel<decltype(tag), decltype(width)::value, decltype(warps)::value>
          <<<Layout::blocks(p.s), Layout::kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    };
    return tiled ? launch(std::integral_constant<int, kTileWarps>{}) : launch(std::integral_constant<int, 1>{});
  });
}

}  // namespace ss2d
}  // namespace selective_scan
