// masked_linear_cross_entropy: argument checks, chunk sizes, supervised-row selection and the
// reductions, shared by the CPU and CUDA kernels (everything here is device-agnostic ATen code on
// O(T) or O(M) sized tensors; the O(M * V * H) work lives in cpu/ and cuda/).
//
// Host syncs. Selecting the M supervised rows needs M on the host (it sizes the GEMMs). Without
// num_supervised it is read from the device once (nonzero), and the label range check rides on that
// read, so a bad label gets a clear error. With num_supervised (the packer knows it on the host) the
// selection is searchsorted on the running count of supervised rows: no value comes back from the
// device, so a training step stays asynchronous and CUDA-graph capturable. Nothing is checked on the
// host then: a wrong count, or a label outside [0, V), gives NaN (the loss and the gradients of the
// whole call, or of that row) instead of an error -- never a silently wrong number or a bad read.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "checks.h"

namespace vita_ext {
namespace mlce {

constexpr const char* kOp = "masked_linear_cross_entropy";
constexpr const char* kOpBwd = "masked_linear_cross_entropy_backward";

enum class Reduction { Mean, Sum, None };

inline Reduction parse_reduction(const char* op, c10::string_view reduction) {
  const std::string r(reduction.data(), reduction.size());
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  TORCH_CHECK_VALUE(r == "none", op, ": argument 'reduction' must be one of 'mean', 'sum', 'none', got '", r, "'");
  return Reduction::None;
}

// fp32 for fp32/bf16/fp16 operands, fp64 for fp64 (gradcheck): the dtype of the loss output and of
// every accumulator.
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

// Vocabulary columns per logits tile (VITA_EXT_CE_VOCAB_CHUNK overrides; read at every call so tests
// can force several chunks on small vocabularies).
inline int64_t vocab_chunk(int64_t V, int64_t fallback) {
  return std::max<int64_t>(1, std::min<int64_t>(env_int("VITA_EXT_CE_VOCAB_CHUNK", fallback), V));
}

// Rows per logits tile: keeps a [rows, cols] tile of elem_bytes elements within budget_bytes
// (VITA_EXT_CE_ROW_CHUNK overrides).
inline int64_t row_chunk(int64_t M, int64_t cols, int64_t elem_bytes, int64_t budget_bytes) {
  const int64_t fit = std::max<int64_t>(1, budget_bytes / (std::max<int64_t>(cols, 1) * elem_bytes));
  return std::max<int64_t>(1, std::min<int64_t>(env_int("VITA_EXT_CE_ROW_CHUNK", fit), std::max<int64_t>(M, 1)));
}

inline void check_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                       c10::optional<int64_t> num_supervised) {
  check_dim(op, hidden, "hidden_states", 2, "[T, H]");
  check_dim(op, weight, "weight", 2, "[V, H]");
  check_float(op, hidden, "hidden_states");
  check_same_dtype(op, weight, "weight", hidden, "hidden_states");
  check_dtype(op, labels, "labels", at::kLong);
  check_same_device(op, weight, "weight", hidden, "hidden_states");
  check_same_device(op, labels, "labels", hidden, "hidden_states");
  check_size(op, weight, "weight", 1, hidden.size(1), "the hidden size H of 'hidden_states'");
  check_shape(op, labels, "labels", {hidden.size(0)}, "one label per row of 'hidden_states'");
  if (num_supervised.has_value()) {
    TORCH_CHECK(*num_supervised >= 0 && *num_supervised <= hidden.size(0), op,
                ": argument 'num_supervised' must be the number of labels != ignore_index, in [0, T] with T = ",
                hidden.size(0), ", got ", *num_supervised);
  }
}

// grad_in_forward needs a scalar loss: the backward then only scales the stored gradients.
inline void check_grad_in_forward(Reduction red, bool any) {
  TORCH_CHECK_VALUE(!any || red != Reduction::None, kOp,
                    ": argument 'grad_in_forward' needs reduction 'mean' or 'sum' (a scalar loss), got 'none'");
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
  at::Tensor labels;  // [M] int64, their labels (in [0, V) when checked)
  at::Tensor poison;  // [] acc dtype: 0, or NaN when the caller's num_supervised is wrong (unchecked only)
  at::Tensor row_ok;  // [M] bool: label in [0, V) (unchecked only; undefined when checked on the host)
  int64_t count = 0;  // M
};

// Without a count: nonzero() syncs with the host once; the range check's flag is computed before it,
// so reading the flag afterwards costs no second wait for the stream.
inline Supervised select_checked(const char* op, const at::Tensor& labels, int64_t ignore_index, int64_t V,
                                 at::ScalarType acc) {
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
  s.poison = at::scalar_tensor(0, labels.options().dtype(acc));
  return s;
}

// With the count from the caller: row k of the selection is the first row whose running count of
// supervised rows reaches k + 1 (searchsorted on the cumulative sum). Device-side only.
inline Supervised select_counted(const at::Tensor& labels, int64_t ignore_index, int64_t V, int64_t M,
                                 at::ScalarType acc) {
  const int64_t T = labels.size(0);
  Supervised s;
  s.count = M;
  const auto opts = labels.options();
  if (T == 0) {
    s.rows = at::empty({0}, opts);
    s.labels = s.rows;
    s.row_ok = at::empty({0}, opts.dtype(at::kBool));
    s.poison = at::scalar_tensor(0, opts.dtype(acc));
    return s;
  }
  const auto running = labels.ne(ignore_index).to(at::kLong).cumsum(0);
  const auto wanted = at::arange(1, M + 1, opts);
  s.rows = at::searchsorted(running, wanted).clamp_max_(T - 1);  // T where the count is too high
  s.labels = labels.index_select(0, s.rows);
  s.row_ok = s.labels.ge(0).logical_and(s.labels.lt(V)).logical_and(s.labels.ne(ignore_index));
  const auto total = running.select(0, T - 1);
  s.poison = at::where(total.eq(M), at::scalar_tensor(0, opts.dtype(acc)),
                       at::scalar_tensor(std::numeric_limits<double>::quiet_NaN(), opts.dtype(acc)));
  return s;
}

inline Supervised select_supervised(const char* op, const at::Tensor& labels, int64_t ignore_index, int64_t V,
                                    c10::optional<int64_t> num_supervised, at::ScalarType acc) {
  if (num_supervised.has_value()) return select_counted(labels, ignore_index, V, *num_supervised, acc);
  return select_checked(op, labels, ignore_index, V, acc);
}

// From the per-row online statistics ([M], acc dtype: running max, running sum of exp(x - max), target
// logit; the target is NaN where the label was never found) to (loss: [] or [T] in the acc dtype,
// lse: [T] fp64, 0 at ignored rows). lse_i = max + log(sum) and loss_i = lse_i - target_i are formed
// in fp64 and the sum over rows is fp64 (O(M) work): the loss is rounded once.
// Why lse is fp64: the backward forms p = exp(logit - lse). An fp32 lse carries a rounding error of
// up to half an ulp of |lse| (~1e-6 at lse ~ 16) that scales every p of the row by the same factor;
// the coherent error made fp32 gradients exceed 2x PyTorch's error (which subtracts the row max
// first) on ~0.3% of random test draws. In fp64 only the statistics' own fp32 error is left.
inline at::Tensor lse_of(const at::Tensor& run_max, const at::Tensor& run_sum) {
  return run_max.to(at::kDouble) + run_sum.to(at::kDouble).log();
}

inline std::tuple<at::Tensor, at::Tensor> finalize_forward(const at::Tensor& lse_sup, const at::Tensor& target,
                                                           const Supervised& sup, int64_t T, Reduction red) {
  const auto acc = target.scalar_type();
  const auto loss_sup = lse_sup - target.to(at::kDouble);
  auto lse = at::zeros({T}, lse_sup.options());
  lse.index_copy_(0, sup.rows, lse_sup);
  at::Tensor loss;
  if (red == Reduction::None) {
    loss = at::zeros({T}, target.options());
    loss.index_copy_(0, sup.rows, loss_sup.to(acc));
  } else {
    loss = loss_sup.sum();
    // 0 / 0 = NaN when no row is supervised, as F.cross_entropy's mean.
    if (red == Reduction::Mean) loss = loss.div(static_cast<double>(sup.count));
    loss = loss.to(acc);
  }
  return {loss.add_(sup.poison), lse};
}

// g_i = dloss / dloss_i for each supervised row: [M] in the acc dtype. NaN for a row whose label is
// out of range, and everywhere when the count was wrong (unchecked selection only).
inline at::Tensor row_grad_scale(const at::Tensor& grad_loss, const Supervised& sup, Reduction red,
                                 at::ScalarType acc) {
  const auto g = grad_loss.to(acc);
  at::Tensor out;
  if (red == Reduction::None) {
    out = g.index_select(0, sup.rows);
  } else {
    out = g.reshape({1}).expand({sup.count}).contiguous();
    if (red == Reduction::Mean && sup.count > 0) out.div_(static_cast<double>(sup.count));
  }
  out.add_(sup.poison);
  if (sup.row_ok.defined()) out.masked_fill_(sup.row_ok.logical_not(), std::numeric_limits<double>::quiet_NaN());
  return out.contiguous();
}

// The scale of the gradients formed in the forward pass (grad_in_forward): dloss/dloss_i for a
// unit upstream gradient, [M] in the acc dtype.
inline at::Tensor unit_row_grad_scale(const Supervised& sup, Reduction red, const at::TensorOptions& opts) {
  return row_grad_scale(at::ones({}, opts), sup, red, opts.dtype().toScalarType());
}

}  // namespace mlce
}  // namespace vita_ext
