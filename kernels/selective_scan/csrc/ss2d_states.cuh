// Fused SS2D core for d_state N from 2 to 16 (vanilla VMamba, forward_type "v0"): the op contract, route index
// maps, dtype dispatch and per-warp task of ss2d_fused.cuh, with N states per channel.
//
// Work split: one warp owns one sequence (sample b, 32 consecutive channels, route k), lane = channel; its N
// states h[n] live in registers (kStates of them: N rounded up to 4, 8 or 16; the padding states have B = C = 0
// and decay 1, so they stay zero and add nothing). Each block is one warp, and blocks go route fastest, then
// channel group, then sample, as the N = 1 kernels'. The warp moves kStatesStep steps at a time: the steps' x
// (per lane) and x_dbl rows (warp-uniform, copied into shared memory and read back as broadcasts) are loaded
// first, then the arithmetic runs. W_dt sits in shared memory lane-major (any dt rank, one kernel per state
// count and dtype), read per step beside the row's rank values.
//
// On chip a route's x_dbl row is [B (kStates), C (kStates), dt-rank values (R rounded up to 8)], zero-padded.
// The forward saves the states entering every chunk of kStatesChunk steps: checkpoints (B, 4, chunks, N, D)
// fp32. The backward walks a chunk from its checkpoint once, keeping the states entering each step group in
// shared memory, then walks the groups from the last: recomputes the group's states into shared memory (registers
// cannot hold 16 states for many steps) and runs the adjoint through it.
// Unsegmented: one warp per route for the whole batch (batch 128 gives 128 x D / 32 x 4 warps).
#pragma once

#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {

#ifdef __CUDACC__

// Per-(route, channel) constants.
template <int kStates>
struct StatesRoute {
  float A2[kStates];  // A[n] * log2(e), A = -exp(A_log); 0 for padding states and inactive lanes (decay 1)
  float bias, Dk;

  template <typename Params>
  __device__ __forceinline__ StatesRoute(const Params& p, const Task& task) {
    const Shape& s = p.s;
    const long kd = task.route_channel(s);
#pragma unroll
    for (int n = 0; n < kStates; ++n)
      A2[n] = task.active && n < s.d_state ? -expf(p.A_log[kd * s.d_state + n]) * kLog2e : 0.f;
    bias = task.active ? p.dt_bias[kd] : 0.f;
    Dk = task.active ? p.Ds[kd] : 0.f;
  }
};

// dt-rank values padded to a multiple of 8 (the backward contracts them 8 at a time)
__host__ __device__ __forceinline__ int states_rank_pad(int rank) { return (rank + 7) / 8 * 8; }
// floats per on-chip row
__host__ __device__ __forceinline__ int states_row_stride(int states, int rank) {
  return 2 * states + states_rank_pad(rank);
}

// The warp's rows and W_dt in shared memory (floats): rows [kStatesStep][stride], W_dt [rank_pad][32].
template <int kStates>
struct StatesStage {
  float* rows;  // [kStatesStep][stride]: B, C, rank values
  float* w;     // [rank_pad][kLanes]: W_dt[k, d, j] at w[j * 32 + lane], zero past R and for inactive lanes
  int stride, rank_pad;

  __device__ __forceinline__ StatesStage(const Shape& s, float* base)
      : rows(base), w(base + kStatesStep * states_row_stride(kStates, s.rank)),
        stride(states_row_stride(kStates, s.rank)), rank_pad(states_rank_pad(s.rank)) {}
  // floats per warp
  static __host__ __device__ int floats(const Shape& s) {
    return kStatesStep * states_row_stride(kStates, s.rank) + states_rank_pad(s.rank) * kLanes;
  }

  template <typename Params>
  __device__ __forceinline__ void load_weights(const Params& p, const Task& task) {
    const Shape& s = p.s;
    const long kd = task.route_channel(s);
    for (int j = 0; j < rank_pad; ++j)
      w[j * kLanes + task.lane] = task.active && j < s.rank ? p.dt_weight[kd * s.rank + j] : 0.f;
    __syncwarp();
  }

  // Rows of the n steps whose positions the first n lanes hold in my_pos (chunk_position), from x_dbl
  // (B, L, K, R + 2N) of type T, global order [rank values, B, C]. The lanes spread over the rows' values, so all
  // loads are in flight together.
  template <typename T>
  __device__ __forceinline__ void load_rows(const Shape& s, const Task& task, const void* xdbl, int my_pos, int n) {
    const int width = s.row_width();
    const T* src = static_cast<const T*>(xdbl) + task.rows_offset(s, width);
    __syncwarp();  // every lane is done with the previous rows
    for (int q0 = 0; q0 < kStatesStep * stride; q0 += kLanes) {  // stride is a multiple of 8: whole passes
      const int q = q0 + task.lane, i = q / stride, slot = q - i * stride;
      int j;  // the slot's index in the global row, -1 for padding
      if (slot < kStates) {
        j = slot < s.d_state ? s.rank + slot : -1;
      } else if (slot < 2 * kStates) {
        j = slot - kStates < s.d_state ? s.rank + s.d_state + slot - kStates : -1;
      } else {
        j = slot - 2 * kStates < s.rank ? slot - 2 * kStates : -1;
      }
      const int pos = __shfl_sync(kFullMask, my_pos, i);
      if (i < n) rows[q] = j >= 0 ? load_float(src + static_cast<long>(pos) * kRoutes * width + j) : 0.f;
    }
    __syncwarp();
  }

  // 16-byte word q of step i's row
  __device__ __forceinline__ float4 word(int i, int q) const {
    return reinterpret_cast<const float4*>(rows + i * stride)[q];
  }
  // dt pre-activation bias + W_dt . r of step i
  __device__ __forceinline__ float dt_preact(float bias, int i, int lane) const {
    float z = bias;
    const float* r = rows + i * stride + 2 * kStates;
    for (int j = 0; j < rank_pad; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(r + j);
      z = fmaf(w[j * kLanes + lane], v.x, z);
      z = fmaf(w[(j + 1) * kLanes + lane], v.y, z);
      z = fmaf(w[(j + 2) * kLanes + lane], v.z, z);
      z = fmaf(w[(j + 3) * kLanes + lane], v.w, z);
    }
    return z;
  }
  // B[n] and C[n] of step i (a row's first 2 kStates values), as whole words
  __device__ __forceinline__ void state_inputs(int i, float (&B)[kStates], float (&C)[kStates]) const {
#pragma unroll
    for (int q = 0; q < kStates / 4; ++q) {
      const float4 b = word(i, q), c = word(i, kStates / 4 + q);
      B[4 * q] = b.x, B[4 * q + 1] = b.y, B[4 * q + 2] = b.z, B[4 * q + 3] = b.w;
      C[4 * q] = c.x, C[4 * q + 1] = c.y, C[4 * q + 2] = c.z, C[4 * q + 3] = c.w;
    }
  }
};

// Sums over the warp's lanes of kM values at once (kM a power of two up to 32): returns to each lane the sum of
// v[lane % kM]. Each halving level trades half of a lane's values with its partner lane's, so kM values cost
// kM - 1 shuffles plus 5 - log2(kM), where kM separate tree sums cost 5 kM. v is overwritten.
template <int kHalf, int kM>
__device__ __forceinline__ void sum_scatter_level(float (&v)[kM], int lane) {
  if constexpr (kHalf >= 1) {
    const bool upper = lane & kHalf;  // this lane keeps the upper half of its window of values
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float send = upper ? v[i] : v[i + kHalf];
      const float keep = upper ? v[i + kHalf] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, kHalf);
    }
    sum_scatter_level<kHalf / 2>(v, lane);
  }
}

template <int kM>
__device__ __forceinline__ float warp_sum_scatter(float (&v)[kM], int lane) {
  static_assert(kM >= 1 && kM <= kLanes && (kM & (kM - 1)) == 0, "kM: a power of two up to 32");
  sum_scatter_level<kM / 2>(v, lane);
  float sum = v[0];
#pragma unroll
  for (int offset = kM; offset < kLanes; offset *= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  return sum;
}

// Offset of (b, k, chunk c, state 0, d) in the (B, K, num_chunks, N, D) checkpoints; state n is n * D further.
__device__ __forceinline__ long states_ckpt_offset(const Shape& s, const Task& task, int c) {
  return ((static_cast<long>(task.b) * kRoutes + task.k) * s.num_chunks + c) * s.d_state * s.dim + task.d;
}

// launch(element tag, std::integral_constant<int, kStates>) for x's dtype and N (2..16; kStates = N rounded up
// to 4, 8 or 16).
template <typename Launch, typename Tag>
cudaError_t dispatch_states(int d_state, Tag tag, Launch& launch) {
  if (d_state <= 4) return launch(tag, std::integral_constant<int, 4>{});
  if (d_state <= 8) return launch(tag, std::integral_constant<int, 8>{});
  if (d_state <= kMaxDState) return launch(tag, std::integral_constant<int, 16>{});
  return cudaErrorInvalidValue;
}

template <typename Launch>
cudaError_t dispatch_dtype_states(ScalarKind dtype, int d_state, Launch&& launch) {
  switch (dtype) {
    case ScalarKind::kFloat32: return dispatch_states(d_state, float{}, launch);
    case ScalarKind::kFloat16: return dispatch_states(d_state, __half{}, launch);
    case ScalarKind::kBFloat16: return dispatch_states(d_state, __nv_bfloat16{}, launch);
  }
  return cudaErrorInvalidValue;
}

#endif  // __CUDACC__

}  // namespace ss2d
}  // namespace selective_scan
