// Forward selective scan: y = <C_t, h_t> + D u_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t.
// Reads u, delta, B, C once; writes y, the last state and, for the backward pass, the state entering every
// kTile-step tile of each row.
//
// One warp scans rows_per_warp consecutive rows as one flat sequence (see scan_common.cuh): the state is
// restarted (a = 0) at each row's first step, so a tile may hold the end of one row and the start of the
// next. Its tiles start on the kItems grid of the flat index, so u, delta and y move in 16-byte words for
// any L; items outside the warp's rows are identity maps that are neither read nor written.
//
// Each warp moves 2 KB per tile (16-bit in, fp32 out), so the card's bandwidth needs many tiles' loads in
// flight and few instructions per step. The next kFwdStages - 1 tiles' inputs (u, delta and, for N = 1, B
// and C) are copied asynchronously into shared memory, which costs no registers and so leaves room for
// 4 blocks of 8 warps per SM; the common case (a lane's kItems steps all belong to one row) takes a lean
// path with no per-step index arithmetic; softplus/exp use the MUFU unit (scan_common.cuh). Lanes that
// straddle a row end (when kItems does not divide L) take a per-step path; lanes past the warp's rows are
// identity maps.
#include <algorithm>

#include "scan_common.cuh"

namespace selective_scan {

constexpr int kFwdWarpsPerBlock = 8;
constexpr int kMaxRowsPerWarp = 64;
constexpr int kFwdStages = 3;  // tiles of inputs staged per warp: the one computed and the next two

// kMaxN is a compile-time bound on d_state so the per-state arrays stay in registers.
// For N = 1 and 16-bit inputs (VMamba v2 under AMP) the register cap keeps 4 blocks (32 warps) per SM
// resident (build knob SCAN_FWD_MIN_BLOCKS_N1, see setup.py SELECTIVE_SCAN_NVCC_FLAGS).
#ifndef SCAN_FWD_MIN_BLOCKS_N1
#define SCAN_FWD_MIN_BLOCKS_N1 4
#endif

template <typename T, int kMaxN>
constexpr int fwd_min_blocks() {
  return kMaxN == 1 && sizeof(T) == 2 ? SCAN_FWD_MIN_BLOCKS_N1 : 2;
}

// Where a lane's items of one tile lie: the flat index of its first step, that step's row and time, and
// whether all kItems steps are steps of that row within the warp's span (the fast path).
struct LanePos {
  int e0, row, t0;
  bool fast;
};

__device__ __forceinline__ LanePos lane_pos(const FwdParams& p, int e0, int begin, int end) {
  LanePos q;
  q.e0 = e0;
  q.row = p.by_length.div(e0);
  q.t0 = e0 - q.row * p.shape.length;
  // Fast lanes also save at most the state entering their first step (t0 % kTile == 0) and the state after
  // their last (t0 + kItems == L): no multiple of kTile strictly inside the lane's steps.
  q.fast = e0 >= begin && e0 <= end - kItems && q.t0 <= p.shape.length - kItems &&
           static_cast<unsigned>(q.t0) % kTile <= kTile - kItems;
  return q;
}

// Where the per-step path finds a row's inputs.
struct RowInfo {
  int channel;
  int bc_offset;     // element offset of the row's (batch, group) block of B/C: N rows of L
  int delta_offset;  // element offset of the row's delta row
  int bias_index;
};

__device__ __forceinline__ RowInfo row_info(const FwdParams& p, int row) {
  const ScanShape& s = p.shape;
  const int b = p.by_channels.div(row);
  const int channel = row - b * s.channels;
  const int group = p.by_group_size.div(channel);
  const int delta_row = p.by_delta_group_size.div(channel);
  RowInfo r;
  r.channel = channel;
  r.bc_offset = (b * s.groups + group) * s.d_state * s.length;
  r.delta_offset = (b * s.delta_rows + delta_row) * s.length;
  r.bias_index = s.bias_len == s.channels ? channel : delta_row;
  return r;
}

// The parameters of one row, as the fast path uses them.
template <int kMaxN>
struct RowParams {
  int row = -1;
  int bc_offset = 0;     // as in RowInfo
  int delta_offset = 0;  // element offset of the row's delta row
  float A2[kMaxN];       // A * log2(e)
  float D = 0.f, bias = 0.f;
};

template <int kMaxN>
__device__ __forceinline__ void load_row_params(const FwdParams& p, int row, RowParams<kMaxN>& rp) {
  const ScanShape& s = p.shape;
  const int b = p.by_channels.div(row);
  const int channel = row - b * s.channels;
  const int delta_row = p.by_delta_group_size.div(channel);
  rp.row = row;
  rp.bc_offset = (b * s.groups + p.by_group_size.div(channel)) * s.d_state * s.length;
  rp.delta_offset = (b * s.delta_rows + delta_row) * s.length;
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) rp.A2[n] = n < s.d_state ? p.A[channel * s.d_state + n] * kLog2e : 0.f;
  rp.D = p.D ? p.D[channel] : 0.f;
  rp.bias = s.bias_len ? p.delta_bias[s.bias_len == s.channels ? channel : delta_row] : 0.f;
}

// Shared-memory staging of fast lanes' inputs: [stage][u, delta (, B, C for N = 1)][warp][vector][lane]
// uint4 words; a lane's slots are kSlotWords apart.
template <typename T, int kMaxN>
struct FwdStaging {
  static constexpr int kTensors = kMaxN == 1 ? 4 : 2;  // for larger N, B/C are loaded per state
  static constexpr int kSlotWords = kFwdWarpsPerBlock * RawItems<T>::kVectors * kWarpSize;
  static constexpr size_t kBytes = sizeof(uint4) * kFwdStages * kTensors * kSlotWords;
};

__device__ __forceinline__ float delta_to_dt(const ScanShape& s, float delta, float bias) {
  const float x = delta + bias;
  float e;
  return s.softplus ? softplus(x, e) : x;
}

// The fast path's pass over its steps for the first state: dt, decay, prefix maps, y and C*P per step.
template <bool kSoftplus, int kMaxN>
__device__ __forceinline__ void fast_first_state(const RowParams<kMaxN>& rp, int t0, const float (&u)[kItems],
                                                 const float (&Bv)[kItems], const float (&Cv)[kItems],
                                                 float (&dt)[kItems], float (&dtu)[kItems], float (&y)[kItems],
                                                 float (&cp)[kItems], float& P, float& Q) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const float x = dt[i] + rp.bias;
    float e;
    dt[i] = kSoftplus ? softplus(x, e) : x;
    dtu[i] = dt[i] * u[i];
    const float a = i == 0 && t0 == 0 ? 0.f : fast_exp2(dt[i] * rp.A2[0]);
    Q = a * Q + dtu[i] * Bv[i];
    P *= a;
    y[i] = rp.D * u[i] + Cv[i] * Q;
    cp[i] = Cv[i] * P;
  }
}

// The kernel's body; kVec: u, delta and B/C rows are all 16-byte aligned (the common case, without the
// per-tensor checks).
template <bool kVec, typename T, int kMaxN>
__device__ __forceinline__ void scan_fwd_body(const FwdParams& p, uint4* staging) {
  using Staging = FwdStaging<T, kMaxN>;
  const ScanShape& s = p.shape;
  const int lane = threadIdx.x % kWarpSize;
  const int warp_in_block = threadIdx.x / kWarpSize;
  const int warp = blockIdx.x * kFwdWarpsPerBlock + warp_in_block;
  const int rows = s.batch * s.channels;
  const int first_row = warp * p.rows_per_warp;
  if (first_row >= rows) return;  // whole warps leave; no block barrier follows
  const int L = s.length, N = s.d_state;
  const int end_row = min(first_row + p.rows_per_warp, rows);
  const int begin = first_row * L, end = end_row * L;  // the warp's flat steps
  const int base = begin - begin % kItems + lane * kItems;  // the lane's first step in tile 0
  const int num_tiles = (end - (begin - begin % kItems) + kTile - 1) / kTile;
  const int row_tiles = s.num_tiles;  // checkpoints per row, for the backward pass
  const bool flat_delta = s.delta_rows == s.channels;  // else delta rows are shared and read per row
  const bool u_vec = kVec || p.u_vec, delta_vec = kVec || p.delta_vec, bc_vec = kVec || p.bc_vec;

  const T* u_in = static_cast<const T*>(p.u);
  const T* B = static_cast<const T*>(p.B);
  const T* C = static_cast<const T*>(p.C);
  const T* delta = static_cast<const T*>(p.delta);

  // The lane's staging slot of (stage, tensor) is slots + (stage * kTensors + tensor) * kSlotWords.
  const uint4* slots = staging + warp_in_block * RawItems<T>::kVectors * kWarpSize + lane;
  const unsigned slots_addr = static_cast<unsigned>(__cvta_generic_to_shared(slots));
  auto slot_addr = [&](int stage, int tensor) {
    return slots_addr + (stage * Staging::kTensors + tensor) * Staging::kSlotWords * sizeof(uint4);
  };
  auto slot = [&](int stage, int tensor) { return slots + (stage * Staging::kTensors + tensor) * Staging::kSlotWords; };

  // Copies tile j's inputs of a fast lane into `stage` (j % kFwdStages); one commit group per tile, empty
  // or not.
  auto issue = [&](int j, int stage) {
    if (j < num_tiles) {
      const LanePos q = lane_pos(p, base + j * kTile, begin, end);
      if (q.fast) {
        if (u_vec) stage_raw<false>(slot_addr(stage, 0), u_in + q.e0);
        if (delta_vec) stage_raw<false>(slot_addr(stage, 1), delta + q.e0);
        if (kMaxN == 1 && bc_vec) {
          const int bc = row_info(p, q.row).bc_offset;  // (the unused parts of row_info are not computed)
          stage_raw<true>(slot_addr(stage, 2), B + bc + q.t0);
          stage_raw<true>(slot_addr(stage, 3), C + bc + q.t0);
        }
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int j = 0; j < kFwdStages - 1; ++j) issue(j, j);

  float state[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) state[n] = 0.f;
  RowParams<kMaxN> rp;  // of the row of the lane's current fast tile, reloaded only when that row changes
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) rp.A2[n] = 0.f;

  for (int tile = 0, stage = 0; tile < num_tiles; ++tile, stage = stage + 1 == kFwdStages ? 0 : stage + 1) {
    issue(tile + kFwdStages - 1, stage == 0 ? kFwdStages - 1 : stage - 1);
    cp_async_wait<kFwdStages - 1>();  // this tile's group has landed
    const LanePos pos = lane_pos(p, base + tile * kTile, begin, end);
    const int e0 = pos.e0, t0 = pos.t0;
    // y[i] = D u + sum over n of C (P h_start + Q), where P, Q are the lane's prefix maps up to step i and
    // h_start the state entering the lane: only y and C*P stay live across the warp scan.
    float y[kItems], cp[kItems];
    float dt[kItems], dtu[kItems];  // fast path, kept for n > 0
    float4 scratch[kItems];         // per-step path: y part, C*P, P, Q per step (local memory)
    // Per-step lanes: bit i of `valid` (step i is one of the warp's) and `marks` (it saves a checkpoint or
    // the last state).
    unsigned valid = (1u << kItems) - 1, marks = 0;
    if (pos.fast) {
      if (pos.row != rp.row) load_row_params(p, pos.row, rp);
    } else {
      valid = 0;
      if (e0 < end && e0 + kItems > begin) {  // else (past the warp's last row) nothing to do
#pragma unroll 1
        for (int i = 0; i < kItems; ++i) {
          const int e = e0 + i;
          if (e >= begin && e < end) {
            const int t = e - p.by_length.div(e) * L;
            valid |= 1u << i;
            if (t % kTile == 0 || t == L - 1) marks |= 1u << i;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] = 0.f;
    }

#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= N) break;
      // The lane's maps h -> a*h + b (a = 0 where a row starts), composed into prefixes P*h + Q.
      float P = 1.f, Q = 0.f;
      if (pos.fast) {
        float Bv[kItems], Cv[kItems];
        if (kMaxN == 1 && bc_vec) {
          unstage<T>(slot(stage, 2), Bv);
          unstage<T>(slot(stage, 3), Cv);
        } else if (bc_vec) {
          RawItems<T> raw;
          fetch_raw(B + rp.bc_offset + n * L, t0, raw);
          unpack_raw(raw, Bv);
          fetch_raw(C + rp.bc_offset + n * L, t0, raw);
          unpack_raw(raw, Cv);
        } else {
          load_run(B + rp.bc_offset + n * L + t0, Bv);
          load_run(C + rp.bc_offset + n * L + t0, Cv);
        }
        if (n == 0) {
          float u[kItems];
          if (u_vec) {
            unstage<T>(slot(stage, 0), u);
          } else {
            load_run(u_in + e0, u);
          }
          if (delta_vec) {
            unstage<T>(slot(stage, 1), dt);
          } else {
            load_run(delta + (flat_delta ? e0 : rp.delta_offset + t0), dt);
          }
          // One pass per step from the inputs to y and C*P, so that few values are live at a time; the
          // softplus branch is taken once per lane.
          if (s.softplus) {
            fast_first_state<true>(rp, t0, u, Bv, Cv, dt, dtu, y, cp, P, Q);
          } else {
            fast_first_state<false>(rp, t0, u, Bv, Cv, dt, dtu, y, cp, P, Q);
          }
        } else {
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            const float a = i == 0 && t0 == 0 ? 0.f : fast_exp2(dt[i] * rp.A2[n]);
            Q = a * Q + dtu[i] * Bv[i];
            P *= a;
            y[i] += Cv[i] * Q;
            cp[i] = Cv[i] * P;
          }
        }
      } else if (valid == 0) {  // identity maps only
#pragma unroll
        for (int i = 0; i < kItems; ++i) cp[i] = 0.f;
      } else {
        // Rolled, so that this path does not add to the fast path's registers. Steps outside the warp's are
        // identity maps.
#pragma unroll 1
        for (int i = 0; i < kItems; ++i) {
          float a = 1.f, b = 0.f, Cv = 0.f, y_part = 0.f;
          if (valid >> i & 1) {
            const int e = e0 + i;
            const int row = p.by_length.div(e);
            const int t = e - row * L;
            const RowInfo r = row_info(p, row);
            const int offset = r.bc_offset + n * L + t;
            const float u_e = to_float(u_in[e]);
            const float x = to_float(delta[flat_delta ? e : r.delta_offset + t]);
            const float dt_e = delta_to_dt(s, x, s.bias_len ? p.delta_bias[r.bias_index] : 0.f);
            a = t == 0 ? 0.f : fast_exp2(dt_e * (p.A[r.channel * N + n] * kLog2e));
            b = dt_e * u_e * to_float(B[offset]);
            Cv = to_float(C[offset]);
            if (n == 0 && p.D) y_part = p.D[r.channel] * u_e;
          }
          Q = a * Q + b;
          P *= a;
          scratch[i] = make_float4(y_part + Cv * Q, Cv * P, P, Q);
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          y[i] += scratch[i].x;
          cp[i] = scratch[i].y;
        }
      }
      float lane_a = P, lane_b = Q;
      warp_scan_forward(lane_a, lane_b, lane);
      float before_a = __shfl_up_sync(kFullMask, lane_a, 1);
      float before_b = __shfl_up_sync(kFullMask, lane_b, 1);
      if (lane == 0) { before_a = 1.f; before_b = 0.f; }
      const float h_start = before_a * state[n] + before_b;
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] += cp[i] * h_start;

      if (pos.fast) {
        const bool saves = static_cast<unsigned>(t0) % kTile == 0, ends = t0 + kItems == L;
        if (saves || ends) {  // about one lane in a tile
          const long row = pos.row;
          if (saves) p.checkpoints[(row * row_tiles + t0 / kTile) * N + n] = t0 == 0 ? 0.f : h_start;
          if (ends) p.last_state[row * N + n] = lane_a * state[n] + lane_b;
        }
      } else if (marks) {
#pragma unroll 1
        for (int i = 0; i < kItems; ++i) {
          if (marks >> i & 1) {
            const int e = e0 + i;
            const long row = p.by_length.div(e);
            const int t = e - static_cast<int>(row) * L;
            if (t % kTile == 0) {  // the state entering step i, after step i - 1 (none at a row's start)
              const float4 prev = i > 0 ? scratch[i - 1] : make_float4(0.f, 0.f, 1.f, 0.f);
              p.checkpoints[(row * row_tiles + t / kTile) * N + n] = t == 0 ? 0.f : prev.z * h_start + prev.w;
            }
            if (t == L - 1) p.last_state[row * N + n] = scratch[i].z * h_start + scratch[i].w;
          }
        }
      }
      const float tile_a = __shfl_sync(kFullMask, lane_a, kWarpSize - 1);
      const float tile_b = __shfl_sync(kFullMask, lane_b, kWarpSize - 1);
      state[n] = tile_a * state[n] + tile_b;
    }
    if (p.out_float) {
      store_run(static_cast<float*>(p.out) + e0, valid, y);
    } else {
      store_run(static_cast<T*>(p.out) + e0, valid, y);
    }
  }
  cp_async_wait<0>();  // no copy may outlive the block's shared memory
}

template <typename T, int kMaxN>
__global__ void __launch_bounds__(kFwdWarpsPerBlock * kWarpSize, fwd_min_blocks<T, kMaxN>())
scan_fwd_kernel(const FwdParams p) {
  extern __shared__ uint4 staging[];
  if (p.u_vec && p.delta_vec && p.bc_vec) {
    scan_fwd_body<true, T, kMaxN>(p, staging);
  } else {
    scan_fwd_body<false, T, kMaxN>(p, staging);
  }
}

// Rows per warp: short rows are packed so tiles are nearly full, without leaving too few warps to fill the
// card. Estimated time ~ (waves of warps + 0.5 for the tail) x (tiles per warp + 1 for the exposed latency
// of a warp's first loads); R * L + kItems - 1 bounds the flat steps a warp covers. (Counting whole waves
// instead, which packs long rows into a single wave, measured slower at L = 3136: warps that each run for
// the whole kernel finish unevenly and leave SMs idle at the end.)
static int choose_rows_per_warp(int rows, int length, int resident_warps) {
  int best = 1;
  double best_cost = 0.0;
  for (int r = 1; r <= std::min(rows, kMaxRowsPerWarp); ++r) {
    const double spans = (rows + r - 1) / r;
    const double tiles = (static_cast<double>(r) * length + kItems - 1 + kTile - 1) / kTile;
    const double cost = (spans / resident_warps + 0.5) * (static_cast<long>(tiles) + 1);
    if (r == 1 || cost < best_cost * 0.999) {
      best = r;
      best_cost = cost;
    }
  }
  return best;
}

template <typename T, int kMaxN>
static cudaError_t launch_kernel(FwdParams p, cudaStream_t stream) {
  constexpr size_t smem = FwdStaging<T, kMaxN>::kBytes;
  // The shared-memory limit and resident blocks per SM depend only on the kernel and the architecture: set
  // and ask once per instantiation (a process driving GPUs of different architectures would get the first
  // one's answer).
  static const int blocks_per_sm = [] {
    int blocks = 0;
    if (cudaFuncSetAttribute(scan_fwd_kernel<T, kMaxN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
            cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, scan_fwd_kernel<T, kMaxN>,
                                                      kFwdWarpsPerBlock * kWarpSize, smem) != cudaSuccess)
      blocks = 1;
    return std::max(blocks, 1);
  }();
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int rows = p.shape.batch * p.shape.channels;
  p.rows_per_warp = choose_rows_per_warp(rows, p.shape.length, std::max(sms, 1) * blocks_per_sm * kFwdWarpsPerBlock);
  const int warps = (rows + p.rows_per_warp - 1) / p.rows_per_warp;
  const dim3 grid((warps + kFwdWarpsPerBlock - 1) / kFwdWarpsPerBlock);
  scan_fwd_kernel<T, kMaxN><<<grid, kFwdWarpsPerBlock * kWarpSize, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
static cudaError_t launch_for_type(const FwdParams& p, cudaStream_t stream) {
  if (p.shape.d_state == 1) return launch_kernel<T, 1>(p, stream);
  if (p.shape.d_state <= 4) return launch_kernel<T, 4>(p, stream);
  return launch_kernel<T, kMaxDState>(p, stream);
}

cudaError_t launch_scan_fwd(const FwdParams& params, ScalarKind kind, cudaStream_t stream) {
  FwdParams p = params;
  const ScanShape& s = p.shape;
  p.by_length = FastDiv(s.length);
  p.by_channels = FastDiv(s.channels);
  p.by_group_size = FastDiv(s.channels / s.groups);
  p.by_delta_group_size = FastDiv(s.channels / s.delta_rows);
  // Fast lanes start on the kItems grid of the flat index (and, when kItems divides L, of every row).
  p.u_vec = is_aligned16(p.u);
  p.delta_vec = s.delta_rows == s.channels && is_aligned16(p.delta);
  p.bc_vec = s.length % kItems == 0 && is_aligned16(p.B) && is_aligned16(p.C);
  switch (kind) {
    case ScalarKind::kFloat32: return launch_for_type<float>(p, stream);
    case ScalarKind::kFloat16: return launch_for_type<__half>(p, stream);
    case ScalarKind::kBFloat16: return launch_for_type<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selective_scan
