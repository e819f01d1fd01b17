// Fused SS2D core for VMamba's v2 blocks (cross2d routes, d_state N = 1; N = 2..16 in ss2d_states.cuh): the four
// routes' selective scans
// read the channels-last activation x (B, H, W, D) in place through their index maps, compute
// dt = softplus(W_dt x_dbl + bias) per step, and add their outputs into one fp32 (B, H, W, D) map. Nothing of
// size (B, 4, D, L) is materialised. The x_proj GEMM and its backward stay in PyTorch: a route permutation
// commutes with a position-wise linear map, so x_dbl = x W_proj^T is one GEMM on the natural position order,
// with SS2D's own weight (x_proj_weight viewed as (4 (R + 2), D)) and x's dtype: x_dbl (B, H, W, 4, R + 2),
// route k's row [dt-rank values..., B, C].
//
// Work split: one warp owns one segment of one sequence (batch b, 32 consecutive channels, route k, a run of
// consecutive steps) and walks it from start to end; lane = channel, so every load of x / dy, every atomic add
// into y and every store of the backward's per-route dx is one coalesced row piece, and the per-position x_dbl
// values are warp-uniform. The warp moves a chunk of kChunk steps at a time: first all of the chunk's loads (x
// per lane, the x_dbl rows into shared memory), then its arithmetic, in which only h is sequential; so it waits
// for memory once per chunk, not once per step (the backward issues a chunk's x and dy loads during the chunk
// before, and waits less). The four routes of a (batch, channel group, segment) are the four warps of one block
// (BlockLayout), except in the forward of long unsegmented routes, where a block's eight warps share one route
// (ss2d_fused_fwd.cu).
//
// Segments: where one block per (batch, channel group) would leave most of the GPU idle (small batches,
// detection-size maps: batch 2 at 1333x800 is 12 blocks at stage 1), each route is cut into segments that run
// in parallel. A segment's entering state comes from two passes before the main kernel (ss2d_segments.cu):
// each segment's summary (its total dt, whose exponential is its decay, and the state it ends in when entered
// with zero; about the main kernel's arithmetic), then a short walk over the summaries. The blocks go sample by
// sample, and there are enough segments that the samples in flight keep their maps in L2: the forward's four adds
// into y a position gets (one per route) are L2 rather than DRAM read-modify-writes, and the backward's four
// reads of x and dy mostly hit L2. Full batches run unsegmented: segmenting was measured slower there, the summary
// pass doubling the arithmetic that then limits. Their forward gets the same L2 locality from splitting each
// route over a block's warps instead (splitting the backward was measured slower, docs/kernels.md).
//
// The forward saves the state entering every chunk; the backward walks its segment's chunks from the last,
// recomputes each from its checkpoint (values held in registers) and walks it in reverse.
// No on-chip buffer scales with the map, so any H x W works (detection-size maps included).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <type_traits>
#include <utility>

#include "scan_common.cuh"  // ScalarKind, kFullMask, kLog2e, fast_exp2, softplus

namespace selective_scan {
namespace ss2d {

constexpr int kRoutes = 4;
constexpr int kLanes = kWarpSize;

// On chip, a route's x_dbl row is kept as [B, C, dt-rank values..., zero padding] in kV floats, kV a multiple
// of 4 so that a row is whole 16-byte words; kV is the narrowest of kRowWidths that holds R + 2 values (68:
// VMamba-B's stage 4, R = 64). The kernels are compiled for each width (dispatch_dtype_kv).
constexpr int kRowWidths[] = {8, 16, 32, 64, 68};
constexpr int kWidestRow = kRowWidths[std::size(kRowWidths) - 1];
constexpr int kv_for_rank(int rank) {
  for (const int kv : kRowWidths)
    if (rank + 2 <= kv) return kv;
  return 0;
}
// Steps between saved states (and per load batch); the backward holds 4 values per step of a chunk in
// registers, so wide x_dbl rows (more registers for W_dt's gradient) get shorter chunks. ss2d.py
// checkpoint_chunk mirrors this rule.
constexpr int chunk_for_kv(int kv) { return kv <= 8 ? 16 : kv <= 32 ? 8 : 4; }

// Resident warps per SM the forward is compiled for, and blocks per SM for the backward (their register caps).
constexpr int kFwdWarpsPerSm = 16;
constexpr int kBwdBlocksPerSm = 3;
// The forward splits an unsegmented route of at least kMinTiledChunks chunks over the kTileWarps warps of a
// block (ss2d_fused_fwd.cu).
constexpr int kTileWarps = 8;
constexpr int kMinTiledChunks = 64;
// Shortest segment, in chunks: the summary pass and the walk over summaries cost a few steps per segment.
constexpr int kMinSegmentChunks = 4;
// N > 1 (ss2d_states.cuh): steps per load batch and per group of states the backward keeps in shared memory, and
// steps between saved states (four groups; ss2d.py STATES_CHUNK mirrors it).
constexpr int kStatesStep = 8;
constexpr int kStatesChunk = 4 * kStatesStep;

struct Shape {
  int batch, height, width, length, dim;  // length L = H * W, dim = D channels
  int rank;                               // R, dt rank (<= kV - 2 for N = 1); x_dbl rows are R + 2N values
  int groups;                             // ceil(D / 32) channel groups
  int num_chunks;                         // ceil(L / chunk)
  int segment_chunks, num_segments;       // chunks per segment (the last may be shorter), ceil(chunks / that)
  int d_state;                            // N

  // values in a route's x_dbl row: R dt-rank values, B (N), C (N)
  constexpr int row_width() const { return rank + 2 * d_state; }
};

// Cuts each route into segments (sets segment_chunks, num_segments). A grid of one block per (batch, channel
// group) that fills at least half of the resident_blocks slots runs unsegmented: the summary pass costs about
// as much arithmetic as the main kernel, which is what limits both (measured in docs/kernels.md). A smaller one
// (small batches, detection-size maps) gets enough segments to cover the resident blocks twice and to keep the
// samples in flight (blocks go sample by sample) within half the L2 cache, with bytes_per_element bytes per
// (position, channel) live there; no segment is shorter than kMinSegmentChunks chunks.
inline void plan_segments(Shape& s, long resident_blocks, long l2_bytes, double bytes_per_element) {
  const double unsegmented_blocks = static_cast<double>(s.batch) * s.groups;
  long wanted = 1;
  if (2 * unsegmented_blocks < resident_blocks) {
    const double for_fill = 2.0 * resident_blocks / unsegmented_blocks;
    const double sample_bytes = static_cast<double>(s.length) * s.dim * bytes_per_element;
    const double for_cache = resident_blocks * sample_bytes / (s.groups * (l2_bytes / 2.0));
    wanted = static_cast<long>(std::ceil(std::max(for_fill, for_cache)));
  }
  const long per_segment = (s.num_chunks + wanted - 1) / wanted;
  s.segment_chunks = static_cast<int>(std::max<long>(std::min<long>(kMinSegmentChunks, s.num_chunks), per_segment));
  s.num_segments = (s.num_chunks + s.segment_chunks - 1) / s.segment_chunks;
}

struct FwdParams {
  Shape s;
  const void* x;           // (B, L, D), input dtype
  const void* xdbl;        // (B, L, K, R + 2N), x's dtype
  const float* dt_weight;  // (K, D, R)
  const float* dt_bias;    // (K, D)
  const float* A_log;      // (K D, N); A = -exp(A_log)
  const float* Ds;         // (K, D)
  const float* start;      // (B, K, num_segments, D): state entering each segment; null for one segment
  float* y;                // (B, L, D), zero-initialised, accumulated with atomics
  float* ckpt;             // (B, K, num_chunks, D) (N > 1: (B, K, num_chunks, N, D)): state entering each chunk
};

struct BwdParams {
  Shape s;
  const float* dy;         // (B, L, D)
  const void* x;
  const void* xdbl;
  const float* dt_weight;
  const float* dt_bias;
  const float* A_log;
  const float* Ds;
  const float* ckpt;
  const float* start;      // (B, K, num_segments, D): gradient carry entering each segment from its end
  void* du;                // (K, B, L, D) in x's dtype: each route's part of dx, every element written once
  float* dxdbl;            // (B, L, K, R + 2N), zero-initialised
  float* ddt_weight;       // (K, R, D), zero-initialised (lane-contiguous; transposed by the caller)
  float* ddt_bias;         // (K, D), zero-initialised
  float* dA_log;           // (K D, N), zero-initialised
  float* dDs;              // (K, D), zero-initialised
};

// The passes that give every segment its entering state (ss2d_segments.cu).
struct SegmentParams {
  Shape s;
  const void* in;          // x (forward; x's dtype) or dy (backward; fp32), (B, L, D)
  const void* xdbl;        // x's dtype
  const float* dt_weight;
  const float* dt_bias;
  const float* A_log;
  const float* Ds;
  float2* summary;         // (B, K, num_segments, D): (total dt, end state entered with zero)
  float* start;            // (B, K, num_segments, D)
};

cudaError_t launch_ss2d_fwd(const FwdParams& p, ScalarKind dtype, int kv, cudaStream_t stream);
cudaError_t launch_ss2d_bwd(const BwdParams& p, ScalarKind dtype, int kv, cudaStream_t stream);
// Fills p.start: the forward state (reverse false, p.in = x) or the backward carry (reverse true, p.in = dy,
// fp32) entering each segment; `dtype` is x's (and x_dbl's).
cudaError_t launch_ss2d_segment_starts(const SegmentParams& p, ScalarKind dtype, int kv, bool reverse,
                                       cudaStream_t stream);
// N = 2..16 (p.s.d_state; ss2d_states_*.cu), unsegmented
cudaError_t launch_ss2d_states_fwd(const FwdParams& p, ScalarKind dtype, cudaStream_t stream);
cudaError_t launch_ss2d_states_bwd(const BwdParams& p, ScalarKind dtype, cudaStream_t stream);

// The sets of four routes, one per (batch, segment, channel group) (BlockLayout counts its blocks from them).
inline unsigned num_route_sets(const Shape& s) {
  return static_cast<unsigned>(static_cast<long>(s.batch) * s.num_segments * s.groups);
}

#ifdef __CUDACC__

template <typename T> __device__ __forceinline__ float load_float(const T* p);
template <> __device__ __forceinline__ float load_float<float>(const float* p) { return __ldg(p); }
template <> __device__ __forceinline__ float load_float<__half>(const __half* p) { return __half2float(__ldg(p)); }
template <> __device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

// The warp's sequence segment and the thread's place in it.
struct Task {
  int b, k, group, segment, lane, d;
  bool active;    // d < D
  int d_ld;       // d, clamped into range: inactive lanes load (and add zeros) there
  float on;       // 1 for active lanes, 0 for inactive ones (multiplies what they add)

  // Route k of the sequence segment (batch, segment, channel group) numbered `sequence`. Each channel takes
  // channel_lanes consecutive lanes (the N > 1 backward splits a channel's states over a lane pair), so a group is
  // kLanes / channel_lanes channels and s.groups counts such groups.
  __device__ __forceinline__ Task(const Shape& s, int route, int sequence, int channel_lanes = 1) {
    lane = threadIdx.x % kLanes;
    k = route;
    group = sequence % s.groups;
    const int sample_block = sequence / s.groups;
    segment = sample_block % s.num_segments;
    b = sample_block / s.num_segments;
    d = (group * kLanes + lane) / channel_lanes;
    active = d < s.dim;
    d_ld = active ? d : s.dim - 1;
    on = active ? 1.f : 0.f;
  }
  // (b, d) offset into a (B, L, D) map (d clamped: inactive lanes read in range)
  __device__ __forceinline__ long map_offset(const Shape& s) const {
    return static_cast<long>(b) * s.length * s.dim + d_ld;
  }
  // (b, k) offset into the (B, L, K, width) x_dbl rows (and their gradient); width is s.row_width(), which the
  // d_state-1 kernels pass as the constant-folded R + 2
  __device__ __forceinline__ long rows_offset(const Shape& s, int width) const {
    return static_cast<long>(b) * s.length * kRoutes * width + k * width;
  }
  // (k, d) index of the route's per-channel parameters (dt_bias, Ds; rows of dt_weight and A_log), d clamped
  __device__ __forceinline__ long route_channel(const Shape& s) const { return static_cast<long>(k) * s.dim + d_ld; }
  // (b, k, index, d) offset into a (B, K, count, D) array
  __device__ __forceinline__ long bkd(const Shape& s, int index, int count) const {
    return ((static_cast<long>(b) * kRoutes + k) * count + index) * s.dim + d;
  }
  // chunks [first_chunk, end_chunk) of the segment
  __device__ __forceinline__ int first_chunk(const Shape& s) const { return segment * s.segment_chunks; }
  __device__ __forceinline__ int end_chunk(const Shape& s) const {
    return min(first_chunk(s) + s.segment_chunks, s.num_chunks);
  }
  // Walks the segment's chunks, from the first or (kReverse) from the last, calling visit(full, c, t0, n) for
  // chunk c = steps [t0, t0 + n); `full` is std::true_type when n == kChunk, so full chunks compile without
  // bound checks.
  template <int kChunk, bool kReverse, typename Visit>
  __device__ __forceinline__ void for_each_chunk(const Shape& s, Visit&& visit) const {
    const int c0 = first_chunk(s), c1 = end_chunk(s);
    for (int j = 0; j < c1 - c0; ++j) {
      const int c = kReverse ? c1 - 1 - j : c0 + j;
      const int t0 = c * kChunk, n = min(kChunk, s.length - t0);
      if (n == kChunk) {
        visit(std::true_type{}, c, t0, n);
      } else {
        visit(std::false_type{}, c, t0, n);
      }
    }
  }
  // the state entering the segment from `start` (zero without one)
  __device__ __forceinline__ float segment_start(const Shape& s, const float* start) const {
    return start != nullptr && active ? start[bkd(s, segment, s.num_segments)] : 0.f;
  }
};

// How the main kernels lay out their blocks: kWarps warps per route segment, which walk it a tile of kWarps
// consecutive chunks at a time. With one warp per route, a block holds the four routes of one (batch, segment,
// channel group), as the segment passes; with more, a block holds one route. Blocks go route fastest, then channel
// group, segment and batch, so the blocks in flight cover few samples.
template <int kWarps>
struct BlockLayout {
  static constexpr int kBlockRoutes = kWarps == 1 ? kRoutes : 1;
  static constexpr int kThreads = kLanes * kWarps * kBlockRoutes;
  static constexpr int kBlocksPerRouteSet = kRoutes / kBlockRoutes;
  static unsigned blocks(const Shape& s) { return num_route_sets(s) * kBlocksPerRouteSet; }
  // the warp's place among its route's warps
  static __device__ __forceinline__ int route_warp() { return threadIdx.x / kLanes % kWarps; }
  static __device__ __forceinline__ Task task(const Shape& s) {
    const int route = blockIdx.x % kBlocksPerRouteSet * kBlockRoutes + threadIdx.x / kLanes / kWarps;
    return Task(s, route, blockIdx.x / kBlocksPerRouteSet);
  }
};
// The backward and the segment passes: the four routes of a (batch, segment, channel group) in one block.
using RouteWarps = BlockLayout<1>;

// Raster position (h * W + w) of step t of route k: column-major if k is odd, reversed if k >= 2 (cross2d).
__device__ __forceinline__ int route_position(const Shape& s, int k, int t) {
  const int u = k >= 2 ? s.length - 1 - t : t;  // index in row-major or column-major order
  if (k & 1) {
    const int col = u / s.height;
    return (u - col * s.height) * s.width + col;
  }
  return u;
}

// The position of step t0 + lane of the warp's route, for the chunk of steps t0 .. t0 + n - 1 (lanes past n: the
// last step's): lane i finds step i's position once per chunk, and the kernels take step i's from lane i by a
// shuffle (for the row loads and for every per-step load and add).
__device__ __forceinline__ int chunk_position(const Shape& s, const Task& task, int t0, int n) {
  return route_position(s, task.k, t0 + min(task.lane, n - 1));
}

// Per-(route, channel) constants; zeros for inactive lanes.
template <int kR>
struct RouteParams {
  float w[kR];  // W_dt[k, d, :], zero-padded past R
  float bias, A, A2, Dk;  // A = -exp(A_log); A2 = A * log2(e), the decay is exp2(dt * A2)

  // From any kernel's params (FwdParams, BwdParams, SegmentParams name the parameters alike).
  template <typename Params>
  __device__ __forceinline__ RouteParams(const Params& p, const Task& task) {
    const Shape& s = p.s;
    const long kd = task.route_channel(s);
#pragma unroll
    for (int j = 0; j < kR; ++j) w[j] = task.active && j < s.rank ? p.dt_weight[kd * s.rank + j] : 0.f;
    bias = task.active ? p.dt_bias[kd] : 0.f;
    A = task.active ? -expf(p.A_log[kd]) : 0.f;
    A2 = A * kLog2e;
    Dk = task.active ? p.Ds[kd] : 0.f;
  }
};


// Per-warp shared-memory copy of a chunk's x_dbl rows in the on-chip order: the rows are warp-uniform, so
// they are fetched once per chunk (the lanes spread over the chunk's row values, all loads in flight together)
// and read back as shared-memory broadcasts of whole 16-byte words, instead of one dependent global load per
// step.
template <int kV, int kChunk = chunk_for_kv(kV)>
struct RowStage {
  alignas(16) float vals[kChunk * kV];

  // Rows of a chunk's n steps of route k, from x_dbl (B, L, K, R + 2) of type T; my_pos: chunk_position(), each
  // load takes its row's position from the lane that holds it.
  template <typename T>
  __device__ __forceinline__ void load(const Shape& s, const Task& task, const void* xdbl, int my_pos, int n) {
    const int width = s.rank + 2;
    const T* rows = static_cast<const T*>(xdbl) + task.rows_offset(s, width);
    __syncwarp();  // every lane is done with the previous chunk's rows
#pragma unroll
    for (int q0 = 0; q0 < kChunk * kV; q0 += kLanes) {
      const int q = q0 + task.lane, i = q / kV, j = q % kV;  // value j of row i; j indexes [dt..., B, C]
      const int slot = j < s.rank ? 2 + j : j < width ? j - s.rank : j;  // its on-chip index; padding stays put
      const int pos = __shfl_sync(kFullMask, my_pos, i);
      if (i < n)
        vals[i * kV + slot] = j < width ? load_float(rows + static_cast<long>(pos) * kRoutes * width + j) : 0.f;
    }
    __syncwarp();
  }
  // 16-byte word q of step i's row: word 0 is [B, C, first two dt-rank values]
  __device__ __forceinline__ float4 word(int i, int q) const {
    return reinterpret_cast<const float4*>(vals)[i * (kV / 4) + q];
  }
};

// Calls f(j, value) for each dt-rank value x_dbl[2 + j] (j < kV - 2, zero past R) of step i's row, reading the
// row a word at a time (wide rows are never held in registers whole).
template <int kV, typename F>
__device__ __forceinline__ void for_each_rank_value(const RowStage<kV>& stage, int i, F&& f) {
#pragma unroll
  for (int q = 0; q < kV / 4; ++q) {
    const float4 word = stage.word(i, q);
    const float values[4] = {word.x, word.y, word.z, word.w};
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (4 * q + e >= 2) f(4 * q + e - 2, values[e]);
  }
}

// dt pre-activation z = bias + W_dt . x_dbl[2:] of step i
template <int kV>
__device__ __forceinline__ float dt_preact(const RouteParams<kV - 2>& rp, const RowStage<kV>& stage, int i) {
  float z = rp.bias;
  for_each_rank_value(stage, i, [&](int j, float v) { z = fmaf(rp.w[j], v, z); });
  return z;
}

// launch(element tag, std::integral_constant<int, kV>) for x's dtype and the x_dbl row width kv (one of
// kRowWidths): the one place that maps the runtime choices onto the compiled kernel instances.
template <typename Launch, typename Tag, size_t... I>
cudaError_t dispatch_kv(int kv, Tag tag, Launch& launch, std::index_sequence<I...>) {
  cudaError_t status = cudaErrorInvalidValue;
  ((kv == kRowWidths[I] && ((status = launch(tag, std::integral_constant<int, kRowWidths[I]>{})), true)) || ...);
  return status;
}

template <typename Launch>
cudaError_t dispatch_dtype_kv(ScalarKind dtype, int kv, Launch&& launch) {
  constexpr auto widths = std::make_index_sequence<std::size(kRowWidths)>{};
  switch (dtype) {
    case ScalarKind::kFloat32: return dispatch_kv(kv, float{}, launch, widths);
    case ScalarKind::kFloat16: return dispatch_kv(kv, __half{}, launch, widths);
    case ScalarKind::kBFloat16: return dispatch_kv(kv, __nv_bfloat16{}, launch, widths);
  }
  return cudaErrorInvalidValue;
}

#endif  // __CUDACC__

}  // namespace ss2d
}  // namespace selective_scan
