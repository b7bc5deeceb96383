// masked_linear_cross_entropy: argument checks, chunk sizes, supervised-row selection and the
// reductions, shared by the CPU and CUDA kernels (everything here is device-agnostic ATen code on
// O(T) or O(M) sized tensors; the O(M * V * H) work lives in cpu/ and cuda/).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

#include "checks.h"

namespace vita_ext {
namespace mlce {

constexpr const char* kOp = "masked_linear_cross_entropy";
constexpr const char* kOpBwd = "masked_linear_cross_entropy_backward";

// Default vocabulary chunk, and the budget of one fp32 [rows, vocab-chunk] logits tile (256 MB).
constexpr int64_t kDefaultVocabChunk = 8192;
constexpr int64_t kTileBudgetBytes = int64_t(256) << 20;

enum class Reduction { Mean, Sum, None };

inline Reduction parse_reduction(const char* op, c10::string_view reduction) {
  const std::string r(reduction.data(), reduction.size());
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  TORCH_CHECK_VALUE(r == "none", op, ": argument 'reduction' must be one of 'mean', 'sum', 'none', got '", r, "'");
  return Reduction::None;
}

// fp32 for fp32/bf16/fp16 operands, fp64 for fp64 (gradcheck): the dtype of the logits tiles, of the
// loss output, and of every accumulator.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && x > 0, kOp, ": environment variable ", name,
              " must be a positive integer, got '", v, "'");
  return static_cast<int64_t>(x);
}

// Read at every call so tests can force several chunks on small vocabularies.
inline int64_t vocab_chunk(int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(env_int("VITA_EXT_CE_VOCAB_CHUNK", kDefaultVocabChunk), V));
}

// Rows per logits tile: keeps the fp32 [rows, vc] tile within kTileBudgetBytes (8192 rows at vc = 8192).
inline int64_t row_chunk(int64_t M, int64_t vc) {
  const int64_t budget = std::max<int64_t>(1, kTileBudgetBytes / (vc * 4));
  return std::max<int64_t>(1, std::min<int64_t>(env_int("VITA_EXT_CE_ROW_CHUNK", budget), M));
}

inline void check_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  check_dim(op, hidden, "hidden_states", 2, "[T, H]");
  check_dim(op, weight, "weight", 2, "[V, H]");
  check_float(op, hidden, "hidden_states");
  check_same_dtype(op, weight, "weight", hidden, "hidden_states");
  check_dtype(op, labels, "labels", at::kLong);
  check_same_device(op, weight, "weight", hidden, "hidden_states");
  check_same_device(op, labels, "labels", hidden, "hidden_states");
  check_size(op, weight, "weight", 1, hidden.size(1), "the hidden size H of 'hidden_states'");
  check_shape(op, labels, "labels", {hidden.size(0)}, "one label per row of 'hidden_states'");
}

// The backward's extra arguments: grad_loss has the loss's shape, lse is the forward's [T] output.
inline void check_backward_args(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& hidden,
                                Reduction red) {
  const int64_t T = hidden.size(0);
  check_same_device(kOpBwd, grad_loss, "grad_loss", hidden, "hidden_states");
  check_same_device(kOpBwd, lse, "lse", hidden, "hidden_states");
  check_float(kOpBwd, grad_loss, "grad_loss");
  if (red == Reduction::None) {
    check_shape(kOpBwd, grad_loss, "grad_loss", {T}, "the loss's shape for reduction='none'");
  } else {
    check_shape(kOpBwd, grad_loss, "grad_loss", {}, "the scalar loss of reduction='mean' or 'sum'");
  }
  check_dtype(kOpBwd, lse, "lse", at::kDouble);
  check_shape(kOpBwd, lse, "lse", {T}, "the forward's per-row log-sum-exp");
}

struct Supervised {
  at::Tensor rows;    // [M] int64, increasing indices of the rows with label != ignore_index
  at::Tensor labels;  // [M] int64, their labels, all in [0, V)
  int64_t count = 0;  // M
};

// nonzero() syncs with the host once; the range check's flag is computed before it, so reading the
// flag afterwards costs no second wait for the stream.
inline Supervised select_supervised(const char* op, const at::Tensor& labels, int64_t ignore_index, int64_t V) {
  const auto mask = labels.ne(ignore_index);
  const auto bad = mask.logical_and(labels.lt(0).logical_or(labels.ge(V)));
  const auto any_bad = bad.any();
  Supervised s;
  s.rows = at::nonzero(mask).view({-1});
  s.count = s.rows.size(0);
  if (any_bad.item<bool>()) {
    const int64_t row = at::nonzero(bad).view({-1})[0].item<int64_t>();
    TORCH_CHECK(false, op, ": argument 'labels' must hold class indices in [0, V) with V = ", V,
                " (the rows of 'weight') or ignore_index = ", ignore_index, ", got ", labels[row].item<int64_t>(),
                " at row ", row);
  }
  s.labels = labels.index_select(0, s.rows);
  return s;
}

// From the per-row online statistics ([M], acc dtype: running max, running sum of exp(x - max), target
// logit) to (loss: [] or [T] in the acc dtype, lse: [T] fp64, 0 at ignored rows). lse_i = max + log(sum)
// and loss_i = lse_i - target_i are formed in fp64 and the sum over rows is fp64 (O(M) work): the loss
// is rounded once.
// Why lse is fp64: the backward forms p = exp(logit - lse). An fp32 lse carries a rounding error of
// up to half an ulp of |lse| (~1e-6 at lse ~ 16) that scales every p of the row by the same factor;
// the coherent error made fp32 gradients exceed 2x PyTorch's error (which subtracts the row max
// first) on ~0.3% of random test draws. In fp64 only the statistics' own fp32 error is left.
inline std::tuple<at::Tensor, at::Tensor> finalize_forward(const at::Tensor& run_max, const at::Tensor& run_sum,
                                                           const at::Tensor& target, const Supervised& sup,
                                                           int64_t T, Reduction red) {
  const auto acc = run_max.scalar_type();
  const auto lse_sup = run_max.to(at::kDouble) + run_sum.to(at::kDouble).log();
  const auto loss_sup = lse_sup - target.to(at::kDouble);
  auto lse = at::zeros({T}, run_max.options().dtype(at::kDouble));
  lse.index_copy_(0, sup.rows, lse_sup);
  at::Tensor loss;
  if (red == Reduction::None) {
    loss = at::zeros({T}, run_max.options());
    loss.index_copy_(0, sup.rows, loss_sup.to(acc));
  } else {
    loss = loss_sup.sum();
    // 0 / 0 = NaN when no row is supervised, as F.cross_entropy's mean.
    if (red == Reduction::Mean) loss = loss.div(static_cast<double>(sup.count));
    loss = loss.to(acc);
  }
  return {loss, lse};
}

// g_i = dloss / dloss_i for each supervised row: [M] in the acc dtype.
inline at::Tensor row_grad_scale(const at::Tensor& grad_loss, const Supervised& sup, Reduction red,
                                 at::ScalarType acc) {
  const auto g = grad_loss.to(acc);
  if (red == Reduction::None) return g.index_select(0, sup.rows);
  auto out = g.reshape({1}).expand({sup.count}).contiguous();
  if (red == Reduction::Mean && sup.count > 0) out.div_(static_cast<double>(sup.count));
  return out;
}

}  // namespace mlce
}  // namespace vita_ext
