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
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * log2(e)): one MUFU op

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
  bool u_vec, delta_vec, bc_vec;    // 16-byte loads of u, of flat delta, of B/C rows (set by the launcher)
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

inline __host__ __device__ bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

// Asynchronous 16-byte copies global -> shared (cp.async, sm_80+): a tile's inputs can be in flight for
// several tiles without holding registers. Each lane copies and later reads only its own slots, so
// cp_async_wait alone (no barrier) makes them visible to it. `kL1` keeps the line in L1 (data that other
// warps of the block read too, as B/C), else L2 only.
template <bool kL1>
__device__ __forceinline__ void cp_async16(unsigned smem_addr, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (kL1) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem) : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem) : "memory");
  }
#else
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr), "r"(static_cast<const uint4*>(gmem)->x),
               "r"(static_cast<const uint4*>(gmem)->y), "r"(static_cast<const uint4*>(gmem)->z),
               "r"(static_cast<const uint4*>(gmem)->w) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// A lane's kItems values of one tensor in a staging buffer laid out [...][vector][lane] (uint4 words), so
// that a warp's 16-byte accesses are contiguous: `slot` is the lane's first word, `slot_addr` its shared
// address.
template <bool kL1, typename T>
__device__ __forceinline__ void stage_raw(unsigned slot_addr, const T* first) {
#pragma unroll
  for (int v = 0; v < RawItems<T>::kVectors; ++v)
    cp_async16<kL1>(slot_addr + v * kWarpSize * sizeof(uint4), reinterpret_cast<const uint4*>(first) + v);
}

template <typename T>
__device__ __forceinline__ void unstage(const uint4* slot, float (&out)[kItems]) {
  RawItems<T> raw;
#pragma unroll
  for (int v = 0; v < RawItems<T>::kVectors; ++v) raw.words[v] = slot[v * kWarpSize];
  unpack_raw(raw, out);
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

// 2^x on the MUFU unit (ex2.approx: 2 ulp). Results below 2^-126 flush to zero, which is all a decay that
// small is worth.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// log1p(e) / e on [0, 1]: degree-8 fit of the relative error (max 3e-8; 1.7e-7 with fp32 Horner).
__device__ __forceinline__ float log1p_ratio(float e) {
  float p = 0.005232695490121841f;
  p = fmaf(p, e, -0.02950524352490902f);
  p = fmaf(p, e, 0.07822595536708832f);
  p = fmaf(p, e, -0.13663245737552643f);
  p = fmaf(p, e, 0.19106006622314453f);
  p = fmaf(p, e, -0.2484298199415207f);
  p = fmaf(p, e, 0.3331909775733948f);
  p = fmaf(p, e, -0.4999949336051941f);
  return fmaf(p, e, 0.9999999403953552f);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with e = exp(-|x|) returned for the derivative. dt enters
// exp(sum dt*A) over thousands of steps, so its relative error is what counts: here at most ~2e-7 plus
// |x| * 6e-8 from rounding x*log2(e) (under 1e-6 for the |x| < 10 that matter), in a third of the
// instructions of the libm pair log1pf(expf(x)). Above the threshold 20, log1p(exp(-x)) is under half an
// ulp of x, so the result is exactly x, as F.softplus(x, threshold=20) (mamba's reference) returns.
__device__ __forceinline__ float softplus(float x, float& e) {
  e = fast_exp2(-fabsf(x) * kLog2e);
  return fmaf(e, log1p_ratio(e), fmaxf(x, 0.f));
}

// d softplus / dx = sigmoid(x), from the same e = exp(-|x|); exactly 1 above the threshold (e < 2.1e-9).
__device__ __forceinline__ float softplus_slope(float x, float e) {
  return __fdividef(x >= 0.f ? 1.f : e, 1.f + e);
}

// The same slope from dt = softplus(x) alone: sigmoid(x) = 1 - exp(-dt), as a series where that difference
// would cancel (dt < 1/16: relative error under 1e-7). Lets a backward keep dt only, not dt and its slope.
__device__ __forceinline__ float softplus_slope_from_value(float dt) {
  if (dt < 0.0625f) return dt * fmaf(dt, fmaf(dt, fmaf(dt, -1.f / 24.f, 1.f / 6.f), -0.5f), 1.f);
  return 1.f - fast_exp2(-dt * kLog2e);
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

// Inclusive scan of affine maps over the lanes of a warp, in time order (lane 0 first). Lanes with no
// partner compose with the identity map (selects rather than a branch, which compiles to fewer instructions).
__device__ __forceinline__ void warp_scan_forward(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    float prev_a = __shfl_up_sync(kFullMask, a, offset);
    float prev_b = __shfl_up_sync(kFullMask, b, offset);
    const bool has_prev = lane >= offset;
    prev_a = has_prev ? prev_a : 1.f;
    prev_b = has_prev ? prev_b : 0.f;
    b = a * prev_b + b;
    a = a * prev_a;
  }
}

// Inclusive scan of affine maps in reverse time order (lane 31 first): lane j ends with the composition
// of its own map after those of lanes j+1..31.
__device__ __forceinline__ void warp_scan_reverse(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    float next_a = __shfl_down_sync(kFullMask, a, offset);
    float next_b = __shfl_down_sync(kFullMask, b, offset);
    const bool has_next = lane + offset < kWarpSize;
    next_a = has_next ? next_a : 1.f;
    next_b = has_next ? next_b : 0.f;
    b = a * next_b + b;
    a = a * next_a;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

#endif  // __CUDACC__

}  // namespace selective_scan
