// merge_attention_ on the CPU: in-place log-sum-exp merge of a partial attention result.
//
// Per (b, s, h) row: lse' = max + log1p(exp(-|lse - block_lse|)) (no overflow for any finite pair),
// out' = out * exp(lse - lse') + block_out * exp(block_lse - lse'), in fp32 (fp64 for fp64 out). A -inf
// side gets weight 0; both -inf give lse' = -inf and out' = 0, as in reference.merge_attention.
// Non-finite lse as torch.logaddexp: a NaN side gives lse' = NaN (and out' NaN), a +inf side lse' = +inf
// and out' NaN (the attention_lse contract of a +inf score), so a poisoned block is never hidden.
// out/lse may be strided views (ring attention merges into chunks of a larger buffer): rows are
// addressed through their (b, s, h) strides, the last dim of out and block_out has stride 1.
// Cost: 3 * B * S * H * D FLOPs; bytes: out read + written, block_out read, 4 lse values per row.
// (at::parallel_for is only parallel when compiled with -fopenmp; see cpu/attention_lse.cpp.)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attention_lse.h"

namespace vita_ext {
namespace {

// Calls f with a value of the C++ type of a floating dtype (the dtypes check_float admits).
template <typename F>
void with_float_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "vita_ext::merge_attention_: unexpected dtype ", dtype_name(t));
  }
}

// The new lse and the two weights of one row; A is the math type.
template <typename A>
inline void merge_weights(A a, A b, A& lse, A& wa, A& wb) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  if (a != a || b != b) {
    lse = std::numeric_limits<A>::quiet_NaN();  // std::max would drop it
  } else if (a == b && std::isinf(a)) {
    lse = a;  // both -inf (no keys) or both +inf; |a - b| would be NaN
  } else {
    lse = std::max(a, b) + std::log1p(std::exp(-std::abs(a - b)));
  }
  const A safe = (lse == kNegInf) ? A(0) : lse;
  wa = std::exp(a - safe);
  wb = std::exp(b - safe);
}

template <typename O, typename BO>
void merge_cpu(at::Tensor& out, at::Tensor& lse, const at::Tensor& block_out, const at::Tensor& block_lse) {
  using A = std::conditional_t<std::is_same_v<O, double>, double, float>;
  const int64_t B = out.size(0), S = out.size(1), H = out.size(2), D = out.size(3);
  O* o = static_cast<O*>(out.data_ptr());
  const BO* bo = static_cast<const BO*>(block_out.data_ptr());
  float* l = lse.data_ptr<float>();
  const float* bl = block_lse.data_ptr<float>();
  at::parallel_for(0, B * S * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % H, s = (t / H) % S, b = t / (H * S);
      float* lp = l + b * lse.stride(0) + h * lse.stride(1) + s * lse.stride(2);
      const float bv = bl[b * block_lse.stride(0) + h * block_lse.stride(1) + s * block_lse.stride(2)];
      A new_lse, wa, wb;
      merge_weights<A>(*lp, bv, new_lse, wa, wb);
      O* orow = o + b * out.stride(0) + s * out.stride(1) + h * out.stride(2);
      const BO* brow = bo + b * block_out.stride(0) + s * block_out.stride(1) + h * block_out.stride(2);
      for (int64_t c = 0; c < D; ++c) {
        orow[c] = static_cast<O>(static_cast<A>(orow[c]) * wa + static_cast<A>(brow[c]) * wb);
      }
      *lp = static_cast<float>(new_lse);
    }
  });
}

void merge_attention_cpu(at::Tensor& out, at::Tensor& lse, const at::Tensor& block_out_in,
                         const at::Tensor& block_lse) {
  attn::check_merge_attention_args("vita_ext::merge_attention_", out, lse, block_out_in, block_lse);
  if (lse.numel() == 0) return;
  const at::Tensor block_out = attn::inner_contiguous(block_out_in);
  with_float_type(out.scalar_type(), [&](auto o_tag) {
    with_float_type(block_out.scalar_type(), [&](auto b_tag) {
      merge_cpu<decltype(o_tag), decltype(b_tag)>(out, lse, block_out, block_lse);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) { m.impl("merge_attention_", &merge_attention_cpu); }

}  // namespace vita_ext
