// The extension module `selective_scan._C`: the schemas of every dispatcher op family (their kernels register
// with TORCH_LIBRARY_IMPL: the CPU kernels in cpu/*.cpp, always built; the CUDA kernels in *.cu and their
// bindings, built when a CUDA toolkit and a CUDA torch are there) and what the build contains.
// Without the extension selective_scan/ops.py defines the same schemas in Python.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "cpu/vec.h"

#ifndef SELECTIVE_SCAN_BUILD_INFO
#define SELECTIVE_SCAN_BUILD_INFO "build details not recorded"
#endif

TORCH_LIBRARY(selective_scan, m) {
  m.def("fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, bool delta_softplus,"
        " bool out_float) -> (Tensor, Tensor, Tensor)");
  m.def("bwd(Tensor dy, Tensor? dlast_state, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D,"
        " Tensor? delta_bias, Tensor checkpoints, bool delta_softplus) -> (Tensor, Tensor, Tensor, Tensor, Tensor,"
        " Tensor, Tensor)");
}

TORCH_LIBRARY(selective_scan_ss2d, m) {
  m.def("fwd(Tensor x, Tensor x_dbl, Tensor dt_weight, Tensor dt_bias, Tensor A_log, Tensor Ds) -> (Tensor, Tensor)");
  m.def("bwd(Tensor dy, Tensor x, Tensor x_dbl, Tensor dt_weight, Tensor dt_bias, Tensor A_log, Tensor Ds,"
        " Tensor ckpt) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// CUDA kernels only (layer_norm.cu); on the CPU selective_scan.layer_norm is F.layer_norm.
TORCH_LIBRARY(selective_scan_ln, m) {
  m.def("fwd(Tensor x, Tensor weight, Tensor bias, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

namespace {

// The instruction set the CPU kernels run with on this machine.
std::string cpu_kernel_isa() {
#if CPU_KERNEL_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2, FMA)";
  return "x86-64 baseline";
#else
  return "the compiler's baseline target";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Selective-scan (S6), fused SS2D and LayerNorm kernels for VMamba (registered as dispatcher ops)";
  m.def("build_info", [] { return "CPU kernels for " + cpu_kernel_isa() + "; " SELECTIVE_SCAN_BUILD_INFO; },
        "what this extension contains");
#ifdef SELECTIVE_SCAN_WITH_CUDA
  m.def("has_cuda", [] { return true; }, "whether the CUDA kernels are built");
#else
  m.def("has_cuda", [] { return false; }, "whether the CUDA kernels are built");
#endif
}
