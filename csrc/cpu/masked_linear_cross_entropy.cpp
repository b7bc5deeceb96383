// masked_linear_cross_entropy (+ _backward), CPU: cross-entropy of hidden_states @ weight^T against
// labels without ever forming the [T, V] logits.
//
// Algorithm (mirrors cuda/masked_linear_cross_entropy.cu):
//   select the M supervised rows (label != ignore_index; one pass over labels) and gather them into
//   h_sup [M, H] (converted to the acc dtype: fp32, or fp64 for fp64 inputs);
//   forward:  for each vocabulary chunk [c0, c0+vc), weight chunk converted to acc dtype once;
//               for each row chunk: tile = h_sup[rows] @ W_c^T (acc dtype, [mr, vc]),
//               online log-sum-exp per row (running max m, running sum s), target logit picked
//               from the tile when its column is in the chunk;
//             lse = m + log(s) (fp64), loss_i = lse_i - target_i.
//   backward: same loops; the tile becomes dlogits = g_i * (exp(tile - lse_i) - onehot) in place,
//             rounded to the operand dtype (as the CUDA kernel writes it, so both see the same
//             numerics), then dH_sup[rows] += dlogits @ W_c and dW_c += dlogits^T @ h_sup[rows]
//             (acc dtype), dW_c rounded once into dW; dH_sup is scattered into a zero [T, H].
// Cost: forward 2*M*H*V FLOPs, backward 6*M*H*V (logits recomputed); ~M*V exp.
// Extra memory (beyond inputs and outputs), with vc = VITA_EXT_CE_VOCAB_CHUNK (default 8192) and
// mr = min(M, 256 MB / (4 vc)) rows (VITA_EXT_CE_ROW_CHUNK overrides):
//   4*mr*vc (tile) + 4*vc*H (weight chunk, half dtypes) + 4*vc*H (dW chunk; x2 when M > mr)
//   + 4*mr*H (dH partial) + 4*M*H (h_sup) + 4*M*H (dH_sup, backward) + O(M) row statistics
//   [bytes, x2 for fp64].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "masked_linear_cross_entropy.h"

namespace vita_ext {
namespace {

using mlce::Reduction;

// Rows of a logits tile are independent: parallelise over rows, ~32K elements per task.
inline int64_t row_grain(int64_t vc) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vc, 1)); }

// Folds the tile's columns [c0, c0 + vc) into the running (max, sum of exp) of each row.
template <typename acc_t>
void online_lse_update(const at::Tensor& tile, const int64_t* labels, int64_t c0, acc_t* run_max, acc_t* run_sum,
                       acc_t* target) {
  const int64_t mr = tile.size(0), vc = tile.size(1);
  const acc_t* t = tile.data_ptr<acc_t>();
  at::parallel_for(0, mr, row_grain(vc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = t + i * vc;
      acc_t cmax = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < vc; ++j) cmax = std::max(cmax, row[j]);
      // A long sequential sum: accumulate in fp64 so it stays as accurate as a pairwise one.
      double csum = 0;
      for (int64_t j = 0; j < vc; ++j) csum += static_cast<double>(std::exp(row[j] - cmax));
      const acc_t m_old = run_max[i];
      const acc_t m_new = std::max(m_old, cmax);
      if (m_new != -std::numeric_limits<acc_t>::infinity()) {
        run_sum[i] = static_cast<acc_t>(run_sum[i] * std::exp(m_old - m_new) + csum * std::exp(cmax - m_new));
        run_max[i] = m_new;
      }
      const int64_t col = labels[i] - c0;
      if (col >= 0 && col < vc) target[i] = row[col];
    }
  });
}

// tile <- round_to_scalar_t(g_i * (exp(tile - lse_i) - onehot)), in place. tile - lse_i is formed in
// fp64 (lse is fp64) and then rounded, so the exponent is accurate to its own ulp.
template <typename scalar_t, typename acc_t>
void softmax_grad_inplace(at::Tensor& tile, const int64_t* labels, int64_t c0, const double* lse, const acc_t* g) {
  const int64_t mr = tile.size(0), vc = tile.size(1);
  acc_t* t = tile.data_ptr<acc_t>();
  at::parallel_for(0, mr, row_grain(vc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* row = t + i * vc;
      const double l = lse[i];
      const acc_t gi = g[i];
      const int64_t col = labels[i] - c0;
      for (int64_t j = 0; j < vc; ++j) {
        const acc_t z = static_cast<acc_t>(static_cast<double>(row[j]) - l);
        const acc_t p = std::exp(z) - (j == col ? acc_t(1) : acc_t(0));
        row[j] = static_cast<acc_t>(static_cast<scalar_t>(gi * p));
      }
    }
  });
}

// h: [M, H] acc dtype; returns the per-row (running max, running sum of exp, target logit) [M].
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_chunks(const at::Tensor& h, const at::Tensor& weight,
                                                  const at::Tensor& labels) {
  const int64_t M = h.size(0), V = weight.size(0);
  const auto opts = h.options();
  auto run_max = at::full({M}, -std::numeric_limits<double>::infinity(), opts);
  auto run_sum = at::zeros({M}, opts);
  auto target = at::zeros({M}, opts);
  const int64_t vchunk = mlce::vocab_chunk(V), rchunk = mlce::row_chunk(M, vchunk);
  auto buf = at::empty({rchunk * vchunk}, opts);
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
    const int64_t vc = std::min(vchunk, V - c0);
    const auto w = weight.narrow(0, c0, vc).to(h.scalar_type());
    for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
      const int64_t mr = std::min(rchunk, M - r0);
      auto tile = buf.narrow(0, 0, mr * vc).view({mr, vc});
      at::mm_out(tile, h.narrow(0, r0, mr), w.t());
      online_lse_update<acc_t>(tile, lab + r0, c0, run_max.data_ptr<acc_t>() + r0, run_sum.data_ptr<acc_t>() + r0,
                               target.data_ptr<acc_t>() + r0);
    }
  }
  return {run_max, run_sum, target};
}

// Returns (dH_sup [M, H] acc dtype, dW [V, H] weight dtype).
template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> backward_chunks(const at::Tensor& h, const at::Tensor& weight,
                                                   const at::Tensor& labels, const at::Tensor& lse,
                                                   const at::Tensor& g) {
  const int64_t M = h.size(0), V = weight.size(0), H = h.size(1);
  const auto opts = h.options();
  auto dh = at::zeros({M, H}, opts);
  auto dw = at::empty({V, H}, weight.options());
  const int64_t vchunk = mlce::vocab_chunk(V), rchunk = mlce::row_chunk(M, vchunk);
  auto buf = at::empty({rchunk * vchunk}, opts);
  auto dw_acc = at::empty({vchunk, H}, opts);
  auto dh_tmp = at::empty({rchunk * H}, opts);
  auto dw_tmp = at::empty({M > rchunk ? vchunk * H : 0}, opts);
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
    const int64_t vc = std::min(vchunk, V - c0);
    const auto w = weight.narrow(0, c0, vc).to(h.scalar_type());
    auto dwc = dw_acc.narrow(0, 0, vc);
    for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
      const int64_t mr = std::min(rchunk, M - r0);
      const auto hr = h.narrow(0, r0, mr);
      auto tile = buf.narrow(0, 0, mr * vc).view({mr, vc});
      at::mm_out(tile, hr, w.t());
      softmax_grad_inplace<scalar_t, acc_t>(tile, lab + r0, c0, lse.data_ptr<double>() + r0,
                                            g.data_ptr<acc_t>() + r0);
      // Product, then add: for small row counts CPU addmm_ takes a path that accumulates less
      // accurately (~2.5x the error of mm + add in our tests); this is also what the CUDA
      // fp32-output GEMM with beta = 1 does (one rounding of the partial product, one of the sum).
      auto dh_part = dh_tmp.narrow(0, 0, mr * H).view({mr, H});
      at::mm_out(dh_part, tile, w);
      dh.narrow(0, r0, mr).add_(dh_part);
      if (r0 == 0) {
        at::mm_out(dwc, tile.t(), hr);
      } else {
        auto dw_part = dw_tmp.narrow(0, 0, vc * H).view({vc, H});
        at::mm_out(dw_part, tile.t(), hr);
        dwc.add_(dw_part);
      }
    }
    dw.narrow(0, c0, vc).copy_(dwc);
  }
  return {dh, dw};
}

std::tuple<at::Tensor, at::Tensor> mlce_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                    const at::Tensor& labels, int64_t ignore_index,
                                                    c10::string_view reduction) {
  const auto red = mlce::parse_reduction(mlce::kOp, reduction);
  mlce::check_args(mlce::kOp, hidden, weight, labels);
  const int64_t T = hidden.size(0), V = weight.size(0);
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto sup = mlce::select_supervised(mlce::kOp, labels, ignore_index, V);
  at::Tensor run_max = at::zeros({sup.count}, hidden.options().dtype(acc)), run_sum = run_max, target = run_max;
  if (sup.count > 0) {
    const auto h = hidden.index_select(0, sup.rows).to(acc).contiguous();
    const auto lab = sup.labels.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "masked_linear_cross_entropy_cpu", [&] {
      std::tie(run_max, run_sum, target) = forward_chunks<scalar_t>(h, weight, lab);
    });
  }
  return mlce::finalize_forward(run_max, run_sum, target, sup, T, red);
}

std::tuple<at::Tensor, at::Tensor> mlce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                     const at::Tensor& weight, const at::Tensor& labels,
                                                     const at::Tensor& lse, int64_t ignore_index,
                                                     c10::string_view reduction) {
  const auto red = mlce::parse_reduction(mlce::kOpBwd, reduction);
  mlce::check_args(mlce::kOpBwd, hidden, weight, labels);
  mlce::check_backward_args(grad_loss, lse, hidden, red);
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto sup = mlce::select_supervised(mlce::kOpBwd, labels, ignore_index, V);
  auto grad_hidden = at::zeros({T, H}, hidden.options());
  if (sup.count == 0) return {grad_hidden, at::zeros({V, H}, weight.options())};
  const auto h = hidden.index_select(0, sup.rows).to(acc).contiguous();
  const auto lab = sup.labels.contiguous();
  const auto lse_sup = lse.index_select(0, sup.rows).contiguous();
  const auto g = mlce::row_grad_scale(grad_loss, sup, red, acc).contiguous();
  at::Tensor dh, dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "mlce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::tie(dh, dw) = backward_chunks<scalar_t, acc_t>(h, weight, lab, lse_sup, g);
  });
  grad_hidden.index_copy_(0, sup.rows, dh.to(hidden.scalar_type()));
  return {grad_hidden, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) {
  m.impl("masked_linear_cross_entropy", &mlce_forward_cpu);
  m.impl("masked_linear_cross_entropy_backward", &mlce_backward_cpu);
}

}  // namespace vita_ext
