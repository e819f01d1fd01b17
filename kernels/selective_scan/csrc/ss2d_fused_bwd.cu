// Fused SS2D backward (see ss2d_fused.cuh). The gradient reaching h_t is dh_t = C_t dy_t + g_{t+1} with the
// carry g_t = a_t dh_t. Each warp walks its route segment's chunks from the last, starting from the carry
// entering the segment from its end: recomputes the chunk's forward from the checkpoint (h, dt, x, dy kept in
// registers), then walks it in reverse. A chunk's x, dy and checkpoint are loaded while the chunk after it (the
// one walked before) contracts its row gradients, so the walk rarely waits for memory (measured in docs/kernels.md:
// the backward at VMamba-T's stage 1 went from 1.45 to 1.31 ms).
//
// Per step, the route's part of dx (lane = channel) is stored into its own map du_k in x's dtype, as the unfused
// path's per-route scans round it: each (route, position, channel) is written once, so there are no atomics and
// no zero-filled buffer, and the caller sums the four maps in one pass. Against fp32 atomic adds into one dx
// (four DRAM read-modify-writes per element) the op went from 1.27-1.30 to 1.21-1.25 ms at VMamba-T's stage 1
// (docs/kernels.md).
//
// The gradient of the route's x_dbl row at each position ([d dt-rank values..., dB, dC]) is a sum over the warp's
// 32 channels: the reverse walk leaves each lane's terms in shared memory, and once per chunk the lanes contract
// them over the channels (GradStage). Parameter gradients (W_dt, dt bias, A, D) are summed in registers over the
// warp's steps and added once at the end.
#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {

// Per-warp staging of a chunk's x_dbl row gradients. Row value j of a position is sum_d term_j[d] coef_j[d]
// over the warp's channels d: for a dt-rank value j < R the term is dz (the gradient of the dt pre-activation)
// and the coefficient W_dt[k, d, j]; for B and C the terms are dB's and dC's per-channel parts and the
// coefficient 1. After the reverse walk, lanes take (row value j = lane % kV, step i = lane / kV + multiples
// of 32 / kV): kV multiply-adds per step and lane, where a shuffle reduction across the warp costs ~5 kV
// instructions per step (rows wider than 32 values: each lane takes two). Rows are 36 words apart, so that
// the words read together (the three terms of a step; the coefficients of 8 values) sit in different banks.
template <int kV, int kChunk = chunk_for_kv(kV)>
struct GradStage {
  static constexpr int kStride = kLanes + 4;
  static constexpr int kDz = 0, kDB = 1, kDC = 2;  // term kinds
  alignas(16) float terms[kChunk][3][kStride];
  alignas(16) float coef[kV][kStride];  // rows R, R + 1 (B, C) hold ones, later rows zeros
  int pos[kChunk];                      // raster position of each step

  // Once per kernel: lane = channel d writes its coefficients.
  template <int kR>
  __device__ __forceinline__ void set_coefficients(const Shape& s, const RouteParams<kR>& rp, int lane) {
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      float c = j < s.rank + 2 ? 1.f : 0.f;  // B and C: ones; padding: zeros
      if (j < kR && j < s.rank) c = rp.w[j];
      coef[j][lane] = c;
    }
  }
  // The dt pre-activation of step i with W_dt from the coefficients (for rows too wide to keep W_dt in
  // registers beside its gradient).
  __device__ __forceinline__ float dt_preact(float bias, const RowStage<kV>& stage, int i, int lane) const {
    float z = bias;
    for_each_rank_value(stage, i, [&](int j, float v) { z = fmaf(coef[j][lane], v, z); });
    return z;
  }
  __device__ __forceinline__ void put(int i, int lane, int pos_i, float dz, float dB, float dC) {
    terms[i][kDz][lane] = dz;
    terms[i][kDB][lane] = dB;
    terms[i][kDC][lane] = dC;
    pos[i] = pos_i;
  }
  // Adds the chunk's n row gradients into dxdbl (this sample and route's (L, K, R + 2) rows).
  __device__ __forceinline__ void contract(const Shape& s, int lane, float* dxdbl, int n) {
    constexpr int kRowLanes = kV < kLanes ? kV : kLanes;  // lanes per row
    constexpr int kStepsPerPass = kLanes / kRowLanes, kSteps = kChunk / kStepsPerPass;  // kSteps steps per lane
    const int width = s.rank + 2, first = lane / kRowLanes;
    __syncwarp();  // the walk's terms are in
#pragma unroll
    for (int j = lane % kRowLanes; j < kV; j += kRowLanes) {
      if (j >= width) break;
      const int kind = j < s.rank ? kDz : j == s.rank ? kDB : kDC;
      float sum[kSteps];
#pragma unroll
      for (int q = 0; q < kSteps; ++q) sum[q] = 0.f;
#pragma unroll 1  // unrolled, the compiler hoists the loads and spills (168-register cap)
      for (int d = 0; d < kLanes; d += 4) {
        const float4 c = *reinterpret_cast<const float4*>(&coef[j][d]);
#pragma unroll
        for (int q = 0; q < kSteps; ++q) {
          const float4 t = *reinterpret_cast<const float4*>(&terms[first + q * kStepsPerPass][kind][d]);
          sum[q] = fmaf(t.w, c.w, fmaf(t.z, c.z, fmaf(t.y, c.y, fmaf(t.x, c.x, sum[q]))));
        }
      }
#pragma unroll
      for (int q = 0; q < kSteps; ++q) {
        const int i = first + q * kStepsPerPass;
        if (i < n) atomicAdd(dxdbl + static_cast<long>(pos[i]) * kRoutes * width + j, sum[q]);
      }
    }
    __syncwarp();  // done reading before the next chunk's walk writes
  }
};

// A chunk's loads: the checkpoint entering it, x and dy at each step, and the position of step t0 + lane (lanes
// past n: of the last step, so that every load stays in range). For rows of up to 16 values they are issued during
// the chunk before (while it contracts its row gradients, when the walk's registers are free); wider rows have
// fewer steps per chunk and would spill at the register cap, so they load at the chunk's start.
template <typename T, int kV, int kChunk = chunk_for_kv(kV)>
struct ChunkInputs {
  static constexpr bool kAhead = kV <= 16;
  float h0, xv[kChunk], dyv[kChunk];
  int pos;

  __device__ __forceinline__ void fetch(const BwdParams& p, const Task& task, const T* x, const float* dy, int c) {
    const Shape& s = p.s;
    const int t0 = c * kChunk, n = min(kChunk, s.length - t0);
    h0 = task.active ? p.ckpt[task.bkd(s, c, s.num_chunks)] : 0.f;
    pos = chunk_position(s, task, t0, n);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const int at = __shfl_sync(kFullMask, pos, i) * s.dim;
      xv[i] = load_float(x + at);
      dyv[i] = task.on * __ldg(dy + at);
    }
  }
};

template <int kR>
struct ParamGrads {
  float dw[kR], dbias = 0.f, dA = 0.f, dD = 0.f;
  __device__ __forceinline__ ParamGrads() {
#pragma unroll
    for (int j = 0; j < kR; ++j) dw[j] = 0.f;
  }
};

// One chunk [t0, t0 + n) of the warp's route, its loads in `in`: recompute its forward from the checkpoint, walk
// it in reverse, then (with the next chunk's loads in flight, if `more`: the chunk before it) contract its row
// gradients. g: the gradient carry from the right, updated.
template <typename T, int kV, bool kFull>
__device__ __forceinline__ void backward_chunk(const BwdParams& p, const Task& task, const RouteParams<kV - 2>& rp,
                                               ParamGrads<kV - 2>& acc, RowStage<kV>& stage, GradStage<kV>& grads,
                                               ChunkInputs<T, kV>& in, bool more, const T* x, const float* dy,
                                               T* du, float* dxdbl, int t0, int n, float& g) {
  constexpr int kChunk = chunk_for_kv(kV);
  const Shape& s = p.s;
  if constexpr (!ChunkInputs<T, kV>::kAhead) in.fetch(p, task, x, dy, t0 / kChunk);
  stage.template load<T>(s, task, p.xdbl, in.pos, n);
  float hs[kChunk + 1], dts[kChunk];
  hs[0] = in.h0;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    if (kFull || i < n) {
      // rows wider than 32: W_dt from shared memory, its registers go to its gradient
      const float z = kV > 32 ? grads.dt_preact(rp.bias, stage, i, task.lane) : dt_preact(rp, stage, i);
      float e;
      dts[i] = softplus(z, e);
      hs[i + 1] = fmaf(fast_exp2(dts[i] * rp.A2), hs[i], dts[i] * stage.word(i, 0).x * in.xv[i]);
    }
  }
  __syncwarp();  // re-read the rows below rather than keep the whole chunk's rows in registers
#pragma unroll
  for (int i = kChunk - 1; i >= 0; --i) {
    if (kFull || i < n) {
      const int pos = __shfl_sync(kFullMask, in.pos, i);
      const float4 bc = stage.word(i, 0);
      const float Bt = bc.x, Ct = bc.y, dt = dts[i], a = fast_exp2(dt * rp.A2), xt = in.xv[i], dyt = in.dyv[i];
      // y_t = C h_t + D x_t
      const float dh = fmaf(Ct, dyt, g);
      acc.dD = fmaf(dyt, xt, acc.dD);
      // h_t = a h_{t-1} + dt B x_t, a = exp(dt A)
      const float da = dh * hs[i];
      const float ddt = fmaf(dh, Bt * xt, da * a * rp.A);
      acc.dA = fmaf(da * a, dt, acc.dA);
      g = dh * a;
      const float dz = ddt * softplus_slope_from_value(dt);  // dt's slope from dt: one array fewer in registers
      acc.dbias += dz;
      for_each_rank_value(stage, i, [&](int j, float v) { acc.dw[j] = fmaf(dz, v, acc.dw[j]); });
      grads.put(i, task.lane, pos, dz, dh * dt * xt, dyt * hs[i + 1]);
      if (task.active) du[pos * s.dim] = from_float<T>(fmaf(rp.Dk, dyt, dh * dt * Bt));
    }
  }
  if (ChunkInputs<T, kV>::kAhead && more) in.fetch(p, task, x, dy, t0 / kChunk - 1);
  grads.contract(s, task.lane, dxdbl, n);
}

template <int kV>
struct BwdShared {
  RowStage<kV> rows[kRoutes];
  GradStage<kV> grads[kRoutes];
};

// Gradients of the warp's route segment, chunk by chunk from its end. Capped at 168 registers (3 blocks, 12 warps
// per SM); kV 8, 16, 64 and 68 fit without spilling, kV 32 spills ~60 bytes per thread.
template <typename T, int kV>
__global__ void __launch_bounds__(RouteWarps::kThreads, kBwdBlocksPerSm) ss2d_bwd_kernel(const BwdParams p) {
  constexpr int kChunk = chunk_for_kv(kV);
  constexpr int kR = kV - 2;
  extern __shared__ float4 shared_words[];  // BwdShared<kV>, dynamic (over 48 KB for kV = 64)
  auto& shared = *reinterpret_cast<BwdShared<kV>*>(shared_words);
  const Shape& s = p.s;
  const Task task = RouteWarps::task(s);
  RowStage<kV>& stage = shared.rows[task.k];
  GradStage<kV>& grads = shared.grads[task.k];
  const RouteParams<kR> rp(p, task);
  grads.set_coefficients(s, rp, task.lane);
  ParamGrads<kR> acc;
  const long base = task.map_offset(s);
  const T* x = static_cast<const T*>(p.x) + base;
  const float* dy = p.dy + base;
  T* du = static_cast<T*>(p.du) + task.k * s.batch * static_cast<long>(s.length) * s.dim + base;
  float* dxdbl = p.dxdbl + task.rows_offset(s, s.rank + 2);
  float g = task.segment_start(s, p.start);  // gradient carry from the right
  // the chunks go from the segment's last
  ChunkInputs<T, kV> in;
  if constexpr (ChunkInputs<T, kV>::kAhead) in.fetch(p, task, x, dy, task.end_chunk(s) - 1);
  task.for_each_chunk<kChunk, true>(s, [&](auto full, int c, int t0, int n) {
    backward_chunk<T, kV, decltype(full)::value>(p, task, rp, acc, stage, grads, in, c > task.first_chunk(s), x, dy,
                                                 du, dxdbl, t0, n, g);
  });
  if (!task.active) return;
  const long kd = static_cast<long>(task.k) * s.dim + task.d;
#pragma unroll
  for (int j = 0; j < kR; ++j)
    if (j < s.rank) atomicAdd(p.ddt_weight + (static_cast<long>(task.k) * s.rank + j) * s.dim + task.d, acc.dw[j]);
  atomicAdd(p.ddt_bias + kd, acc.dbias);
  atomicAdd(p.dA_log + kd, acc.dA * rp.A);  // dA / dA_log = A
  atomicAdd(p.dDs + kd, acc.dD);
}

cudaError_t launch_ss2d_bwd(const BwdParams& p, ScalarKind dtype, int kv, cudaStream_t stream) {
  return dispatch_dtype_kv(dtype, kv, [&](auto tag, auto width) {
    constexpr int kV = decltype(width)::value;
    const auto kernel = ss2d_bwd_kernel<decltype(tag), kV>;
    constexpr int bytes = sizeof(BwdShared<kV>);
    // the opt-in above 48 KB is per kernel and device: set it on every launch (a cheap attribute write)
    if (bytes > 48 * 1024) {
      const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      if (status != cudaSuccess) return status;
    }
    kernel<<<RouteWarps::blocks(p.s), RouteWarps::kThreads, bytes, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace ss2d
}  // namespace selective_scan
