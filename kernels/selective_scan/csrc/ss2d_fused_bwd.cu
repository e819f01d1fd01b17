// Fused SS2D backward (see ss2d_fused.cuh). The gradient reaching h_t is dh_t = C_t dy_t + g_{t+1} with the
// carry g_t = a_t dh_t. Each warp walks its route segment's chunks from the last, starting from the carry
// entering the segment from its end: loads the chunk, recomputes its forward from the checkpoint (h, dt, dt's
// slope, x, dy kept in registers), then walks it in reverse.
//
// Per step, dx (lane = channel) is an atomic add into fp32 dx, and the per-position gradient of the route's
// x_dbl row ([dB, dC, d(dt-rank)...], each a sum over channels) is reduced across the warp's 32 channels
// with warp_reduce_scatter and added once per warp. Parameter gradients (W_dt, dt bias, A, D) are summed
// in registers over the warp's steps and added once at the end.
#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {

template <int kR>
struct ParamGrads {
  float dw[kR], dbias = 0.f, dA = 0.f, dD = 0.f;
  __device__ __forceinline__ ParamGrads() {
#pragma unroll
    for (int j = 0; j < kR; ++j) dw[j] = 0.f;
  }
};

// One chunk [t0, t0 + n) of the warp's route: load it, recompute its forward from the checkpoint, then
// walk it in reverse. g: the gradient carry from the right, updated.
template <typename T, int kV, bool kFull>
__device__ __forceinline__ void backward_chunk(const BwdParams& p, const Task& task, const RouteParams<kV - 2>& rp,
                                               ParamGrads<kV - 2>& acc, RowStage<kV>& stage, const T* x,
                                               const float* dy, float* dx, float* dxdbl, int t0, int n, float& g) {
  constexpr int kChunk = chunk_for_kv(kV);
  constexpr int kR = kV - 2;
  const Shape& s = p.s;
  float hs[kChunk + 1], dts[kChunk], slopes[kChunk], xv[kChunk], dyv[kChunk];
  hs[0] = task.active ? p.ckpt[task.bkd(s, t0 / kChunk, s.num_chunks)] : 0.f;
  stage.load(s, task, p.xdbl, t0, n);
  Cursor cur(s, task.k, t0);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    if (kFull || i < n) {
      const int at = cur.pos * s.dim;
      xv[i] = load_float(x + at);
      dyv[i] = task.on * __ldg(dy + at);
      cur.advance();
    }
  }
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    if (kFull || i < n) {
      float v[kV];
      stage.read(i, v);
      const float z = dt_preact<kV>(rp, v);
      float e;
      dts[i] = softplus(z, e);
      slopes[i] = softplus_slope(z, e);
      hs[i + 1] = fmaf(fast_exp2(dts[i] * rp.A2), hs[i], dts[i] * v[0] * xv[i]);
    }
  }
  __syncwarp();  // re-read the rows below rather than keep the whole chunk's rows in registers
#pragma unroll
  for (int i = kChunk - 1; i >= 0; --i) {
    if (kFull || i < n) {
      cur.retreat();
      const int pos = cur.pos;
      float v[kV];
      stage.read(i, v);
      const float Bt = v[0], Ct = v[1], dt = dts[i], a = fast_exp2(dt * rp.A2), xt = xv[i], dyt = dyv[i];
      // y_t = C h_t + D x_t
      const float dh = fmaf(Ct, dyt, g);
      acc.dD = fmaf(dyt, xt, acc.dD);
      // h_t = a h_{t-1} + dt B x_t, a = exp(dt A)
      const float da = dh * hs[i];
      const float ddt = fmaf(dh, Bt * xt, da * a * rp.A);
      acc.dA = fmaf(da * a, dt, acc.dA);
      g = dh * a;
      const float dz = ddt * slopes[i];
      acc.dbias += dz;
      float dv[kV];
      dv[0] = dh * dt * xt;   // dB
      dv[1] = dyt * hs[i + 1];  // dC
#pragma unroll
      for (int j = 0; j < kR; ++j) {
        acc.dw[j] = fmaf(dz, v[2 + j], acc.dw[j]);
        dv[2 + j] = dz * rp.w[j];
      }
      const float r = warp_reduce_scatter<kV>(dv, task.lane);
      if ((task.lane & (kLanes / kV - 1)) == 0) atomicAdd(dxdbl + pos * (kRoutes * kV), r);
      atomicAdd(dx + pos * s.dim, task.on * fmaf(rp.Dk, dyt, dh * dt * Bt));
    }
  }
}

// Gradients of the warp's route segment, chunk by chunk from its end. Unbounded, the compiler keeps ~190
// registers (a chunk's recomputed values plus its loads in flight); capped at 168 (3 blocks, 12 warps per SM)
// it spills at most a few words.
template <typename T, int kV>
__global__ void __launch_bounds__(kLanes * kWarpsPerBlock, kBwdBlocksPerSm) ss2d_bwd_kernel(const BwdParams p) {
  constexpr int kChunk = chunk_for_kv(kV);
  constexpr int kR = kV - 2;
  __shared__ RowStage<kV> stages[kWarpsPerBlock];
  const Shape& s = p.s;
  const Task task(s);
  RowStage<kV>& stage = stages[task.k];
  const RouteParams<kR> rp(s, p.dt_weight, p.dt_bias, p.A_log, p.Ds, task);
  ParamGrads<kR> acc;
  const long base = static_cast<long>(task.b) * s.length * s.dim + task.d_ld;
  const T* x = static_cast<const T*>(p.x) + base;
  const float* dy = p.dy + base;
  float* dx = p.dx + base;
  // this lane's entry of the route's x_dbl row after warp_reduce_scatter
  float* dxdbl = p.dxdbl + static_cast<long>(task.b) * s.length * kRoutes * kV + task.k * kV +
                 (task.lane >> (5 - log2_kv<kV>()));
  float g = task.segment_start(s, p.start);  // gradient carry from the right
  task.for_each_chunk<kChunk, true>(s, [&](auto full, int, int t0, int n) {
    backward_chunk<T, kV, decltype(full)::value>(p, task, rp, acc, stage, x, dy, dx, dxdbl, t0, n, g);
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
    ss2d_bwd_kernel<decltype(tag), decltype(width)::value><<<num_blocks(p.s), kLanes * kWarpsPerBlock, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace ss2d
}  // namespace selective_scan
