// Shared definitions of the selective-scan kernels (forward in scan_fwd.cu, backward in scan_bwd.cu).
//
// Work split: a warp walks a sequence in tiles of kTile steps; each lane holds kItems consecutive steps,
// scans them sequentially, and the 32 lane results are combined with warp shuffles. The state carried
// between tiles stays in registers, so the forward pass needs no block-level barrier. The combine rule for
// h -> a*h + b maps is (a1,b1) then (a2,b2) = (a1*a2, a2*b1 + b2); every factor is a decay exp(dt*A) (or 0
// where a row restarts), so nothing overflows however long the chunk.
//
// The forward pass treats R consecutive (batch, channel) rows as one flat sequence (the rows of u, delta and
// y are contiguous), restarting the state at each row's first step (a = 0 there). Short rows (VMamba's
// L = 196 and 49) then fill whole tiles, and the flat tiles stay on the 16-byte grid whatever L is. The
// backward pass still owns one row per warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace selective_scan {

constexpr int kWarpSize = 32;
constexpr int kItems = 8;                   // consecutive steps per lane: one 16-byte load of 16-bit data
constexpr int kTile = kWarpSize * kItems;   // steps per tile; ops.py CUDA_TILE must equal this
constexpr int kMaxDState = 16;
constexpr int kMaxWarpsPerBlock = 8;
constexpr float kSoftplusThreshold = 20.f;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * log2(e)): exp2f is one MUFU op plus scaling

enum class ScalarKind { kFloat32, kFloat16, kBFloat16 };

struct ScanShape {
  int batch, channels, length, d_state;
  int delta_rows;   // delta has delta_rows rows; channel c reads row c / (channels / delta_rows)
  int groups;       // B/C groups; channel c reads group c / (channels / groups)
  int bias_len;     // 0 (no bias), channels, or delta_rows
  int num_tiles;
  bool softplus;
  bool vector_io;   // length % kItems == 0 and every base pointer 16-byte aligned (backward's row loads)
};

// n / d for 0 <= n < 2^31 with a multiply-high and a shift instead of a division (the divisor is fixed per
// launch); the magic-number scheme of PyTorch's IntDivider.
struct FastDiv {
  unsigned divisor = 1, multiplier = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(unsigned d) : divisor(d) {
    for (shift = 0; shift < 32; ++shift)
      if ((1u << shift) >= d) break;
    const uint64_t one = 1;
    multiplier = static_cast<unsigned>(((one << 32) * ((one << shift) - d)) / d + 1);
  }
#ifdef __CUDACC__
  __device__ __forceinline__ int div(int n) const {
    return static_cast<int>((__umulhi(static_cast<unsigned>(n), multiplier) + static_cast<unsigned>(n)) >> shift);
  }
#endif
};

struct FwdParams {
  ScanShape shape;
  int rows_per_warp;                // consecutive (batch, channel) rows one warp scans as one flat sequence
  FastDiv by_length, by_channels;   // flat step -> row, row -> batch
  FastDiv by_group_size, by_delta_group_size;  // channel -> B/C group, channel -> delta row
  const void *u, *delta, *B, *C;  // input dtype
  const float *A, *D, *delta_bias;  // D / delta_bias may be null
  void* out;                        // float or input dtype (out_float)
  bool out_float;
  float* last_state;                // (batch, channels, N)
  float* checkpoints;               // (batch, channels, num_tiles, N): state entering each tile
};

struct BwdParams {
  ScanShape shape;
  const void *u, *delta, *B, *C;
  const float *A, *D, *delta_bias;
  const void* dout;                 // float or input dtype (dout_float)
  bool dout_float;
  const float* dlast_state;         // may be null
  const float* checkpoints;
  void* du;                         // input dtype
  void* ddelta;                     // input dtype, (batch, channels, L); used when delta_rows == channels
  float* ddelta_per_channel;        // fp32 (batch, channels, L); used with delta groups, summed by the caller
  float *dA, *dB, *dC, *dD, *ddelta_bias;  // fp32 accumulators, zero-initialised by the caller
};

cudaError_t launch_scan_fwd(const FwdParams& params, ScalarKind kind, cudaStream_t stream);
cudaError_t launch_scan_bwd(const BwdParams& params, ScalarKind kind, int warps_per_block, cudaStream_t stream);

#ifdef __CUDACC__

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A lane's kItems steps as raw 16-byte words, so the next tile can be fetched while this one computes.
template <typename T>
struct RawItems {
  static constexpr int kVectors = kItems * sizeof(T) / 16;
  uint4 words[kVectors];
};

template <typename T>
__device__ __forceinline__ void fetch_raw(const T* row, int t0, RawItems<T>& raw) {
#pragma unroll
  for (int v = 0; v < RawItems<T>::kVectors; ++v) raw.words[v] = __ldg(reinterpret_cast<const uint4*>(row + t0) + v);
}

template <typename T>
__device__ __forceinline__ void unpack_raw(const RawItems<T>& raw, float (&out)[kItems]) {
  const T* values = reinterpret_cast<const T*>(raw.words);
#pragma unroll
  for (int i = 0; i < kItems; ++i) out[i] = to_float(values[i]);
}

// Loads steps t0..t0+kItems-1 of a row, zero past the end. With vector_io the lane's items are one
// aligned 16-byte (16-bit types) or two 16-byte (float) loads.
template <typename T>
__device__ __forceinline__ void load_items(const T* row, int t0, int length, bool vector_io, float (&out)[kItems]) {
  if (vector_io && t0 + kItems <= length) {
    RawItems<T> raw;
    fetch_raw(row, t0, raw);
    unpack_raw(raw, out);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = t0 + i < length ? to_float(row[t0 + i]) : 0.f;
  }
}

__device__ __forceinline__ bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Loads kItems consecutive values starting at `first` (all in bounds): 16-byte loads where the address
// allows (B/C rows and grouped delta rows start wherever L puts them), else one load per value.
template <typename T>
__device__ __forceinline__ void load_run(const T* first, float (&out)[kItems]) {
  if (is_aligned16(first)) {
    RawItems<T> raw;
    fetch_raw(first, 0, raw);
    unpack_raw(raw, out);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) out[i] = to_float(first[i]);
  }
}

// Double-buffered loads of a sequence along the tiles: load(t0) returns the lane's items (zero past the
// end) and, on the vector path, already has the next tile's 16-byte words in flight. t0 is a multiple of
// kItems; a lane that straddles the end takes scalar loads.
template <typename T>
struct PrefetchedRow {
  const T* row;
  int length;
  bool vector_io;
  RawItems<T> next;

  __device__ __forceinline__ PrefetchedRow(const T* row_, int length_, bool vector_io_, int first_t0)
      : row(row_), length(length_), vector_io(vector_io_) {
    if (vector_io && first_t0 + kItems <= length) fetch_raw(row, first_t0, next);
  }

  __device__ __forceinline__ void load(int t0, int next_t0, float (&out)[kItems]) {
    if (vector_io && t0 + kItems <= length) {
      unpack_raw(next, out);
    } else {
      load_items(row, t0, length, false, out);
    }
    if (vector_io && next_t0 >= 0 && next_t0 + kItems <= length) fetch_raw(row, next_t0, next);
  }
};

template <typename T>
__device__ __forceinline__ void store_items(T* row, int t0, int length, bool vector_io, const float (&in)[kItems]) {
  if (vector_io && t0 + kItems <= length) {
    constexpr int kVectors = kItems * sizeof(T) / 16;
    uint4 raw[kVectors];
    T* values = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int i = 0; i < kItems; ++i) values[i] = from_float<T>(in[i]);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) reinterpret_cast<uint4*>(row + t0)[v] = raw[v];
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (t0 + i < length) row[t0 + i] = from_float<T>(in[i]);
  }
}

// Stores the items whose bit is set in `valid` to first[0..kItems-1]; one or two 16-byte stores when all are.
template <typename T>
__device__ __forceinline__ void store_run(T* first, unsigned valid, const float (&in)[kItems]) {
  if (valid == (1u << kItems) - 1 && is_aligned16(first)) {
    constexpr int kVectors = kItems * sizeof(T) / 16;
    uint4 raw[kVectors];
    T* values = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int i = 0; i < kItems; ++i) values[i] = from_float<T>(in[i]);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) reinterpret_cast<uint4*>(first)[v] = raw[v];
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (valid >> i & 1) first[i] = from_float<T>(in[i]);
  }
}

// Accurate expf/log1pf (the build does not use fast math): dt enters exp(sum dt*A) over thousands of
// steps, so a systematic error in dt grows with L. (The decay itself is exp2f(dt * A*log2(e)): exp2f is
// accurate to 2 ulp, and rounding A*log2(e) once per row only scales A by 1 + 6e-8.)
__device__ __forceinline__ float softplus(float x) {
  return x <= kSoftplusThreshold ? log1pf(expf(x)) : x;
}

// Per-row indexing shared by both passes.
struct RowIndex {
  long row;        // b * channels + channel
  long delta_row;  // b * delta_rows + channel's delta row
  long group_row;  // b * groups + channel's group
  int bias_index;
};

__device__ __forceinline__ RowIndex row_index(const ScanShape& s, int b, int channel) {
  const int delta_row = channel / (s.channels / s.delta_rows);
  const int group = channel / (s.channels / s.groups);
  RowIndex r;
  r.row = static_cast<long>(b) * s.channels + channel;
  r.delta_row = static_cast<long>(b) * s.delta_rows + delta_row;
  r.group_row = static_cast<long>(b) * s.groups + group;
  r.bias_index = s.bias_len == s.channels ? channel : delta_row;
  return r;
}

// Inclusive scan of affine maps over the lanes of a warp, in time order (lane 0 first).
__device__ __forceinline__ void warp_scan_forward(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const float prev_a = __shfl_up_sync(kFullMask, a, offset);
    const float prev_b = __shfl_up_sync(kFullMask, b, offset);
    if (lane >= offset) {
      b = a * prev_b + b;
      a = a * prev_a;
    }
  }
}

// Inclusive scan of affine maps in reverse time order (lane 31 first): lane j ends with the composition
// of its own map after those of lanes j+1..31.
__device__ __forceinline__ void warp_scan_reverse(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const float next_a = __shfl_down_sync(kFullMask, a, offset);
    const float next_b = __shfl_down_sync(kFullMask, b, offset);
    if (lane + offset < kWarpSize) {
      b = a * next_b + b;
      a = a * next_a;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

#endif  // __CUDACC__

}  // namespace selective_scan
