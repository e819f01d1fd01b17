// Registers the fused SS2D kernels (d_state 1: ss2d_fused_*.cu, ss2d_segments.cu; 2..16: ss2d_states_*.cu) as the
// CUDA dispatcher ops
// selective_scan_ss2d::fwd / ::bwd (schemas in ops.cpp): argument checks, segment planning, allocation and
// launch. The public op (fake kernel, autograd rule, user-facing validation, PyTorch reference) is
// selective_scan/ss2d.py, the CPU kernels cpu/ss2d_cpu.cpp; these checks only keep a bad call from reaching a
// kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "scalar_kind.h"
#include "ss2d_fused.cuh"

namespace selective_scan {
namespace ss2d {
namespace {

std::string shape_string(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + ")";
}

// Numbers reach the error messages as strings (shape_string, std::to_string): with torch 2.11's CUDA 13.0 build, an
// error message that streamed an integer or an IntArrayRef crashed the process instead of raising.
void check(const at::Tensor& t, const char* name, at::ScalarType dtype, const std::vector<int64_t>& sizes,
           const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "ss2d: `", name, "` is on ", t.device(), ", `x` on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, "ss2d: `", name, "` must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().vec() == sizes, "ss2d: `", name, "` must have shape ", shape_string(sizes), ", got ",
              shape_string(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), "ss2d: `", name, "` must be contiguous");
}

struct Problem {
  Shape s;
  int kv;
  ScalarKind kind;  // x's dtype
};

// x (B, H, W, D); x_dbl (B, H, W, K * (R + 2N)) of x's dtype; dt_weight (K, D, R), dt_bias (K, D), A_log (K * D, N)
// and Ds (K * D) fp32: SS2D's parameters as stored.
Problem make_problem(const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_weight,
                     const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Ds) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous(), "ss2d: `x` must be a contiguous (B, H, W, D) CUDA tensor");
  TORCH_CHECK(dt_weight.dim() == 3 && dt_weight.size(0) == kRoutes, "ss2d: `dt_weight` must be (4, D, R)");
  TORCH_CHECK(x_dbl.dim() == 4, "ss2d: `x_dbl` must be (B, H, W, 4 * (R + 2N))");
  TORCH_CHECK(A_log.dim() == 2 && A_log.size(0) == kRoutes * x.size(3), "ss2d: `A_log` must have shape (",
              std::to_string(kRoutes * x.size(3)), ", N), got ", shape_string(A_log.sizes()));
  Problem pr{};
  pr.kind = scalar_kind(x, "ss2d", "x");
  Shape& s = pr.s;
  s.batch = static_cast<int>(x.size(0));
  s.height = static_cast<int>(x.size(1));
  s.width = static_cast<int>(x.size(2));
  s.dim = static_cast<int>(x.size(3));
  s.length = s.height * s.width;
  s.rank = static_cast<int>(dt_weight.size(2));
  s.d_state = static_cast<int>(A_log.size(1));
  TORCH_CHECK(s.d_state >= 1 && s.d_state <= kMaxDState, "ss2d: d_state is ", std::to_string(s.d_state),
              "; the fused CUDA kernels support 1 to ", std::to_string(kMaxDState));
  // d_state 1 holds a route's row in kv floats (kv_for_rank); more states hold any rank up to the same limit
  pr.kv = kv_for_rank(s.rank);
  TORCH_CHECK(pr.kv != 0, "ss2d: dt rank ", std::to_string(s.rank), " is not supported (at most ",
              std::to_string(kWidestRow - 2), ")");
  const int width = s.row_width();
  check(x_dbl, "x_dbl", x.scalar_type(), {x.size(0), x.size(1), x.size(2), kRoutes * width}, x);
  check(dt_weight, "dt_weight", at::kFloat, {kRoutes, x.size(3), s.rank}, x);
  check(dt_bias, "dt_bias", at::kFloat, {kRoutes, x.size(3)}, x);
  check(A_log, "A_log", at::kFloat, {kRoutes * x.size(3), s.d_state}, x);
  check(Ds, "Ds", at::kFloat, {kRoutes * x.size(3)}, x);
  s.groups = (s.dim + kLanes - 1) / kLanes;
  const int chunk = s.d_state == 1 ? chunk_for_kv(pr.kv) : kStatesChunk;
  s.num_chunks = (s.length + chunk - 1) / chunk;
  // positions * D and per-position offsets are 32-bit in the kernels; blocks are one grid dimension
  TORCH_CHECK(x.size(1) * x.size(2) * std::max<int64_t>(x.size(3), kRoutes * std::max(pr.kv, width)) <
                      (int64_t(1) << 31) &&
                  x.size(0) * s.groups * s.num_chunks < (int64_t(1) << 31),
              "ss2d: the map is too large for the kernel");
  return pr;
}

// The GPU's SM count and L2 size, queried once per device (the query is a driver call; this runs per op call).
struct GpuSize {
  int sm_count = 0, l2_bytes = 0;
};
GpuSize gpu_size(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, GpuSize> known;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = known.find(device);
  if (found != known.end()) return found->second;
  GpuSize size;
  TORCH_CHECK(cudaDeviceGetAttribute(&size.sm_count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&size.l2_bytes, cudaDevAttrL2CacheSize, device) == cudaSuccess,
              "ss2d: cannot query the GPU's SM count and L2 size");
  known.emplace(device, size);
  return size;
}

// The checkpoints' shape: (B, K, chunks, D) for d_state 1, (B, K, chunks, N, D) for more.
std::vector<int64_t> checkpoint_sizes(const Shape& s) {
  if (s.d_state == 1) return {s.batch, kRoutes, s.num_chunks, s.dim};
  return {s.batch, kRoutes, s.num_chunks, s.d_state, s.dim};
}

// The N > 1 kernels run unsegmented.
Shape unsegmented(const Shape& shape) {
  Shape s = shape;
  s.segment_chunks = s.num_chunks;
  s.num_segments = 1;
  return s;
}

// Segments for a kernel resident at blocks_per_sm blocks per SM that keeps live_bytes_per_element bytes per
// (position, channel) in L2 (ss2d_fused.cuh, plan_segments).
Shape segmented(const Problem& pr, int device, int blocks_per_sm, double live_bytes_per_element) {
  const GpuSize gpu = gpu_size(device);
  Shape s = pr.s;
  plan_segments(s, static_cast<long>(blocks_per_sm) * gpu.sm_count, gpu.l2_bytes, live_bytes_per_element);
  return s;
}

// The per-route inputs every kernel reads (FwdParams, BwdParams and SegmentParams name them alike).
template <typename Params>
void set_inputs(Params& p, const Shape& s, const at::Tensor& x_dbl, const at::Tensor& dt_weight,
                const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Ds) {
  p.s = s;
  p.xdbl = x_dbl.data_ptr();
  p.dt_weight = dt_weight.data_ptr<float>();
  p.dt_bias = dt_bias.data_ptr<float>();
  p.A_log = A_log.data_ptr<float>();
  p.Ds = Ds.data_ptr<float>();
}

// The state entering each segment (an undefined tensor for one segment): the forward state (reverse false,
// `in` = x) or the backward carry (reverse true, `in` = dy).
at::Tensor segment_starts(const Problem& pr, const Shape& s, bool reverse, const at::Tensor& in,
                          const at::Tensor& x_dbl, const at::Tensor& dt_weight, const at::Tensor& dt_bias,
                          const at::Tensor& A_log, const at::Tensor& Ds) {
  if (s.num_segments == 1) return at::Tensor();
  const auto f32 = in.options().dtype(at::kFloat);
  auto summary = at::empty({s.batch, kRoutes, s.num_segments, s.dim, 2}, f32);
  auto start = at::empty({s.batch, kRoutes, s.num_segments, s.dim}, f32);
  SegmentParams p{};
  set_inputs(p, s, x_dbl, dt_weight, dt_bias, A_log, Ds);
  p.in = in.data_ptr();
  p.summary = reinterpret_cast<float2*>(summary.data_ptr<float>());
  p.start = start.data_ptr<float>();
  const cudaError_t status =
      launch_ss2d_segment_starts(p, pr.kind, pr.kv, reverse, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "ss2d: segment pass launch failed: ", cudaGetErrorString(status));
  return start;
}

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_weight,
                                       const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Ds) {
  const Problem pr = make_problem(x, x_dbl, dt_weight, dt_bias, A_log, Ds);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  auto y = at::zeros(x.sizes(), f32);
  auto ckpt = at::empty(checkpoint_sizes(pr.s), f32);
  if (x.numel() == 0) return {y, ckpt};
  Shape s = unsegmented(pr.s);
  at::Tensor start;
  if (s.d_state == 1) {
    // live in L2 per element: y (fp32), x, the element's share of the x_dbl rows
    const double row_bytes = kRoutes * (s.rank + 2.0) * x.element_size();
    s = segmented(pr, x.get_device(), kFwdWarpsPerSm / kRoutes, 4.0 + x.element_size() + row_bytes / s.dim);
    start = segment_starts(pr, s, false, x, x_dbl, dt_weight, dt_bias, A_log, Ds);
  }
  FwdParams p{};
  set_inputs(p, s, x_dbl, dt_weight, dt_bias, A_log, Ds);
  p.x = x.data_ptr();
  p.start = data_or_null(start);
  p.y = y.data_ptr<float>();
  p.ckpt = ckpt.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t status =
      s.d_state == 1 ? launch_ss2d_fwd(p, pr.kind, pr.kv, stream) : launch_ss2d_states_fwd(p, pr.kind, stream);
  TORCH_CHECK(status == cudaSuccess, "ss2d: forward launch failed: ", cudaGetErrorString(status));
  return {y, ckpt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_weight,
    const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Ds, const at::Tensor& ckpt) {
  const Problem pr = make_problem(x, x_dbl, dt_weight, dt_bias, A_log, Ds);
  const Shape& s = pr.s;
  check(dy, "dy", at::kFloat, x.sizes().vec(), x);
  check(ckpt, "ckpt", at::kFloat, checkpoint_sizes(s), x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  // each route's part of dx, written once per element by the kernel and summed below
  auto du = at::empty({kRoutes, s.batch, s.height, s.width, s.dim}, x.options());
  auto dxdbl = at::zeros(x_dbl.sizes(), f32);  // fp32 atomics; returned in x_dbl's dtype
  auto ddt_weight = at::zeros({kRoutes, s.rank, s.dim}, f32);
  auto ddt_bias = at::zeros_like(dt_bias);
  auto dA_log = at::zeros_like(A_log);
  auto dDs = at::zeros_like(Ds);
  if (x.numel() > 0) {
    Shape segs = unsegmented(s);
    at::Tensor start;
    if (s.d_state == 1) {
      // live in L2 per element: dy (fp32), x, the four routes' du lines until written back, the element's share
      // of the x_dbl rows and their fp32 gradient
      const double row_bytes = kRoutes * (s.rank + 2.0) * (x.element_size() + 4.0);
      segs = segmented(pr, x.get_device(), kBwdBlocksPerSm,
                       4.0 + (1 + kRoutes) * x.element_size() + row_bytes / s.dim);
      start = segment_starts(pr, segs, true, dy, x_dbl, dt_weight, dt_bias, A_log, Ds);
    }
    BwdParams p{};
    set_inputs(p, segs, x_dbl, dt_weight, dt_bias, A_log, Ds);
    p.x = x.data_ptr();
    p.start = data_or_null(start);
    p.dy = dy.data_ptr<float>();
    p.ckpt = ckpt.data_ptr<float>();
    p.du = du.data_ptr();
    p.dxdbl = dxdbl.data_ptr<float>();
    p.ddt_weight = ddt_weight.data_ptr<float>();
    p.ddt_bias = ddt_bias.data_ptr<float>();
    p.dA_log = dA_log.data_ptr<float>();
    p.dDs = dDs.data_ptr<float>();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const cudaError_t status =
        s.d_state == 1 ? launch_ss2d_bwd(p, pr.kind, pr.kv, stream) : launch_ss2d_states_bwd(p, pr.kind, stream);
    TORCH_CHECK(status == cudaSuccess, "ss2d: backward launch failed: ", cudaGetErrorString(status));
  }
  // one pass over the four maps; for 16-bit x, at::sum adds in fp32 and rounds once
  return {du.sum(0), dxdbl.to(x_dbl.scalar_type()), ddt_weight.transpose(1, 2).contiguous(), ddt_bias,
          dA_log, dDs};
}

}  // namespace
}  // namespace ss2d
}  // namespace selective_scan

TORCH_LIBRARY_IMPL(selective_scan_ss2d, CUDA, m) {
  m.impl("fwd", &selective_scan::ss2d::fwd);
  m.impl("bwd", &selective_scan::ss2d::bwd);
}
