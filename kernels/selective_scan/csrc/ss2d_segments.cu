// The passes before the fused SS2D kernels that give every route segment its entering state (see
// ss2d_fused.cuh). A segment maps the state entering it, s, to P s + z, with P = exp(A * (total dt over the
// segment)) (N = 1: one decay rate per channel) and z the state it ends in when entered with zero; the forward
// state h (h_t = a_t h_{t-1} + dt_t B_t x_t) and the backward carry g walked from the end (g = a_t (C_t dy_t
// + g)) both have that form. The summary kernel computes (total dt, z) per segment, one warp per (batch,
// channel group, segment, route) as the main kernels; the combine kernel walks the summaries of each (batch,
// route, channel) in the scan's direction.
#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {

// T: x's (and x_dbl's) type; In: the walked input's (x forward, fp32 dy backward).
template <typename T, typename In, int kV, bool kReverse, bool kFull>
__device__ __forceinline__ void summarise_chunk(const SegmentParams& p, const Task& task,
                                                const RouteParams<kV - 2>& rp, RowStage<kV>& stage, const In* in,
                                                int t0, int n, float& state, float& dt_total) {
  constexpr int kChunk = chunk_for_kv(kV);
  const Shape& s = p.s;
  const int my_pos = chunk_position(s, task, t0, n);
  stage.template load<T>(s, task, p.xdbl, my_pos, n);
  float u[kChunk];  // x (forward) or dy (backward) of each step
#pragma unroll
  for (int i = 0; i < kChunk; ++i)
    if (kFull || i < n) u[i] = load_float(in + __shfl_sync(kFullMask, my_pos, i) * s.dim);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const int i = kReverse ? kChunk - 1 - j : j;
    if (kFull || i < n) {
      const float4 bc = stage.word(i, 0);  // B, C
      float e;
      const float dt = softplus(dt_preact(rp, stage, i), e);
      const float a = fast_exp2(dt * rp.A2);
      dt_total += dt;
      state = kReverse ? a * fmaf(bc.y, u[i], state) : fmaf(a, state, dt * bc.x * u[i]);
    }
  }
}

template <typename T, int kV, bool kReverse>
__global__ void __launch_bounds__(RouteWarps::kThreads) segment_summary_kernel(const SegmentParams p) {
  using In = std::conditional_t<kReverse, float, T>;
  constexpr int kChunk = chunk_for_kv(kV);
  __shared__ RowStage<kV> stages[kRoutes];
  const Shape& s = p.s;
  const Task task = RouteWarps::task(s);
  RowStage<kV>& stage = stages[task.k];
  const RouteParams<kV - 2> rp(p, task);
  const In* in = static_cast<const In*>(p.in) + task.map_offset(s);
  float state = 0.f, dt_total = 0.f;
  task.for_each_chunk<kChunk, kReverse>(s, [&](auto full, int, int t0, int n) {
    summarise_chunk<T, In, kV, kReverse, decltype(full)::value>(p, task, rp, stage, in, t0, n, state, dt_total);
  });
  if (task.active) p.summary[task.bkd(s, task.segment, s.num_segments)] = make_float2(dt_total, state);
}

// One thread per (batch, route, channel).
__global__ void segment_combine_kernel(const Shape s, const float* __restrict__ A_log,
                                       const float2* __restrict__ summary, float* __restrict__ start, bool reverse) {
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<long>(s.batch) * kRoutes * s.dim) return;
  const int d = static_cast<int>(i % s.dim);
  const long bk = i / s.dim;
  const int k = static_cast<int>(bk % kRoutes);
  const float A2 = -expf(A_log[k * s.dim + d]) * kLog2e;
  const long first = bk * s.num_segments * s.dim + d;
  float state = 0.f;
#pragma unroll 4
  for (int n = 0; n < s.num_segments; ++n) {
    const long at = first + static_cast<long>(reverse ? s.num_segments - 1 - n : n) * s.dim;
    const float2 summ = summary[at];
    start[at] = state;
    state = fmaf(fast_exp2(summ.x * A2), state, summ.y);
  }
}

cudaError_t launch_ss2d_segment_starts(const SegmentParams& p, ScalarKind dtype, int kv, bool reverse,
                                       cudaStream_t stream) {
  const cudaError_t status = dispatch_dtype_kv(dtype, kv, [&](auto tag, auto width) {
    using T = decltype(tag);
    constexpr int kV = decltype(width)::value;
    if (reverse) {
      segment_summary_kernel<T, kV, true><<<RouteWarps::blocks(p.s), RouteWarps::kThreads, 0, stream>>>(p);
    } else {
      segment_summary_kernel<T, kV, false><<<RouteWarps::blocks(p.s), RouteWarps::kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
  if (status != cudaSuccess) return status;
  constexpr int kThreads = 256;
  const long threads = static_cast<long>(p.s.batch) * kRoutes * p.s.dim;
  segment_combine_kernel<<<static_cast<unsigned>((threads + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      p.s, p.A_log, p.summary, p.start, reverse);
  return cudaGetLastError();
}

}  // namespace ss2d
}  // namespace selective_scan
