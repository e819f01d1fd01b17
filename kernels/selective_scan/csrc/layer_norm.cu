// LayerNorm over the last, contiguous axis of a (rows, C) matrix, written straight in a chosen dtype, as the
// dispatcher ops selective_scan_ln::fwd / ::bwd (the Python interface, fake kernels and autograd are
// selective_scan/layer_norm.py).
//
// Why a kernel of our own: under AMP a VMamba block has three LayerNorms feeding matmuls; PyTorch's returns
// fp32 that autocast then reads back to cast (an extra write and read per element, forward and backward),
// and its input must be (B, H, W, C) contiguous, which the channel-first maps are only as a permuted view.
// These kernels take the channels-last rows in place and round once to the output dtype. A C++ launch also
// costs the host a fraction of a Python (Triton) launch, which matters because the eager model is
// launch-bound at batch 128 on the H100.
//
// Work split: one warp per row (or per kRows rows for narrow C, so that each lane has several independent
// loads in flight); lane l holds the 4-element packs l, l + 32, ... of the row in registers, so every global
// access is a 16- or 8-byte vector and the row is read once. The backward's dw / db are summed per lane over
// the rows a warp visits, then over the block's warps in shared memory, giving one partial row per block
// that the host side adds up.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace selective_scan {
namespace layer_norm {
namespace {

constexpr int kLanes = 32;
constexpr int kWarps = 8;  // warps per block
constexpr int kPack = 4;   // elements per vector access
constexpr int kMaxPacks = 8;  // per lane: C <= 32 * 4 * 8 = 1024
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ void load_pack(const float* p, float (&v)[kPack]) {
  const float4 f = *reinterpret_cast<const float4*>(p);
  v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
}
__device__ __forceinline__ void load_pack(const __half* p, float (&v)[kPack]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
__device__ __forceinline__ void load_pack(const __nv_bfloat16* p, float (&v)[kPack]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

__device__ __forceinline__ void store_pack(float* p, const float (&v)[kPack]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_pack(__half* p, const float (&v)[kPack]) {
  const __half2 a = __floats2half2_rn(v[0], v[1]), b = __floats2half2_rn(v[2], v[3]);
  uint2 raw;
  raw.x = *reinterpret_cast<const unsigned*>(&a);
  raw.y = *reinterpret_cast<const unsigned*>(&b);
  *reinterpret_cast<uint2*>(p) = raw;
}
__device__ __forceinline__ void store_pack(__nv_bfloat16* p, const float (&v)[kPack]) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
  uint2 raw;
  raw.x = *reinterpret_cast<const unsigned*>(&a);
  raw.y = *reinterpret_cast<const unsigned*>(&b);
  *reinterpret_cast<uint2*>(p) = raw;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int bit = kLanes / 2; bit >= 1; bit /= 2) v += __shfl_xor_sync(kFullMask, v, bit);
  return v;
}

struct Params {
  const void* x;     // (rows, C)
  const float* w;    // (C,)
  const float* b;    // (C,)
  const void* dy;    // (rows, C), output dtype (backward)
  void* y;           // (rows, C), output dtype (forward) / dx in x's dtype (backward)
  float* mean;       // (rows,)
  float* rstd;       // (rows,)
  float* dwb_part;   // (blocks, 2, C) (backward)
  long rows;
  int C;
  float eps;
};

// Rows handled together by one warp: about four packs per lane in flight.
constexpr int rows_per_warp(int packs) { return packs >= 4 ? 1 : 4 / packs; }

// Column of pack j of this lane, and whether it lies inside the row.
__device__ __forceinline__ int pack_col(int j, int lane) { return (j * kLanes + lane) * kPack; }

template <typename Tin, typename Tout, int kPacks>
__global__ void __launch_bounds__(kWarps * kLanes) fwd_kernel(Params p) {
  constexpr int kRows = rows_per_warp(kPacks);
  const int lane = threadIdx.x % kLanes;
  const long row0 = (static_cast<long>(blockIdx.x) * kWarps + threadIdx.x / kLanes) * kRows;
  const Tin* x = static_cast<const Tin*>(p.x);
  float v[kRows][kPacks][kPack];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      const int col = pack_col(j, lane);
      if (row0 + r < p.rows && col < p.C) {
        load_pack(x + (row0 + r) * p.C + col, v[r][j]);
      } else {
#pragma unroll
        for (int e = 0; e < kPack; ++e) v[r][j][e] = 0.f;
      }
    }
  float mean[kRows], rstd[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPacks; ++j)
#pragma unroll
      for (int e = 0; e < kPack; ++e) s += v[r][j][e];
    mean[r] = warp_sum(s) / p.C;
  }
  // variance of the centred values (two passes over registers: no cancellation)
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPacks; ++j) {
      const bool in_row = pack_col(j, lane) < p.C;
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        v[r][j][e] = in_row ? v[r][j][e] - mean[r] : 0.f;
        s += v[r][j][e] * v[r][j][e];
      }
    }
    rstd[r] = rsqrtf(warp_sum(s) / p.C + p.eps);
  }
  Tout* y = static_cast<Tout*>(p.y);
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const int col = pack_col(j, lane);
    if (col >= p.C) continue;
    float w[kPack], b[kPack];
    load_pack(p.w + col, w);
    load_pack(p.b + col, b);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (row0 + r >= p.rows) continue;
      float out[kPack];
#pragma unroll
      for (int e = 0; e < kPack; ++e) out[e] = fmaf(v[r][j][e] * rstd[r], w[e], b[e]);
      store_pack(y + (row0 + r) * p.C + col, out);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (row0 + r < p.rows) p.mean[row0 + r] = mean[r], p.rstd[row0 + r] = rstd[r];
  }
}

// dx = rstd * (w dy - mean(w dy) - x_hat * mean(w dy x_hat)); dw = sum dy x_hat, db = sum dy over rows.
template <typename Tin, typename Tout, int kPacks>
__global__ void __launch_bounds__(kWarps * kLanes) bwd_kernel(Params p) {
  constexpr int kRows = rows_per_warp(kPacks);
  __shared__ float dwb_block[2 * kMaxPacks * kLanes * kPack];
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes;
  for (int i = threadIdx.x; i < 2 * p.C; i += blockDim.x) dwb_block[i] = 0.f;
  const Tin* x = static_cast<const Tin*>(p.x);
  const Tout* dy = static_cast<const Tout*>(p.dy);
  Tin* dx = static_cast<Tin*>(p.y);
  float w[kPacks][kPack], dw[kPacks][kPack], db[kPacks][kPack];
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const int col = pack_col(j, lane);
#pragma unroll
    for (int e = 0; e < kPack; ++e) w[j][e] = dw[j][e] = db[j][e] = 0.f;
    if (col < p.C) load_pack(p.w + col, w[j]);
  }
  const long stride = static_cast<long>(gridDim.x) * kWarps * kRows;
  for (long row0 = (static_cast<long>(blockIdx.x) * kWarps + warp) * kRows; row0 < p.rows; row0 += stride) {
    float xh[kRows][kPacks][kPack], g[kRows][kPacks][kPack], mean[kRows], rstd[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const bool row_ok = row0 + r < p.rows;
      mean[r] = row_ok ? p.mean[row0 + r] : 0.f;
      rstd[r] = row_ok ? p.rstd[row0 + r] : 0.f;
#pragma unroll
      for (int j = 0; j < kPacks; ++j) {
        const int col = pack_col(j, lane);
        if (row_ok && col < p.C) {
          load_pack(x + (row0 + r) * p.C + col, xh[r][j]);
          load_pack(dy + (row0 + r) * p.C + col, g[r][j]);
        } else {
#pragma unroll
          for (int e = 0; e < kPack; ++e) xh[r][j][e] = mean[r], g[r][j][e] = 0.f;  // x_hat 0, dy 0
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float sum_wdy = 0.f, sum_wdy_xh = 0.f;
#pragma unroll
      for (int j = 0; j < kPacks; ++j)
#pragma unroll
        for (int e = 0; e < kPack; ++e) {
          xh[r][j][e] = (xh[r][j][e] - mean[r]) * rstd[r];
          const float wdy = w[j][e] * g[r][j][e];
          sum_wdy += wdy;
          sum_wdy_xh = fmaf(wdy, xh[r][j][e], sum_wdy_xh);
          dw[j][e] = fmaf(g[r][j][e], xh[r][j][e], dw[j][e]);
          db[j][e] += g[r][j][e];
        }
      const float mean_wdy = warp_sum(sum_wdy) / p.C, mean_wdy_xh = warp_sum(sum_wdy_xh) / p.C;
      if (row0 + r >= p.rows) continue;
#pragma unroll
      for (int j = 0; j < kPacks; ++j) {
        const int col = pack_col(j, lane);
        if (col >= p.C) continue;
        float out[kPack];
#pragma unroll
        for (int e = 0; e < kPack; ++e)
          out[e] = rstd[r] * (w[j][e] * g[r][j][e] - mean_wdy - xh[r][j][e] * mean_wdy_xh);
        store_pack(dx + (row0 + r) * p.C + col, out);
      }
    }
  }
  __syncthreads();  // dwb_block zeroed
#pragma unroll
  for (int j = 0; j < kPacks; ++j) {
    const int col = pack_col(j, lane);
    if (col >= p.C) continue;
#pragma unroll
    for (int e = 0; e < kPack; ++e) {
      atomicAdd(&dwb_block[col + e], dw[j][e]);
      atomicAdd(&dwb_block[p.C + col + e], db[j][e]);
    }
  }
  __syncthreads();
  float* part = p.dwb_part + static_cast<long>(blockIdx.x) * 2 * p.C;
  for (int i = threadIdx.x; i < 2 * p.C; i += blockDim.x) part[i] = dwb_block[i];
}

// ------------------------------------------------------------------------------------------------- host

template <typename F>
void with_dtype(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "layer_norm: `", name, "` must be float32, float16 or bfloat16, got ", t);
  }
}

template <typename F>
void with_packs(int C, F&& f) {
  const int packs = (C + kLanes * kPack - 1) / (kLanes * kPack);
  if (packs <= 1) f(std::integral_constant<int, 1>{});
  else if (packs <= 2) f(std::integral_constant<int, 2>{});
  else if (packs <= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() >= 1, "layer_norm: `x` must be a contiguous CUDA tensor");
  const int64_t C = x.size(-1);
  TORCH_CHECK(C > 0 && C % kPack == 0 && C <= kMaxPacks * kLanes * kPack,
              "layer_norm: the normalised axis must have a multiple of 4 and at most 1024 elements, got ", C);
}

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                  t.size(0) == x.size(-1),
              "layer_norm: `", name, "` must be a contiguous float32 (C,) tensor on x's device");
}

// The kernels access 4-element packs (16 bytes of float32): a tensor whose storage offset breaks that
// alignment (a view into a flat buffer) is copied first.
at::Tensor aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                   const at::Tensor& bias_in, double eps, at::ScalarType out_dtype) {
  check_x(x_in);
  check_param(weight_in, "weight", x_in);
  check_param(bias_in, "bias", x_in);
  const at::Tensor x = aligned(x_in), weight = aligned(weight_in), bias = aligned(bias_in);
  const c10::cuda::CUDAGuard guard(x.device());
  const int C = static_cast<int>(x.size(-1));
  const long rows = x.numel() / C;
  auto y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, mean, rstd};
  Params p{};
  p.x = x.data_ptr();
  p.w = weight.data_ptr<float>();
  p.b = bias.data_ptr<float>();
  p.y = y.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.C = C;
  p.eps = static_cast<float>(eps);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_dtype(x.scalar_type(), "x", [&](auto tin) {
    with_dtype(out_dtype, "out_dtype", [&](auto tout) {
      with_packs(C, [&](auto packs) {
        constexpr int kPacks = decltype(packs)::value;
        const long per_block = static_cast<long>(kWarps) * rows_per_warp(kPacks);
        const unsigned blocks = static_cast<unsigned>((rows + per_block - 1) / per_block);
        fwd_kernel<decltype(tin), decltype(tout), kPacks><<<blocks, kWarps * kLanes, 0, stream>>>(p);
      });
    });
  });
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, "layer_norm: forward launch failed: ", cudaGetErrorString(status));
  return {y, mean, rstd};
}

// -> (dx in x's dtype, dw, db in float32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                   const at::Tensor& weight_in, const at::Tensor& mean,
                                                   const at::Tensor& rstd) {
  check_x(x_in);
  check_param(weight_in, "weight", x_in);
  TORCH_CHECK(dy_in.device() == x_in.device() && dy_in.is_contiguous() && dy_in.sizes() == x_in.sizes(),
              "layer_norm: `dy` must be contiguous with x's shape");
  const at::Tensor dy = aligned(dy_in), x = aligned(x_in), weight = aligned(weight_in);
  const int C = static_cast<int>(x.size(-1));
  const long rows = x.numel() / C;
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                    t->numel() == rows,
                "layer_norm: mean and rstd must be float32 with one value per row");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  if (rows == 0) return {dx, at::zeros_like(weight), at::zeros_like(weight)};
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()) == cudaSuccess,
              "layer_norm: cannot query the device");
  Params p{};
  p.x = x.data_ptr();
  p.w = weight.data_ptr<float>();
  p.dy = dy.data_ptr();
  p.y = dx.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.C = C;
  at::Tensor dwb_part;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  with_dtype(x.scalar_type(), "x", [&](auto tin) {
    with_dtype(dy.scalar_type(), "dy", [&](auto tout) {
      with_packs(C, [&](auto packs) {
        constexpr int kPacks = decltype(packs)::value;
        const long per_block = static_cast<long>(kWarps) * rows_per_warp(kPacks);
        // as many blocks as fit on the card at once, each summing dw / db over many rows
        static const int per_sm = [] {
          int n = 0;
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, bwd_kernel<decltype(tin), decltype(tout), kPacks>,
                                                        kWarps * kLanes, 0);
          return std::max(n, 1);
        }();
        const long blocks = std::min<long>((rows + per_block - 1) / per_block, static_cast<long>(per_sm) * sms);
        dwb_part = at::empty({blocks, 2, C}, x.options().dtype(at::kFloat));
        p.dwb_part = dwb_part.data_ptr<float>();
        bwd_kernel<decltype(tin), decltype(tout), kPacks><<<static_cast<unsigned>(blocks), kWarps * kLanes, 0, stream>>>(p);
      });
    });
  });
  const cudaError_t status = cudaGetLastError();
  TORCH_CHECK(status == cudaSuccess, "layer_norm: backward launch failed: ", cudaGetErrorString(status));
  const at::Tensor dwb = dwb_part.sum(0);
  return {dx, dwb[0], dwb[1]};
}

}  // namespace
}  // namespace layer_norm
}  // namespace selective_scan

TORCH_LIBRARY_IMPL(selective_scan_ln, CUDA, m) {
  m.impl("fwd", &selective_scan::layer_norm::fwd);
  m.impl("bwd", &selective_scan::layer_norm::bwd);
}
