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

// Checks every position is in [-T, T) and returns them wrapped into [0, T) (Python indexing).
// One host sync (a 2-element copy) on CUDA: a bad index would otherwise read out of bounds.
inline at::Tensor normalize_positions(const at::Tensor& positions, int64_t T) {
  if (positions.numel() == 0) return positions.contiguous();
  auto mm = at::aminmax(positions);
  auto host = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
  const int64_t lo = host[0].item<int64_t>(), hi = host[1].item<int64_t>();
  TORCH_CHECK(lo >= -T && hi < T, kOp, ": argument 'positions' must hold row indices in [-T, T) with T = ", T,
              " (the rows of 'hidden_states'), got ", (lo < -T ? lo : hi));
  return at::where(positions < 0, positions + T, positions).contiguous();
}

}  // namespace lm_head
}  // namespace vita_ext
