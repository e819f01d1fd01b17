// Backward selective scan. Walks each row from the last tile to the first. Per tile it re-runs the forward
// recurrence from the saved tile-start state (to get h_{t-1} and a_t), then runs the adjoint recurrence
// backwards in time. With k_t = a_t g_t (the gradient handed from step t to step t-1):
//   g_t = C_t dy_t + k_{t+1},   k_t = a_t k_{t+1} + a_t C_t dy_t,
// the same affine-map scan as the forward pass, in reverse lane order. k past the last step is the
// gradient of the returned last state.
//
// The warps of one block own channels of one B/C group and visit the same tile together, so their dB/dC
// contributions are summed in shared memory and reach global memory as one atomic per block and step
// (instead of one per channel).
#include "scan_common.cuh"

namespace selective_scan {

// Blocks per SM the register cap aims at for N = 1 (build knob, see setup.py SELECTIVE_SCAN_NVCC_FLAGS):
// 3 blocks of 8 warps hide the per-tile barrier better but spill a little.
#ifndef SCAN_BWD_MIN_BLOCKS_N1
#define SCAN_BWD_MIN_BLOCKS_N1 3
#endif
template <typename T, int kMaxN>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize, kMaxN == 1 ? SCAN_BWD_MIN_BLOCKS_N1 : 1)
scan_bwd_kernel(const BwdParams p) {
  __shared__ __align__(16) float block_dB[kMaxWarpsPerBlock][kTile];
  __shared__ __align__(16) float block_dC[kMaxWarpsPerBlock][kTile];

  const ScanShape& s = p.shape;
  const int warps = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int channel = blockIdx.x * warps + warp;  // the launcher makes warps divide channels per group
  const int b = blockIdx.y;
  const int L = s.length, N = s.d_state;
  const RowIndex r = row_index(s, b, channel);

  const T* u_row = static_cast<const T*>(p.u) + r.row * L;
  const T* delta_row = static_cast<const T*>(p.delta) + r.delta_row * L;
  const T* B_rows = static_cast<const T*>(p.B) + r.group_row * N * L;
  const T* C_rows = static_cast<const T*>(p.C) + r.group_row * N * L;
  float* dB_rows = p.dB + r.group_row * N * L;
  float* dC_rows = p.dC + r.group_row * N * L;
  const float* checkpoints = p.checkpoints + r.row * s.num_tiles * N;

  float A[kMaxN], carry[kMaxN], dA[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    A[n] = n < N ? p.A[channel * N + n] : 0.f;
    carry[n] = (n < N && p.dlast_state) ? p.dlast_state[r.row * N + n] : 0.f;
    dA[n] = 0.f;
  }
  const float D = p.D ? p.D[channel] : 0.f;
  const float bias = s.bias_len ? p.delta_bias[r.bias_index] : 0.f;
  float dD = 0.f, dbias = 0.f;

  for (int tile = s.num_tiles - 1; tile >= 0; --tile) {
    const int t0 = tile * kTile + lane * kItems;
    float u[kItems], dt[kItems], dy[kItems], du[kItems], ddt[kItems];
    load_items(u_row, t0, L, s.vector_io, u);
    load_items(delta_row, t0, L, s.vector_io, dt);
    if (p.dout_float) {
      load_items(static_cast<const float*>(p.dout) + r.row * L, t0, L, s.vector_io, dy);
    } else {
      load_items(static_cast<const T*>(p.dout) + r.row * L, t0, L, s.vector_io, dy);
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      dt[i] = t0 + i < L ? (s.softplus ? softplus(dt[i] + bias) : dt[i] + bias) : 0.f;
      dD += dy[i] * u[i];
      du[i] = D * dy[i];
      ddt[i] = 0.f;
    }
#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= N) break;
      float Bv[kItems], Cv[kItems], a[kItems], h_prev[kItems];
      load_items(B_rows + n * L, t0, L, s.vector_io, Bv);
      load_items(C_rows + n * L, t0, L, s.vector_io, Cv);

      // Forward recurrence inside the tile, started from the saved state.
      const float A2 = A[n] * kLog2e;
      float lane_a = 1.f, lane_b = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        a[i] = exp2f(dt[i] * A2);
        lane_b = a[i] * lane_b + dt[i] * u[i] * Bv[i];
        lane_a *= a[i];
      }
      warp_scan_forward(lane_a, lane_b, lane);
      float before_a = __shfl_up_sync(kFullMask, lane_a, 1);
      float before_b = __shfl_up_sync(kFullMask, lane_b, 1);
      if (lane == 0) { before_a = 1.f; before_b = 0.f; }
      float h = before_a * checkpoints[tile * N + n] + before_b;
      float lane_dC[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        h_prev[i] = h;
        h = a[i] * h + dt[i] * u[i] * Bv[i];
        lane_dC[i] = dy[i] * h;
      }

      // Adjoint recurrence, backwards in time.
      float rev_a = 1.f, rev_b = 0.f;
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        rev_b = a[i] * (rev_b + Cv[i] * dy[i]);
        rev_a *= a[i];
      }
      warp_scan_reverse(rev_a, rev_b, lane);
      float after_a = __shfl_down_sync(kFullMask, rev_a, 1);
      float after_b = __shfl_down_sync(kFullMask, rev_b, 1);
      if (lane == kWarpSize - 1) { after_a = 1.f; after_b = 0.f; }
      float k = after_a * carry[n] + after_b;
      float lane_dB[kItems];
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const float g = Cv[i] * dy[i] + k;
        k = a[i] * g;
        const float g_decay = g * h_prev[i] * a[i];  // dL/d(dt*A) at this step
        lane_dB[i] = g * dt[i] * u[i];
        du[i] += g * dt[i] * Bv[i];
        ddt[i] += g * Bv[i] * u[i] + g_decay * A[n];
        dA[n] += g_decay * dt[i];
      }
      carry[n] = __shfl_sync(kFullMask, rev_a, 0) * carry[n] + __shfl_sync(kFullMask, rev_b, 0);

      // Sum dB/dC over the block's channels, then one atomic per step.
#pragma unroll
      for (int i = 0; i < kItems; i += 4) {
        *reinterpret_cast<float4*>(&block_dB[warp][lane * kItems + i]) =
            make_float4(lane_dB[i], lane_dB[i + 1], lane_dB[i + 2], lane_dB[i + 3]);
        *reinterpret_cast<float4*>(&block_dC[warp][lane * kItems + i]) =
            make_float4(lane_dC[i], lane_dC[i + 1], lane_dC[i + 2], lane_dC[i + 3]);
      }
      __syncthreads();
      for (int step = threadIdx.x; step < kTile; step += blockDim.x) {
        const int t = tile * kTile + step;
        if (t >= L) break;
        float sum_B = 0.f, sum_C = 0.f;
        for (int w = 0; w < warps; ++w) {
          sum_B += block_dB[w][step];
          sum_C += block_dC[w][step];
        }
        atomicAdd(dB_rows + n * L + t, sum_B);
        atomicAdd(dC_rows + n * L + t, sum_C);
      }
      __syncthreads();
    }

    float ddelta[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      // d softplus(x)/dx = sigmoid(x) = 1 - exp(-softplus(x)); softplus(x) <= 20 exactly when x <= 20 in
      // fp32. Steps past the end get 0 so they add nothing to ddelta_bias.
      const float scale = s.softplus && dt[i] <= kSoftplusThreshold ? -expm1f(-dt[i]) : 1.f;
      ddelta[i] = t0 + i < L ? ddt[i] * scale : 0.f;
      dbias += ddelta[i];
    }
    store_items(static_cast<T*>(p.du) + r.row * L, t0, L, s.vector_io, du);
    if (p.ddelta_per_channel) {
      store_items(p.ddelta_per_channel + r.row * L, t0, L, s.vector_io, ddelta);
    } else {
      store_items(static_cast<T*>(p.ddelta) + r.row * L, t0, L, s.vector_io, ddelta);
    }
  }

#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    if (n >= N) break;
    const float total = warp_sum(dA[n]);
    if (lane == 0) atomicAdd(p.dA + channel * N + n, total);
  }
  dD = warp_sum(dD);
  dbias = warp_sum(dbias);
  if (lane == 0) {
    if (p.dD) atomicAdd(p.dD + channel, dD);
    if (p.ddelta_bias) atomicAdd(p.ddelta_bias + r.bias_index, dbias);
  }
}

template <typename T>
static cudaError_t launch_for_type(const BwdParams& p, int warps_per_block, cudaStream_t stream) {
  const dim3 grid(p.shape.channels / warps_per_block, p.shape.batch);
  const dim3 block(warps_per_block * kWarpSize);
  if (p.shape.d_state == 1) {
    scan_bwd_kernel<T, 1><<<grid, block, 0, stream>>>(p);
  } else if (p.shape.d_state <= 4) {
    scan_bwd_kernel<T, 4><<<grid, block, 0, stream>>>(p);
  } else {
    scan_bwd_kernel<T, kMaxDState><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_scan_bwd(const BwdParams& params, ScalarKind kind, int warps_per_block, cudaStream_t stream) {
  if (warps_per_block < 1 || warps_per_block > kMaxWarpsPerBlock) return cudaErrorInvalidValue;
  switch (kind) {
    case ScalarKind::kFloat32: return launch_for_type<float>(params, warps_per_block, stream);
    case ScalarKind::kFloat16: return launch_for_type<__half>(params, warps_per_block, stream);
    case ScalarKind::kBFloat16: return launch_for_type<__nv_bfloat16>(params, warps_per_block, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selective_scan
