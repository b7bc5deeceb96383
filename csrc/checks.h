// Argument checks shared by the CPU and CUDA implementations. Every message names the op, the
// argument, what was expected and what was received, so a user can fix the call without a debugger.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace vita_ext {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// Floating dtypes the kernels accept: fp32, bf16, fp16, and fp64 (for gradcheck on the CPU).
inline void check_float(const char* op, const at::Tensor& t, const char* name) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf || d == at::kDouble,
              op, ": argument '", name, "' must have dtype torch.float32, torch.bfloat16 or torch.float16 (or torch.float64 on the CPU), got ",
              dtype_name(d));
}

inline void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": argument '", name, "' must have dtype ", dtype_name(want),
              ", got ", dtype_name(t.scalar_type()));
}

inline void check_same_dtype(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": argument '", name, "' must have dtype ",
              dtype_name(ref.scalar_type()), " (the dtype of '", ref_name, "'), got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": argument '", name, "' must be on device ", ref.device().str(),
              " (the device of '", ref_name, "'), got ", t.device().str());
}

inline void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": argument '", name, "' must be ", dim, "-D ", layout, ", got shape ",
              shape_str(t));
}

inline void check_size(const char* op, const at::Tensor& t, const char* name, int64_t d, int64_t want,
                       const char* why) {
  TORCH_CHECK(t.size(d) == want, op, ": argument '", name, "' must have size ", want, " in dim ", d, " (", why,
              "), got shape ", shape_str(t));
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef want,
                        const char* why) {
  if (t.sizes() == want) return;
  std::string w = "[";
  for (size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
  TORCH_CHECK(false, op, ": argument '", name, "' must have shape ", w, "] (", why, "), got ", shape_str(t));
}

inline void check_inner_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) == 1, op, ": argument '", name,
              "' must have a contiguous last dimension (stride 1), got strides ", t.strides());
}

}  // namespace vita_ext
