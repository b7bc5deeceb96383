// masked_lm_head: argument checks and position handling shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace vita_ext {
namespace lm_head {

constexpr const char* kOp = "masked_lm_head";

inline void check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& positions) {
  check_dim(kOp, hidden, "hidden_states", 2, "[T, H]");
  check_dim(kOp, weight, "weight", 2, "[V, H]");
  check_dim(kOp, positions, "positions", 1, "[K]");
  check_float(kOp, hidden, "hidden_states");
  check_same_dtype(kOp, weight, "weight", hidden, "hidden_states");
  check_dtype(kOp, positions, "positions", at::kLong);
  check_same_device(kOp, weight, "weight", hidden, "hidden_states");
  check_same_device(kOp, positions, "positions", hidden, "hidden_states");
  check_size(kOp, weight, "weight", 1, hidden.size(1), "the hidden size H of 'hidden_states'");
}

// CPU: checks every position is in [-T, T) and returns them wrapped into [0, T) (Python indexing). The
// positions are read where they are, on the host: no device transfer. (The CUDA kernel wraps and checks
// on the device instead, without a host sync: an out-of-range position gives a row of NaN logits.)
inline at::Tensor normalize_positions_cpu(const at::Tensor& positions, int64_t T) {
  const auto pos = positions.contiguous();
  auto out = at::empty_like(pos);
  const int64_t* src = pos.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t k = 0; k < pos.numel(); ++k) {
    const int64_t p = src[k];
    TORCH_CHECK(p >= -T && p < T, kOp, ": argument 'positions' must hold row indices in [-T, T) with T = ", T,
                " (the rows of 'hidden_states'), got ", p, " at index ", k);
    dst[k] = p < 0 ? p + T : p;
  }
  return out;
}

}  // namespace lm_head
}  // namespace vita_ext
