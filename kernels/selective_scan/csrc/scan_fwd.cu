// Forward selective scan: y = <C_t, h_t> + D u_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t.
// Reads u, delta, B, C once; writes y, the last state and, for the backward pass, the state entering every
// kTile-step tile of each row.
//
// One warp scans rows_per_warp consecutive rows as one flat sequence (see scan_common.cuh): the state is
// restarted (a = 0) at each row's first step, so a tile may hold the end of one row and the start of the
// next. Its tiles start on the kItems grid of the flat index, so u, delta and y move in 16-byte words for
// any L; items outside the warp's rows are identity maps that are neither read nor written.
#include <algorithm>

#include "scan_common.cuh"

namespace selective_scan {

constexpr int kFwdWarpsPerBlock = 8;
constexpr int kMaxRowsPerWarp = 64;

// kMaxN is a compile-time bound on d_state so the per-state arrays stay in registers.
// For N = 1 and 16-bit inputs (VMamba v2 under AMP) the register cap keeps 3 blocks (24 warps) per SM
// resident; with the next tile's u/delta prefetched, that keeps about 24 KB of DRAM loads in flight per SM
// (build knob SCAN_FWD_MIN_BLOCKS_N1, see setup.py SELECTIVE_SCAN_NVCC_FLAGS).
#ifndef SCAN_FWD_MIN_BLOCKS_N1
#define SCAN_FWD_MIN_BLOCKS_N1 3
#endif

// Where a row's data lives.
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

__device__ __forceinline__ float delta_to_dt(const ScanShape& s, float delta, float bias) {
  const float x = delta + bias;
  return s.softplus ? softplus(x) : x;
}

template <typename T, int kMaxN>
__global__ void __launch_bounds__(kFwdWarpsPerBlock * kWarpSize,
                                  kMaxN == 1 && sizeof(T) == 2 ? SCAN_FWD_MIN_BLOCKS_N1 : 2)
scan_fwd_kernel(const FwdParams p) {
  const ScanShape& s = p.shape;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = blockIdx.x * kFwdWarpsPerBlock + threadIdx.x / kWarpSize;
  const int rows = s.batch * s.channels;
  const int first_row = warp * p.rows_per_warp;
  if (first_row >= rows) return;  // whole warps leave; no block barrier follows
  const int L = s.length, N = s.d_state;
  const int end_row = min(first_row + p.rows_per_warp, rows);
  const int begin = first_row * L, end = end_row * L;  // the warp's flat steps
  const int base = begin - begin % kItems;
  const int num_tiles = (end - base + kTile - 1) / kTile;
  const int row_tiles = (L + kTile - 1) / kTile;  // checkpoints per row, for the backward pass
  const bool flat_delta = s.delta_rows == s.channels;  // else delta rows are shared and read per row

  const T* B = static_cast<const T*>(p.B);
  const T* C = static_cast<const T*>(p.C);
  const T* delta = static_cast<const T*>(p.delta);
  PrefetchedRow<T> u_loader(static_cast<const T*>(p.u), end, is_aligned16(p.u), base + lane * kItems);
  PrefetchedRow<T> delta_loader(delta, flat_delta ? end : 0, flat_delta && is_aligned16(p.delta),
                                base + lane * kItems);

  float state[kMaxN];
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) state[n] = 0.f;
  // Parameters of the row of the lane's first item, reloaded only when that row changes (for long rows,
  // once per warp).
  int cached_row = -1;
  RowInfo info{};
  float A2[kMaxN], D = 0.f, bias = 0.f;  // A2 = A * log2(e)
#pragma unroll
  for (int n = 0; n < kMaxN; ++n) A2[n] = 0.f;

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int e0 = base + tile * kTile + lane * kItems;  // flat index of the lane's first item
    const int next_e0 = tile + 1 < num_tiles ? e0 + kTile : -1;
    float u[kItems], dt[kItems], dtu[kItems], y[kItems];
    u_loader.load(e0, next_e0, u);
    delta_loader.load(e0, next_e0, dt);
    const int row0 = p.by_length.div(e0);
    const int t0 = e0 - row0 * L;
    // The common case: all the lane's items are steps of one of the warp's rows. Otherwise (the lane
    // straddles a row end or the warp's edge) each item finds its own row.
    const bool one_row = e0 >= begin && e0 + kItems <= end && t0 + kItems <= L;
    if (one_row && row0 != cached_row) {
      cached_row = row0;
      info = row_info(p, row0);
#pragma unroll
      for (int n = 0; n < kMaxN; ++n) A2[n] = n < N ? p.A[info.channel * N + n] * kLog2e : 0.f;
      D = p.D ? p.D[info.channel] : 0.f;
      bias = s.bias_len ? p.delta_bias[info.bias_index] : 0.f;
    }

    // Bit i of: valid (item i is one of the warp's steps), starts (t = 0), ends (t = L-1), saves (t is the
    // first step of a backward tile).
    unsigned valid = 0, starts = 0, ends = 0, saves = 0;
    if (one_row) {
      valid = (1u << kItems) - 1;
      if (!flat_delta) load_run(delta + info.delta_offset + t0, dt);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int t = t0 + i;
        starts |= unsigned(t == 0) << i;
        ends |= unsigned(t == L - 1) << i;
        saves |= unsigned(t % kTile == 0) << i;
        dt[i] = delta_to_dt(s, dt[i], bias);
        y[i] = D * u[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int e = e0 + i;
        if (e >= begin && e < end) {
          const int row = p.by_length.div(e);
          const int t = e - row * L;
          const RowInfo r = row_info(p, row);
          valid |= 1u << i;
          starts |= unsigned(t == 0) << i;
          ends |= unsigned(t == L - 1) << i;
          saves |= unsigned(t % kTile == 0) << i;
          const float x = flat_delta ? dt[i] : to_float(delta[r.delta_offset + t]);
          dt[i] = delta_to_dt(s, x, s.bias_len ? p.delta_bias[r.bias_index] : 0.f);
          y[i] = (p.D ? p.D[r.channel] : 0.f) * u[i];
        } else {
          dt[i] = 0.f;  // the identity map: the carried state passes through unchanged
          u[i] = 0.f;
          y[i] = 0.f;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) dtu[i] = dt[i] * u[i];

#pragma unroll
    for (int n = 0; n < kMaxN; ++n) {
      if (n >= N) break;
      // The lane's maps h -> a*h + b (a = 0 where a row starts). For N = 1, dt and dt*u die here, which is
      // what lets the kernel fit the register cap without spilling.
      float a[kItems], b[kItems], Bv[kItems], Cv[kItems];
      if (one_row) {
        load_run(B + info.bc_offset + n * L + t0, Bv);
        load_run(C + info.bc_offset + n * L + t0, Cv);
#pragma unroll
        for (int i = 0; i < kItems; ++i) a[i] = exp2f(dt[i] * A2[n]);
      } else {
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          a[i] = 1.f;
          Bv[i] = Cv[i] = 0.f;
          if (valid >> i & 1) {
            const int e = e0 + i;
            const int row = p.by_length.div(e);
            const RowInfo r = row_info(p, row);
            const int offset = r.bc_offset + n * L + (e - row * L);
            Bv[i] = to_float(B[offset]);
            Cv[i] = to_float(C[offset]);
            a[i] = exp2f(dt[i] * (p.A[r.channel * N + n] * kLog2e));
          }
        }
      }
      float lane_a = 1.f, lane_b = 0.f;
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (starts >> i & 1) a[i] = 0.f;
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
        const float h_before = h;
        h = a[i] * h + b[i];
        y[i] += Cv[i] * h;
        if ((saves | ends) >> i & 1) {  // a few items per row: find the row again rather than keep it
          const int e = e0 + i;
          const long row = p.by_length.div(e);
          const int t = e - static_cast<int>(row) * L;
          if (saves >> i & 1) p.checkpoints[(row * row_tiles + t / kTile) * N + n] = t == 0 ? 0.f : h_before;
          if (ends >> i & 1) p.last_state[row * N + n] = h;
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
}

// Rows per warp: short rows are packed so tiles are nearly full, without leaving too few warps to fill the
// card. Estimated time ~ (waves of warps + 0.5 for the tail) x (tiles per warp + 1 for the exposed latency
// of a warp's first loads); R * L + kItems - 1 bounds the flat steps a warp covers.
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
  // Resident blocks per SM depend only on the kernel and the architecture: ask once per instantiation
  // (a process driving GPUs of different architectures would get the first one's answer).
  static const int blocks_per_sm = [] {
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, scan_fwd_kernel<T, kMaxN>,
                                                      kFwdWarpsPerBlock * kWarpSize, 0) != cudaSuccess)
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
  scan_fwd_kernel<T, kMaxN><<<grid, kFwdWarpsPerBlock * kWarpSize, 0, stream>>>(p);
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
  switch (kind) {
    case ScalarKind::kFloat32: return launch_for_type<float>(p, stream);
    case ScalarKind::kFloat16: return launch_for_type<__half>(p, stream);
    case ScalarKind::kBFloat16: return launch_for_type<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selective_scan
