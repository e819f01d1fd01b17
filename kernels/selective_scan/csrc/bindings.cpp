// The CUDA kernels of the dispatcher ops selective_scan::fwd / ::bwd (schemas in ops.cpp): argument checks,
// allocation and launch. The Python layer (selective_scan/ops.py) validates shapes with user-facing messages
// first; the checks here only keep a bad call from reaching a kernel. Only c10 CUDA headers are included (not
// ATen/cuda), so a toolkit without the cuBLAS/cuSPARSE headers still builds it.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "scalar_kind.h"
#include "scan_common.cuh"

namespace selective_scan {
namespace {

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dims, const at::Tensor& u) {
  TORCH_CHECK(t.is_cuda(), "selective_scan: `", name, "` must be a CUDA tensor");
  TORCH_CHECK(t.device() == u.device(), "selective_scan: `", name, "` is on ", t.device(), ", `u` on ", u.device());
  TORCH_CHECK(t.scalar_type() == dtype, "selective_scan: `", name, "` must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, "selective_scan: `", name, "` must have ", dims, " dimensions");
  TORCH_CHECK(t.is_contiguous(), "selective_scan: `", name, "` must be contiguous");
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

ScanShape make_shape(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& delta_bias, bool softplus) {
  check_input(delta, "delta", u.scalar_type(), 3, u);
  check_input(A, "A", at::kFloat, 2, u);
  check_input(B, "B", u.scalar_type(), 4, u);
  check_input(C, "C", u.scalar_type(), 4, u);
  ScanShape s{};
  s.batch = u.size(0);
  s.channels = u.size(1);
  s.length = u.size(2);
  s.d_state = A.size(1);
  s.delta_rows = delta.size(1);
  s.groups = B.size(1);
  TORCH_CHECK(s.d_state >= 1 && s.d_state <= kMaxDState, "selective_scan: `A` has N = ", std::to_string(s.d_state),
              "; the CUDA kernel supports 1..", std::to_string(kMaxDState));
  TORCH_CHECK(A.size(0) == s.channels, "selective_scan: `A` must have K*D rows");
  TORCH_CHECK(delta.size(0) == s.batch && delta.size(2) == s.length && s.delta_rows > 0 &&
                  s.channels % s.delta_rows == 0, "selective_scan: bad `delta` shape");
  TORCH_CHECK(B.sizes() == C.sizes() && B.size(0) == s.batch && B.size(2) == s.d_state && B.size(3) == s.length &&
                  s.groups > 0 && s.channels % s.groups == 0, "selective_scan: bad `B`/`C` shape");
  TORCH_CHECK(s.batch <= 65535, "selective_scan: batch above 65535 is not supported by the CUDA kernel");
  TORCH_CHECK(u.numel() < (int64_t(1) << 31) && B.numel() < (int64_t(1) << 31),
              "selective_scan: tensors above 2^31 elements are not supported by the CUDA kernel");
  if (D) check_input(*D, "D", at::kFloat, 1, u);
  s.bias_len = 0;
  if (delta_bias) {
    check_input(*delta_bias, "delta_bias", at::kFloat, 1, u);
    s.bias_len = delta_bias->size(0);
    TORCH_CHECK(s.bias_len == s.channels || s.bias_len == s.delta_rows, "selective_scan: bad `delta_bias` length");
  }
  s.num_tiles = (s.length + kTile - 1) / kTile;
  s.softplus = softplus;
  s.vector_io = s.length % kItems == 0 && aligned16(u.data_ptr()) && aligned16(delta.data_ptr()) &&
                aligned16(B.data_ptr()) && aligned16(C.data_ptr());
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                   const at::Tensor& B, const at::Tensor& C,
                                                   const std::optional<at::Tensor>& D,
                                                   const std::optional<at::Tensor>& delta_bias, bool softplus,
                                                   bool out_float) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3 && u.is_contiguous(), "selective_scan: `u` must be a contiguous 3-D CUDA tensor");
  const ScalarKind kind = scalar_kind(u, "selective_scan", "u");
  const c10::cuda::CUDAGuard guard(u.device());
  ScanShape s = make_shape(u, delta, A, B, C, D, delta_bias, softplus);
  auto out = at::empty(u.sizes(), u.options().dtype(out_float ? at::kFloat : u.scalar_type()));
  auto last_state = at::empty({s.batch, s.channels, s.d_state}, u.options().dtype(at::kFloat));
  auto checkpoints = at::empty({s.batch, s.channels, s.num_tiles, s.d_state}, u.options().dtype(at::kFloat));
  if (u.numel() == 0) {
    last_state.zero_();
    return {out, last_state, checkpoints};
  }
  FwdParams p{};
  p.shape = s;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = D ? D->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias ? delta_bias->data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_float = out_float;
  p.last_state = last_state.data_ptr<float>();
  p.checkpoints = checkpoints.data_ptr<float>();
  const cudaError_t status = launch_scan_fwd(p, kind, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "selective_scan: forward kernel launch failed: ", cudaGetErrorString(status));
  return {out, last_state, checkpoints};
}

// Largest block (in warps) whose channels all share one B/C group, so dB/dC can be summed in the block.
int warps_per_block(int channels_per_group) {
  for (int warps = kMaxWarpsPerBlock; warps > 1; warps /= 2)
    if (channels_per_group % warps == 0) return warps;
  return 1;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads bwd(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_state, const at::Tensor& u,
          const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
          const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& delta_bias,
          const at::Tensor& checkpoints, bool softplus) {
  TORCH_CHECK(u.is_cuda() && u.dim() == 3 && u.is_contiguous(), "selective_scan: `u` must be a contiguous 3-D CUDA tensor");
  const ScalarKind kind = scalar_kind(u, "selective_scan", "u");
  const c10::cuda::CUDAGuard guard(u.device());
  ScanShape s = make_shape(u, delta, A, B, C, D, delta_bias, softplus);
  TORCH_CHECK(dout.is_cuda() && dout.sizes() == u.sizes() && dout.is_contiguous() &&
                  (dout.scalar_type() == at::kFloat || dout.scalar_type() == u.scalar_type()),
              "selective_scan: the output gradient must be a contiguous tensor shaped like `u`, float32 or u's dtype");
  TORCH_CHECK(checkpoints.is_cuda() && checkpoints.scalar_type() == at::kFloat && checkpoints.is_contiguous() &&
                  checkpoints.numel() == int64_t(s.batch) * s.channels * s.num_tiles * s.d_state,
              "selective_scan: `checkpoints` do not come from the CUDA forward of these inputs");
  if (dlast_state) {
    TORCH_CHECK(dlast_state->is_cuda() && dlast_state->scalar_type() == at::kFloat && dlast_state->is_contiguous() &&
                    dlast_state->numel() == int64_t(s.batch) * s.channels * s.d_state,
                "selective_scan: the last-state gradient must be contiguous float32 (batch, K*D, N)");
  }
  s.vector_io = s.vector_io && aligned16(dout.data_ptr());
  const auto f32 = u.options().dtype(at::kFloat);
  auto du = at::empty_like(u);
  const bool delta_groups = s.delta_rows != s.channels;
  auto ddelta = delta_groups ? at::empty({s.batch, s.channels, s.length}, f32) : at::empty_like(delta);
  auto dA = at::zeros_like(A);
  auto dB = at::zeros(B.sizes(), f32);
  auto dC = at::zeros(C.sizes(), f32);
  auto dD = D ? at::zeros_like(*D) : at::empty({0}, f32);
  auto ddelta_bias = delta_bias ? at::zeros_like(*delta_bias) : at::empty({0}, f32);

  BwdParams p{};
  p.shape = s;
  p.u = u.data_ptr();
  p.delta = delta.data_ptr();
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.A = A.data_ptr<float>();
  p.D = D ? D->data_ptr<float>() : nullptr;
  p.delta_bias = delta_bias ? delta_bias->data_ptr<float>() : nullptr;
  p.dout = dout.data_ptr();
  p.dout_float = dout.scalar_type() == at::kFloat;
  p.dlast_state = dlast_state ? dlast_state->data_ptr<float>() : nullptr;
  p.checkpoints = checkpoints.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = delta_groups ? nullptr : ddelta.data_ptr();
  p.ddelta_per_channel = delta_groups ? ddelta.data_ptr<float>() : nullptr;
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = D ? dD.data_ptr<float>() : nullptr;
  p.ddelta_bias = delta_bias ? ddelta_bias.data_ptr<float>() : nullptr;
  if (u.numel() == 0) {
    if (delta_groups) ddelta = at::zeros_like(delta);
    return {du, ddelta, dA, dB.to(B.scalar_type()), dC.to(C.scalar_type()), dD, ddelta_bias};
  }
  const cudaError_t status =
      launch_scan_bwd(p, kind, warps_per_block(s.channels / s.groups), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "selective_scan: backward kernel launch failed: ", cudaGetErrorString(status));

  if (delta_groups) {
    ddelta = ddelta.view({s.batch, s.delta_rows, s.channels / s.delta_rows, s.length}).sum(2).to(delta.scalar_type());
  }
  return {du, ddelta, dA, dB.to(B.scalar_type()), dC.to(C.scalar_type()), dD, ddelta_bias};
}

}  // namespace
}  // namespace selective_scan

TORCH_LIBRARY_IMPL(selective_scan, CUDA, m) {
  m.impl("fwd", &selective_scan::fwd);
  m.impl("bwd", &selective_scan::bwd);
}
