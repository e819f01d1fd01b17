// Host side of the kernels' dtype dispatch: the ScalarKind of a tensor, with a clear error for other dtypes.
#pragma once

#include <ATen/ATen.h>

#include "scan_common.cuh"

namespace selective_scan {

// op and name only label the error: "<op>: `<name>` must be float32, float16 or bfloat16, got ..."
inline ScalarKind scalar_kind(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    default: TORCH_CHECK(false, op, ": `", name, "` must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return ScalarKind::kFloat32;
}

}  // namespace selective_scan
