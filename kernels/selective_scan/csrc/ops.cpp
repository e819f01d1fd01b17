// The extension module `selective_scan._C`: the schemas of every dispatcher op family, the registration of the CPU
// kernels (cpu/*.cpp, always built) and what the build contains. The CUDA kernels (*.cu and their bindings, built
// when a CUDA toolkit and a CUDA torch are there) register themselves with TORCH_LIBRARY_IMPL(..., CUDA).
// Without the extension selective_scan/ops.py defines the same schemas in Python.
//
// The module itself is plain CPython (two functions need no pybind11), and only torch/library.h is included:
// torch/extension.h made this file most of the extension's compile time.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"
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

TORCH_LIBRARY_IMPL(selective_scan, CPU, m) {
  m.impl("fwd", &selective_scan::cpu::scan_fwd);
  m.impl("bwd", &selective_scan::cpu::scan_bwd);
}

TORCH_LIBRARY_IMPL(selective_scan_ss2d, CPU, m) {
  m.impl("fwd", &selective_scan::cpu::ss2d_fwd);
  m.impl("bwd", &selective_scan::cpu::ss2d_bwd);
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

PyObject* build_info(PyObject*, PyObject*) {
  const std::string info = "CPU kernels for " + cpu_kernel_isa() + "; " SELECTIVE_SCAN_BUILD_INFO;
  return PyUnicode_FromString(info.c_str());
}

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef SELECTIVE_SCAN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "what this extension contains"},
    {"has_cuda", has_cuda, METH_NOARGS, "whether the CUDA kernels are built"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Selective-scan (S6), fused SS2D and LayerNorm kernels for VMamba (registered as dispatcher ops)", -1, methods,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
