// Forward selective scan: y = <C_t, h_t> + D u_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t.
// Reads u, delta, B, C once; writes y, the last state and the state entering each tile (for backward).
#include "scan_common.cuh"

namespace selective_scan {

constexpr int kFwdWarpsPerBlock = 8;

// kMaxN is a compile-time bound on d_state so the per-state arrays stay in registers.
// For N = 1 and 16-bit inputs (VMamba v2 under AMP) the register cap keeps 3 blocks (24 warps) per SM resident; with the
// next tile's u/delta/B/C prefetched, that keeps about 48 KB of loads in flight per SM (build knob
// SCAN_FWD_MIN_BLOCKS_N1, see setup.py SELECTIVE_SCAN_NVCC_FLAGS).
#ifndef SCAN_FWD_MIN_BLOCKS_N1
#define SCAN_FWD_MIN_BLOCKS_N1 3
#endif
template <typename T, int kMaxN>
__global__ void __launch_bounds__(kFwdWarpsPerBlock * kWarpSize,
                                  kMaxN == 1 && sizeof(T) == 2 ? SCAN_FWD_MIN_BLOCKS_N1 : 2)
scan_fwd_kernel(const FwdParams p) {
  const ScanShape& s = p.shape;
  const int lane = threadIdx.x % kWarpSize;
  const int channel = blockIdx.x * kFwdWarpsPerBlock + threadIdx.x / kWarpSize;
  if (channel >= s.channels) return;  // whole warps leave; no block barrier follows
  const int b = blockIdx.y;
  const int L = s.length, N = s.d_state;
  const RowIndex r = row_index(s, b, channel);

  const T* u_row = static_cast<const T*>(p.u) + r.row * L;
  const T* delta_row = static_cast<const T*>(p.delta) + r.delta_row * L;
  const T* B_rows = static_cast<const T*>(p.B) + r.group_row * N * L;
  const T* C_rows = static_cast<const T*>(p.C) + r.group_row * N * L;
  float* checkpoints = p.checkpoints + r.row * s.num_tiles * N;

  float A[kMaxN], state[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    A[n] = n < N ? p.A[channel * N + n] : 0.f;
    state[n] = 0.f;
  }
  const float D = p.D ? p.D[channel] : 0.f;
  const float bias = s.bias_len ? p.delta_bias[r.bias_index] : 0.f;

  PrefetchedRow<T> u_loader(u_row, L, s.vector_io, lane * kItems);
  PrefetchedRow<T> delta_loader(delta_row, L, s.vector_io, lane * kItems);
  // With one state, B and C are one row each: prefetch them with u/delta instead of waiting per tile.
  PrefetchedRow<T> B_loader(B_rows, L, s.vector_io && kMaxN == 1, lane * kItems);
  PrefetchedRow<T> C_loader(C_rows, L, s.vector_io && kMaxN == 1, lane * kItems);
  for (int tile = 0; tile < s.num_tiles; ++tile) {
    const int t0 = tile * kTile + lane * kItems;
    const int next_t0 = tile + 1 < s.num_tiles ? t0 + kTile : -1;
    float u[kItems], dt[kItems], dtu[kItems], y[kItems];
    u_loader.load(t0, next_t0, u);
    delta_loader.load(t0, next_t0, dt);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float x = dt[i] + bias;
      // Steps past the end get dt = 0, i.e. the identity map, so the carried state stays exact.
      dt[i] = t0 + i < L ? (s.softplus ? softplus(x) : x) : 0.f;
      dtu[i] = dt[i] * u[i];
      y[i] = D * u[i];
    }
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= N) break;
      if (lane == n % kWarpSize) checkpoints[tile * N + n] = state[n];
      float Bv[kItems], Cv[kItems];
      if (kMaxN == 1) {
        B_loader.load(t0, next_t0, Bv);
        C_loader.load(t0, next_t0, Cv);
      } else {
        load_items(B_rows + n * L, t0, L, s.vector_io, Bv);
        load_items(C_rows + n * L, t0, L, s.vector_io, Cv);
      }
      // The lane's maps h -> a*h + b, composed. For N = 1, dt and dt*u die here, which is what lets the
      // kernel fit the register cap without spilling.
      float a[kItems], b[kItems];
      float lane_a = 1.f, lane_b = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        a[i] = expf(dt[i] * A[n]);
        b[i] = dtu[i] * Bv[i];
        lane_b = a[i] * lane_b + b[i];
        lane_a *= a[i];
      }
      warp_scan_forward(lane_a, lane_b, lane);
      float before_a = __shfl_up_sync(kFullMask, lane_a, 1);
      float before_b = __shfl_up_sync(kFullMask, lane_b, 1);
      if (lane == 0) { before_a = 1.f; before_b = 0.f; }
      float h = before_a * state[n] + before_b;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h = a[i] * h + b[i];
        y[i] += Cv[i] * h;
      }
      const float tile_a = __shfl_sync(kFullMask, lane_a, kWarpSize - 1);
      const float tile_b = __shfl_sync(kFullMask, lane_b, kWarpSize - 1);
      state[n] = tile_a * state[n] + tile_b;
    }
    if (p.out_float) {
      store_items(static_cast<float*>(p.out) + r.row * L, t0, L, s.vector_io, y);
    } else {
      store_items(static_cast<T*>(p.out) + r.row * L, t0, L, s.vector_io, y);
    }
  }
#pragma unroll
  for (int n = 0; n < kMaxN; ++n)
    if (n < N && lane == n % kWarpSize) p.last_state[r.row * N + n] = state[n];
}

template <typename T>
static cudaError_t launch_for_type(const FwdParams& p, cudaStream_t stream) {
  const dim3 grid((p.shape.channels + kFwdWarpsPerBlock - 1) / kFwdWarpsPerBlock, p.shape.batch);
  const dim3 block(kFwdWarpsPerBlock * kWarpSize);
  if (p.shape.d_state == 1) {
    scan_fwd_kernel<T, 1><<<grid, block, 0, stream>>>(p);
  } else if (p.shape.d_state <= 4) {
    scan_fwd_kernel<T, 4><<<grid, block, 0, stream>>>(p);
  } else {
    scan_fwd_kernel<T, kMaxDState><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_scan_fwd(const FwdParams& params, ScalarKind kind, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32: return launch_for_type<float>(params, stream);
    case ScalarKind::kFloat16: return launch_for_type<__half>(params, stream);
    case ScalarKind::kBFloat16: return launch_for_type<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selective_scan
