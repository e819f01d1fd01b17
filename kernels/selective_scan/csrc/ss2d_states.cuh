// Fused SS2D core for d_state N from 2 to 16 (vanilla VMamba, forward_type "v0"): the op contract, route index
// maps, dtype dispatch and per-warp task of ss2d_fused.cuh, with N states per channel.
//
// Work split: one warp owns one sequence (sample b, route k, a group of consecutive channels); its N states per
// channel live in registers (kStates of them: N rounded up to 4, 8 or 16; the padding states have B = C = 0 and
// decay 1, so they stay zero and add nothing). In the forward a warp covers 32 channels, lane = channel; the
// backward, which holds several values per state, splits each channel's states over a lane pair and covers 16
// channels (ss2d_states_bwd.cu). Each block is one warp, and blocks go route fastest, then channel group, then
// sample, as the N = 1 kernels'. The warp moves kStatesStep steps at a time: the steps' x (per lane) and x_dbl rows
// (warp-uniform, copied into shared memory and read back as broadcasts) are loaded first, then the arithmetic
// runs. W_dt sits in shared memory lane-major (any dt rank, one kernel per state count and dtype), read per step
// beside the row's rank values.
//
// On chip a route's x_dbl row is [B (kStates), C (kStates), dt-rank values (R rounded up to 8)], zero-padded.
// The forward saves the states entering every chunk of kStatesChunk steps (four step groups): checkpoints
// (B, 4, chunks, N, D) fp32. The backward walks each chunk from its checkpoint, recomputing a group's states into
// shared memory (registers cannot hold them for many steps), and runs the adjoint through them.
// Unsegmented: one warp per route for the whole batch (batch 128 gives 128 x D / 32 x 4 warps in the forward).
#pragma once

#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {

#ifdef __CUDACC__

// Per-(route, channel) constants of a lane's share of the states: kChannelLanes lanes per channel (the backward
// splits a channel over a lane pair), part p = lane % kChannelLanes holding states [p kLaneStates, (p + 1)
// kLaneStates).
template <int kStates, int kChannelLanes = 1>
struct StatesRoute {
  static constexpr int kLaneStates = kStates / kChannelLanes;
  float A2[kLaneStates];  // A[n] * log2(e), A = -exp(A_log); 0 for padding states and inactive lanes (decay 1)
  float bias, Dk;

  template <typename Params>
  __device__ __forceinline__ StatesRoute(const Params& p, const Task& task) {
    const Shape& s = p.s;
    const long kd = task.route_channel(s);
    const int first = task.lane % kChannelLanes * kLaneStates;
#pragma unroll
    for (int m = 0; m < kLaneStates; ++m)
      A2[m] = task.active && first + m < s.d_state ? -expf(p.A_log[kd * s.d_state + first + m]) * kLog2e : 0.f;
    bias = task.active ? p.dt_bias[kd] : 0.f;
    Dk = task.active ? p.Ds[kd] : 0.f;
  }
};

// dt-rank values padded to a multiple of 8 (a lane pair's halves of them are whole 16-byte words)
__host__ __device__ __forceinline__ int states_rank_pad(int rank) { return (rank + 7) / 8 * 8; }
// floats per on-chip row
__host__ __device__ __forceinline__ int states_row_stride(int states, int rank) {
  return 2 * states + states_rank_pad(rank);
}

// kCount consecutive floats of shared memory in the widest words their alignment allows (p: a multiple of
// kCount floats into a 16-byte aligned buffer)
template <int kCount>
__device__ __forceinline__ void load_words(const float* p, float* out) {
  if constexpr (kCount % 4 == 0) {
#pragma unroll
    for (int q = 0; q < kCount / 4; ++q) {
      const float4 w = reinterpret_cast<const float4*>(p)[q];
      out[4 * q] = w.x, out[4 * q + 1] = w.y, out[4 * q + 2] = w.z, out[4 * q + 3] = w.w;
    }
  } else {
    static_assert(kCount % 2 == 0, "kCount: even");
#pragma unroll
    for (int q = 0; q < kCount / 2; ++q) {
      const float2 w = reinterpret_cast<const float2*>(p)[q];
      out[2 * q] = w.x, out[2 * q + 1] = w.y;
    }
  }
}

// The warp's rows and W_dt in shared memory (floats): rows [kStatesStep][stride], W_dt [rank_pad / kChannelLanes]
// [32]. With kChannelLanes lanes per channel, part p of a channel reads its states' B and C and owns the rank values
// [p share, (p + 1) share), share = rank_pad / kChannelLanes: its W_dt values, its terms of the dt pre-activation
// (summed over the channel's lanes by shuffles).
template <int kStates, int kChannelLanes = 1>
struct StatesStage {
  static constexpr int kLaneStates = kStates / kChannelLanes;
  float* rows;  // [kStatesStep][stride]: B, C, rank values
  float* w;     // [share][kLanes]: W_dt[k, d, p share + j] at w[j * 32 + lane], zero past R and for inactive lanes
  int stride, share;

  __device__ __forceinline__ StatesStage(const Shape& s, float* base)
      : rows(base), w(base + kStatesStep * states_row_stride(kStates, s.rank)),
        stride(states_row_stride(kStates, s.rank)), share(states_rank_pad(s.rank) / kChannelLanes) {}
  // floats per warp
  static __host__ __device__ int floats(const Shape& s) {
    return kStatesStep * states_row_stride(kStates, s.rank) + states_rank_pad(s.rank) / kChannelLanes * kLanes;
  }

  template <typename Params>
  __device__ __forceinline__ void load_weights(const Params& p, const Task& task) {
    const Shape& s = p.s;
    const long kd = task.route_channel(s);
    const int first = task.lane % kChannelLanes * share;
    for (int j = 0; j < share; ++j)
      w[j * kLanes + task.lane] = task.active && first + j < s.rank ? p.dt_weight[kd * s.rank + first + j] : 0.f;
    __syncwarp();
  }

  // Rows of the n steps whose positions the first n lanes hold in my_pos (chunk_position), from x_dbl
  // (B, L, K, R + 2N) of type T, global order [rank values, B, C]. The lanes spread over the rows' values, kBatch
  // loads per lane in flight before their stores (the backward, with registers to spare there, waits for memory
  // once per kBatch rather than once per value).
  template <typename T, int kBatch = 1>
  __device__ __forceinline__ void load_rows(const Shape& s, const Task& task, const void* xdbl, int my_pos, int n) {
    const int width = s.row_width(), total = kStatesStep * stride;
    const T* src = static_cast<const T*>(xdbl) + task.rows_offset(s, width);
    __syncwarp();  // every lane is done with the previous rows
    for (int q0 = 0; q0 < total; q0 += kBatch * kLanes) {
      float values[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int q = q0 + u * kLanes + task.lane, i = q / stride, slot = q - i * stride;
        int j;  // the slot's index in the global row, -1 for padding
        if (slot < kStates) {
          j = slot < s.d_state ? s.rank + slot : -1;
        } else if (slot < 2 * kStates) {
          j = slot - kStates < s.d_state ? s.rank + s.d_state + slot - kStates : -1;
        } else {
          j = slot - 2 * kStates < s.rank ? slot - 2 * kStates : -1;
        }
        const int pos = __shfl_sync(kFullMask, my_pos, i);  // past the rows (i >= kStatesStep) unused
        values[u] = i < n && j >= 0 ? load_float(src + static_cast<long>(pos) * kRoutes * width + j) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int q = q0 + u * kLanes + task.lane;
        if (q / stride < n) rows[q] = values[u];  // values past the rows (q >= total) have q / stride >= n
      }
    }
    __syncwarp();
  }

  // the lane's rank values of step i's row (its part's share of them)
  __device__ __forceinline__ const float* rank_values(int i, int lane) const {
    return rows + i * stride + 2 * kStates + lane % kChannelLanes * share;
  }
  // dt pre-activation bias + W_dt . r of step i, the same in each of the channel's lanes
  __device__ __forceinline__ float dt_preact(float bias, int i, int lane) const {
    float z = lane % kChannelLanes == 0 ? bias : 0.f;
    const float* r = rank_values(i, lane);
    for (int j = 0; j < share; j += 4) {
      const float4 v = *reinterpret_cast<const float4*>(r + j);
      z = fmaf(w[j * kLanes + lane], v.x, z);
      z = fmaf(w[(j + 1) * kLanes + lane], v.y, z);
      z = fmaf(w[(j + 2) * kLanes + lane], v.z, z);
      z = fmaf(w[(j + 3) * kLanes + lane], v.w, z);
    }
#pragma unroll
    for (int offset = 1; offset < kChannelLanes; offset *= 2) z += __shfl_xor_sync(kFullMask, z, offset);
    return z;
  }
  // B[n] and C[n] of step i for the lane's states
  __device__ __forceinline__ void state_inputs(int i, int lane, float (&B)[kLaneStates],
                                               float (&C)[kLaneStates]) const {
    const float* row = rows + i * stride + lane % kChannelLanes * kLaneStates;
    load_words<kLaneStates>(row, B);
    load_words<kLaneStates>(row + kStates, C);
  }
};

// Sums over the warp's lanes of kM values at once, over the lanes that share lane % kStride (kM a power of two up
// to 32 / kStride): returns to each lane that sum of v[lane / kStride % kM]. Each halving level trades half of a
// lane's values with its partner lane's, so kM values cost kM - 1 shuffles plus log2(32 / kStride / kM), where kM
// separate tree sums cost kM log2(32 / kStride). v is overwritten.
template <int kStride, int kHalf, int kM>
__device__ __forceinline__ void sum_scatter_level(float (&v)[kM], int lane) {
  if constexpr (kHalf >= 1) {
    const bool upper = lane & (kHalf * kStride);  // this lane keeps the upper half of its window of values
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
      const float send = upper ? v[i] : v[i + kHalf];
      const float keep = upper ? v[i + kHalf] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, kHalf * kStride);
    }
    sum_scatter_level<kStride, kHalf / 2>(v, lane);
  }
}

template <int kStride = 1, int kM>
__device__ __forceinline__ float warp_sum_scatter(float (&v)[kM], int lane) {
  static_assert(kStride >= 1 && (kStride & (kStride - 1)) == 0 && kM >= 1 && kM * kStride <= kLanes &&
                    (kM & (kM - 1)) == 0,
                "kStride, kM: powers of two, kM * kStride up to 32");
  sum_scatter_level<kStride, kM / 2>(v, lane);
  float sum = v[0];
#pragma unroll
  for (int offset = kM * kStride; offset < kLanes; offset *= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
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
