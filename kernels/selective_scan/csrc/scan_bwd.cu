// Backward selective scan. Walks each row from the last tile to the first. Per tile it re-runs the forward
// recurrence from the saved tile-start state (to get h_{t-1} and a_t), then runs the adjoint recurrence
// backwards in time. With k_t = a_t g_t (the gradient handed from step t to step t-1):
//   g_t = C_t dy_t + k_{t+1},   k_t = a_t k_{t+1} + a_t C_t dy_t,
// the same affine-map scan as the forward pass, in reverse lane order. k past the last step is the
// gradient of the returned last state.
//
// The warps of one block own channels of one B/C group and visit the same tile together, so their dB/dC
// contributions are summed in shared memory and reach global memory as one atomic per block and step
// (instead of one per channel); the partial sums are double-buffered, so a tile costs one block barrier.
//
// Like the forward pass, this kernel is bound by DRAM bandwidth only if it issues few instructions per
// step: the next tile's inputs are fetched while a tile computes, softplus/exp use the MUFU unit, and each
// pass over a lane's steps folds what the later passes need into few per-step values, so that with N = 1
// only six arrays stay live across the reverse warp scan.
#include <type_traits>

#include "scan_common.cuh"

namespace selective_scan {

// Blocks per SM the register cap aims at for N = 1 (build knob, see setup.py SELECTIVE_SCAN_NVCC_FLAGS):
// 2 blocks of 8 warps fit the working set in 128 registers without spilling; 3 spill heavily.
#ifndef SCAN_BWD_MIN_BLOCKS_N1
#define SCAN_BWD_MIN_BLOCKS_N1 2
#endif

template <typename T, int kMaxN>
constexpr int bwd_min_blocks() {
  return kMaxN == 1 ? SCAN_BWD_MIN_BLOCKS_N1 : 1;
}

// One tile's inputs of a lane, fetched a tile ahead on the vector path (B/C and the checkpoint only for
// N = 1). dy is float or the input type: room for 8 floats.
template <typename T>
struct BwdInputs {
  RawItems<T> u, delta, B, C;
  RawItems<float> dy;
  float h0;
};

template <typename T>
__device__ __forceinline__ void unpack_dy(const BwdParams& p, const RawItems<float>& raw, float (&out)[kItems]) {
  if (p.dout_float) {
    unpack_raw(raw, out);
  } else {
    unpack_raw(reinterpret_cast<const RawItems<T>&>(raw), out);
  }
}

// dst[0..3] += v, dst 16-byte aligned: one vector atomic on sm_90.
__device__ __forceinline__ void add4(float* dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(dst), v);
#else
  atomicAdd(dst, v.x);
  atomicAdd(dst + 1, v.y);
  atomicAdd(dst + 2, v.z);
  atomicAdd(dst + 3, v.w);
#endif
}

// A tile's per-warp dB/dC, double-buffered: [buffer][dB, dC][warp][half][lane] float4, where (half, lane)
// holds steps lane * kItems + 4 * half + 0..3, so that the warps' 16-byte stores and the reducing threads'
// loads are contiguous.
using BwdPartials = float4[2][2][kMaxWarpsPerBlock][2][kWarpSize];

// The kernel's body; kVec: rows are read and written in 16-byte words (L % kItems == 0, aligned tensors),
// so a lane's steps are all inside the row or all past its end. Otherwise every step is loaded alone and
// checked against L.
template <bool kVec, typename T, int kMaxN>
__device__ __forceinline__ void scan_bwd_body(const BwdParams& p, BwdPartials& partial) {
  const ScanShape& s = p.shape;
  const int warps = blockDim.x / kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int channel = blockIdx.x * warps + warp;  // the launcher makes warps divide channels per group
  const int b = blockIdx.y;
  const int L = s.length, N = s.d_state;
  const RowIndex r = row_index(s, b, channel);

  // Element offsets of the warp's rows (the bindings keep every tensor under 2^31 elements); pointers are
  // formed at each use from the kernel parameters, which is cheaper than keeping them in registers.
  const int row_off = static_cast<int>(r.row) * L;            // u, dy, du, ddelta
  const int delta_off = static_cast<int>(r.delta_row) * L;
  const int bc_off = static_cast<int>(r.group_row) * N * L;   // B, C, dB, dC
  auto u_row = [&] { return static_cast<const T*>(p.u) + row_off; };
  auto delta_row = [&] { return static_cast<const T*>(p.delta) + delta_off; };
  auto B_rows = [&] { return static_cast<const T*>(p.B) + bc_off; };
  auto C_rows = [&] { return static_cast<const T*>(p.C) + bc_off; };
  auto dyf_row = [&] { return static_cast<const float*>(p.dout) + row_off; };
  auto dyt_row = [&] { return static_cast<const T*>(p.dout) + row_off; };
  const float* checkpoints = p.checkpoints + r.row * s.num_tiles * N;

  float A[kMaxN], A2[kMaxN], carry[kMaxN], dA[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) {
    A[n] = n < N ? p.A[channel * N + n] : 0.f;
    A2[n] = A[n] * kLog2e;
    carry[n] = (n < N && p.dlast_state) ? p.dlast_state[r.row * N + n] : 0.f;
    dA[n] = 0.f;
  }
  const float D = p.D ? p.D[channel] : 0.f;
  const float bias = s.bias_len ? p.delta_bias[r.bias_index] : 0.f;
  float dD = 0.f, dbias = 0.f;
  int buffer = 0;

  // One tile. kWhole: every step of the tile is inside the row and its inputs are in u..C1 (the vector
  // path's full tiles); else the tile loads its inputs checked against L, and steps past the end are
  // identity maps that add nothing to any gradient (u, dy, B, C, dt and the slope are 0 there).
  auto run_tile = [&](int tile, auto whole, float (&u)[kItems], float (&dt)[kItems], float (&dy)[kItems],
                      float (&B1)[kItems], float (&C1)[kItems], float h0_1) {
    constexpr bool kWhole = decltype(whole)::value;
    const int t0 = tile * kTile + lane * kItems;
    if (!kWhole) {  // (on the vector path a lane's steps are all inside the row or all past its end)
      load_items(u_row(), t0, L, kVec, u);
      load_items(delta_row(), t0, L, kVec, dt);
      if (p.dout_float) {
        load_items(dyf_row(), t0, L, kVec, dy);
      } else {
        load_items(dyt_row(), t0, L, kVec, dy);
      }
      if (kMaxN == 1) {
        load_items(B_rows(), t0, L, kVec, B1);
        load_items(C_rows(), t0, L, kVec, C1);
        h0_1 = checkpoints[tile];
      }
    }
    float slope[kItems];
    if (s.softplus) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float x = dt[i] + bias;
        float e;
        dt[i] = softplus(x, e);
        slope[i] = softplus_slope(x, e);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        dt[i] += bias;
        slope[i] = 1.f;
      }
    }
    if (!kWhole) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (t0 + i >= L) dt[i] = slope[i] = 0.f;
      }
    }
    float du[kItems], ddt[kItems];  // summed over n; ddt already times the softplus slope
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      dD += dy[i] * u[i];
      du[i] = D * dy[i];
      ddt[i] = 0.f;
    }

#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= N) break;
      float Bv[kItems], Cv[kItems];
      if (kMaxN == 1) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          Bv[i] = B1[i];
          Cv[i] = C1[i];
        }
      } else {
        load_items(B_rows() + n * L, t0, L, kVec, Bv);
        load_items(C_rows() + n * L, t0, L, kVec, Cv);
      }

      // Forward recurrence inside the tile, started from the saved state: the lane's composite map first.
      float a[kItems], dtu[kItems], dtB[kItems];
      float lane_a = 1.f, lane_b = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        a[i] = fast_exp2(dt[i] * A2[n]);
        dtu[i] = dt[i] * u[i];
        lane_b = a[i] * lane_b + dtu[i] * Bv[i];
        lane_a *= a[i];
      }
      warp_scan_forward(lane_a, lane_b, lane);
      float before_a = __shfl_up_sync(kFullMask, lane_a, 1);
      float before_b = __shfl_up_sync(kFullMask, lane_b, 1);
      if (lane == 0) { before_a = 1.f; before_b = 0.f; }
      const float h0 = kMaxN == 1 ? h0_1 : checkpoints[tile * N + n];
      float h = before_a * h0 + before_b;

      // Per step: dC = dy h_t, and the coefficients of g_t in the other gradients:
      //   ddelta += g w (w = slope (B u + A h_{t-1} a)), dB = g dt u, du += g dt B, dA += g v (v = h_{t-1} a dt).
      // The lane's reverse composite comes in the same pass; dA is summed as S.v + k_in R.v, where
      // g_t = S_t + R_t k_in in terms of the k entering the lane from the right, so v needs no array.
      float w[kItems], v[kItems], cdy[kItems], lane_dC[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float h_prev_a = h * a[i];
        h = h_prev_a + dtu[i] * Bv[i];
        lane_dC[i] = dy[i] * h;
        w[i] = slope[i] * (Bv[i] * u[i] + A[n] * h_prev_a);
        dtB[i] = dt[i] * Bv[i];
        cdy[i] = Cv[i] * dy[i];
        v[i] = h_prev_a * dt[i];
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        partial[buffer][1][warp][half][lane] =
            make_float4(lane_dC[4 * half], lane_dC[4 * half + 1], lane_dC[4 * half + 2], lane_dC[4 * half + 3]);
      }
      float rev_s = 0.f, rev_r = 1.f, dA_s = 0.f, dA_r = 0.f;
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const float S = cdy[i] + rev_s;
        dA_s += S * v[i];
        dA_r += rev_r * v[i];
        rev_s = a[i] * S;
        rev_r *= a[i];
      }
      float rev_a = rev_r, rev_b = rev_s;
      warp_scan_reverse(rev_a, rev_b, lane);
      float after_a = __shfl_down_sync(kFullMask, rev_a, 1);
      float after_b = __shfl_down_sync(kFullMask, rev_b, 1);
      if (lane == kWarpSize - 1) { after_a = 1.f; after_b = 0.f; }
      float k = after_a * carry[n] + after_b;
      dA[n] += dA_s + k * dA_r;
      float lane_dB[kItems];
#pragma unroll
      for (int i = kItems - 1; i >= 0; --i) {
        const float g = cdy[i] + k;
        k = a[i] * g;
        lane_dB[i] = g * dtu[i];
        du[i] += g * dtB[i];
        ddt[i] += g * w[i];
      }
      carry[n] = __shfl_sync(kFullMask, rev_a, 0) * carry[n] + __shfl_sync(kFullMask, rev_b, 0);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        partial[buffer][0][warp][half][lane] =
            make_float4(lane_dB[4 * half], lane_dB[4 * half + 1], lane_dB[4 * half + 2], lane_dB[4 * half + 3]);
      }

      // Sum dB/dC over the block's channels, then one atomic per step. The other buffer takes the next
      // sums, and the next barrier orders this one's reads before it is written again.
      __syncthreads();
      for (int group = threadIdx.x; group < 4 * kWarpSize; group += blockDim.x) {
        const int which = group / (2 * kWarpSize), half = group / kWarpSize % 2, owner = group % kWarpSize;
        const int t = tile * kTile + owner * kItems + 4 * half;  // 4 steps, t % 4 == 0
        if (t < L) {
          float4 sum = partial[buffer][which][0][half][owner];
          for (int w_ = 1; w_ < warps; ++w_) {
            const float4 x = partial[buffer][which][w_][half][owner];
            sum.x += x.x;
            sum.y += x.y;
            sum.z += x.z;
            sum.w += x.w;
          }
          float* dst = (which == 0 ? p.dB : p.dC) + bc_off + n * L + t;
          if (L % 4 == 0) {
            add4(dst, sum);
          } else {  // the row's last group may run past its end
            const float parts[4] = {sum.x, sum.y, sum.z, sum.w};
            for (int j = 0; j < 4 && t + j < L; ++j) atomicAdd(dst + j, parts[j]);
          }
        }
      }
      buffer ^= 1;
    }

#pragma unroll
    for (int i = 0; i < kItems; ++i) dbias += ddt[i];  // zero past the end (slope 0 there)
    store_items(static_cast<T*>(p.du) + row_off, t0, L, kVec, du);
    if (p.ddelta_per_channel) {
      store_items(p.ddelta_per_channel + row_off, t0, L, kVec, ddt);
    } else {
      store_items(static_cast<T*>(p.ddelta) + row_off, t0, L, kVec, ddt);
    }
  };

  float u[kItems], dt[kItems], dy[kItems], B1[kItems], C1[kItems];
  if (!kVec) {
    for (int tile = s.num_tiles - 1; tile >= 0; --tile) run_tile(tile, std::false_type(), u, dt, dy, B1, C1, 0.f);
  } else {
    // Full tiles take their inputs from registers fetched while the previous tile computed; a partial
    // last tile (processed first) loads its own, checked against L.
    auto fetch = [&](int tile, BwdInputs<T>& in) {
      const int t0 = tile * kTile + lane * kItems;
      fetch_raw(u_row(), t0, in.u);
      fetch_raw(delta_row(), t0, in.delta);
      if (p.dout_float) {
        fetch_raw(dyf_row(), t0, in.dy);
      } else {
        fetch_raw(dyt_row(), t0, reinterpret_cast<RawItems<T>&>(in.dy));
      }
      if (kMaxN == 1) {
        fetch_raw(B_rows(), t0, in.B);
        fetch_raw(C_rows(), t0, in.C);
        in.h0 = checkpoints[tile];
      }
    };
    const int whole_tiles = L / kTile;
    BwdInputs<T> next;
    if (whole_tiles > 0) fetch(whole_tiles - 1, next);
    if (whole_tiles < s.num_tiles) run_tile(whole_tiles, std::false_type(), u, dt, dy, B1, C1, 0.f);
    for (int tile = whole_tiles - 1; tile >= 0; --tile) {
      unpack_raw(next.u, u);
      unpack_raw(next.delta, dt);
      unpack_dy<T>(p, next.dy, dy);
      if (kMaxN == 1) {
        unpack_raw(next.B, B1);
        unpack_raw(next.C, C1);
      }
      const float h0_1 = kMaxN == 1 ? next.h0 : 0.f;
      if (tile > 0) fetch(tile - 1, next);
      run_tile(tile, std::true_type(), u, dt, dy, B1, C1, h0_1);
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

template <typename T, int kMaxN>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize, bwd_min_blocks<T, kMaxN>())
scan_bwd_kernel(const BwdParams p) {
  __shared__ __align__(16) BwdPartials partial;
  if (p.shape.vector_io) {
    scan_bwd_body<true, T, kMaxN>(p, partial);
  } else {
    scan_bwd_body<false, T, kMaxN>(p, partial);
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
