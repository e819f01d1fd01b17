// The CPU kernels' entry points (scan_cpu.cpp, ss2d_cpu.cpp), registered for the CPU dispatch key in ops.cpp.
// Signatures follow the op schemas there.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace selective_scan {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta,
                                                        const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                                        const std::optional<at::Tensor>& D,
                                                        const std::optional<at::Tensor>& delta_bias, bool softplus,
                                                        bool out_float);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& dlast_state, const at::Tensor& u, const at::Tensor& delta,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& delta_bias, const at::Tensor& checkpoints, bool softplus);

std::tuple<at::Tensor, at::Tensor> ss2d_fwd(const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_weight,
                                            const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Ds);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ss2d_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& x_dbl, const at::Tensor& dt_weight,
    const at::Tensor& dt_bias, const at::Tensor& A_log, const at::Tensor& Ds, const at::Tensor& ckpt);

}  // namespace cpu
}  // namespace selective_scan
