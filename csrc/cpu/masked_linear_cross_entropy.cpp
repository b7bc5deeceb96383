// masked_linear_cross_entropy (+ _backward), CPU: cross-entropy of hidden_states @ weight^T against
// labels without ever forming the [T, V] logits.
//
// Algorithm (mirrors cuda/masked_linear_cross_entropy.cu). Select the M supervised rows (label !=
// ignore_index; see masked_linear_cross_entropy.h for the host-sync-free selection) and gather them
// into h_sup [M, H]. GEMMs run through ATen (oneDNN/MKL) in the GEMM dtype of cpu/cpu_gemm.h: the
// operand dtype (fp32; bf16 on CPUs with native bf16 dot products, rounded once like PyTorch's eager
// matmul) or fp32. Our code is only the epilogue PyTorch does not fuse: vectorized passes over each
// logits tile (cpu/row_kernels.cpp).
//   forward:  one parallel region; each thread takes a block of rows through the whole vocabulary:
//               for each vocabulary chunk [c0, c0+vc), tile = h_sup[rows] @ W_c^T ([mr, vc], its own
//               buffer, a single-threaded GEMM); per row fold the tile into the running (max m, sum of
//               exp s) and pick the target logit when its column is in the chunk;
//             lse = m + log(s) (fp64), loss_i = lse_i - target_i.
//   backward: one parallel region; each thread takes whole vocabulary chunks (it owns their dW rows)
//             through all rows: the tile becomes dl = g_i * (exp(tile - lse_i) - onehot) in place,
//             then dH_sup[rows] += dl @ W_c (the thread's fp32 accumulator; summed over threads at the
//             end) and dW_c (+)= dl^T @ h_sup[rows], each only when asked for (output_mask): a frozen
//             weight costs no dW GEMM and no [V, H] buffer.
//   grad_in_forward: row chunks outer over the whole vocabulary: tile = h_r @ W^T ([mr, V]), its lse,
//             dl in place, dH_r = dl @ W, dW += dl^T @ h_r; the backward only scales the stored
//             gradients by grad_loss. A bf16/fp16 tile row takes one exp per logit, not two: the sum
//             pass keeps exp(x - max) in a float row, which scaled by g / sum is the softmax term
//             (rows::softmax_grad_row; the row passes were ~60% of the op at the digits step's shape).
// One parallel region with per-thread GEMMs instead of many short multi-threaded ones: no barrier per
// tile, which matters most on a busy machine.
// Cost (FLOPs), per gradient asked for: forward 2*M*H*V; backward 2*M*H*V (logits recomputed) +
// 2*M*H*V for dH + 2*M*H*V for dW; grad_in_forward 2*M*H*V + 2*M*H*V per gradient in the forward and
// O(T*H + V*H) in the backward. ~M*V exp per pass over the logits.
// Extra memory (beyond inputs and outputs), e = GEMM element size, P = threads, vc = VITA_EXT_CE_VOCAB_CHUNK
// (default <= 8192), mr = rows per tile within the tile budget (VITA_EXT_CE_ROW_CHUNK overrides):
//   P * e*mr*vc (tiles, <= 32 MB each) + e*M*H (h_sup) + P * 4*M*H (dH accumulators) + P * 4*vc*H (dW
//   chunk accumulators) + P * e*vc*H (weight chunks, when the GEMM dtype differs) + O(M) row statistics.
//   grad_in_forward: e*mr*V (tile, <= 128 MB) + 4*V*H (dW accumulator, when M > mr) + e*V*H (the weight,
//   when the GEMM dtype differs) + P * 4*V (the float exp rows of bf16/fp16 tiles).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/cpu_gemm.h"
#include "cpu/row_kernels.h"
#include "masked_linear_cross_entropy.h"

namespace vita_ext {
namespace {

using mlce::Reduction;

constexpr int64_t kVocabChunk = 8192;
constexpr int64_t kTileBudgetBytes = int64_t(32) << 20;     // [mr, vc] tiles, per thread
// grad_in_forward's [mr, V] tiles: 128 MB keeps a bf16 step of <= 441 supervised rows at V = 152K in one
// tile, so dW is one product written straight into the output (more rows: an fp32 dW accumulator,
// a scratch product and an add per tile, ~20% of the op at 265 rows on one thread)
constexpr int64_t kFullRowBudgetBytes = int64_t(128) << 20;

// Rows of a tile are independent: parallelise over rows, ~32K elements per task.
inline int64_t row_grain(int64_t vc) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vc, 1)); }

// NaN-propagating max: a NaN logit makes the row's statistics NaN (std::max would drop it).
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (b > a || b != b) ? b : a;
}

// Folds the tile's columns [c0, c0 + vc) into the running (max, sum of exp) of each row; target gets
// the logit of the row's label when it falls in the chunk. The row pass is rows::max_sumexp.
template <typename tile_t, typename acc_t>
void online_lse_update(const at::Tensor& tile, const int64_t* labels, int64_t c0, acc_t* run_max, acc_t* run_sum,
                       acc_t* target) {
  const int64_t mr = tile.size(0), vc = tile.size(1);
  const tile_t* t = tile.data_ptr<tile_t>();
  at::parallel_for(0, mr, row_grain(vc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const tile_t* row = t + i * vc;
      const int64_t col = labels[i] - c0;
      if (col >= 0 && col < vc) target[i] = static_cast<acc_t>(row[col]);
      acc_t cmax;
      double csum;
      rows::max_sumexp(row, vc, cmax, csum);
      if (cmax == -std::numeric_limits<acc_t>::infinity()) continue;  // every logit -inf: adds nothing
      const acc_t m_old = run_max[i];
      const acc_t m_new = nan_max(m_old, cmax);
      run_sum[i] = static_cast<acc_t>(run_sum[i] * std::exp(m_old - m_new) + csum * std::exp(cmax - m_new));
      run_max[i] = m_new;
    }
  });
}

// tile <- g_i * (exp(tile - lse_i) - onehot), in place, rounded to tile_t (rows::softmax_grad).
template <typename tile_t, typename acc_t>
void softmax_grad_inplace(at::Tensor& tile, const int64_t* labels, int64_t c0, const double* lse, const acc_t* g) {
  const int64_t mr = tile.size(0), vc = tile.size(1);
  tile_t* t = tile.data_ptr<tile_t>();
  at::parallel_for(0, mr, row_grain(vc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rows::softmax_grad(t + i * vc, vc, lse[i], g[i], labels[i] - c0);
  });
}

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// Row statistics of the forward: running max, running sum of exp, target logit (NaN until found).
struct Stats {
  at::Tensor run_max, run_sum, target;
  Stats(int64_t M, const at::TensorOptions& acc_opts)
      : run_max(at::full({M}, -std::numeric_limits<double>::infinity(), acc_opts)),
        run_sum(at::zeros({M}, acc_opts)),
        target(at::full({M}, std::numeric_limits<double>::quiet_NaN(), acc_opts)) {}
};

// Stats of the rows of a bf16/fp16 [mr, V] tile (rows r0.. of the step) and the tile made its gradient,
// with one exp per element (rows::softmax_grad_row; exps: get_num_threads() * V floats of scratch).
template <typename tile_t>
void fused_softmax_grad(at::Tensor& tile, const int64_t* labels, const float* g, Stats& st, int64_t r0,
                        at::Tensor& exps) {
  const int64_t mr = tile.size(0), V = tile.size(1);
  tile_t* t = tile.data_ptr<tile_t>();
  float* run_max = st.run_max.data_ptr<float>() + r0;
  float* run_sum = st.run_sum.data_ptr<float>() + r0;
  float* target = st.target.data_ptr<float>() + r0;
  at::parallel_for(0, mr, 1, [&](int64_t begin, int64_t end) {
    float* e = exps.data_ptr<float>() + at::get_thread_num() * V;
    for (int64_t i = begin; i < end; ++i) {
      tile_t* row = t + i * V;
      if (labels[i] >= 0 && labels[i] < V) target[i] = static_cast<float>(row[labels[i]]);
      double sum;
      rows::softmax_grad_row(row, V, e, g[i], labels[i], run_max[i], sum);
      run_sum[i] = static_cast<float>(sum);
    }
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Vocabulary chunk: VITA_EXT_CE_VOCAB_CHUNK, or <= kVocabChunk columns in a multiple of `parts` chunks
// (the backward hands whole chunks to threads).
int64_t vocab_chunk_for(int64_t V, int64_t parts) {
  const int64_t rounds = ceil_div(V, parts * kVocabChunk);
  return mlce::vocab_chunk(V, std::max<int64_t>(1, ceil_div(V, parts * rounds)));
}

// h: [M, H] in the GEMM dtype (tile_t); weight [V, H] in the operand dtype. One parallel region: each
// thread takes a block of rows through the whole vocabulary with its own tile and single-threaded
// GEMMs (no synchronisation between the tiles; each thread owns its rows' statistics).
template <typename tile_t>
void forward_chunks(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels, Stats& st) {
  using acc_t = at::opmath_type<tile_t>;
  const int64_t M = h.size(0), V = weight.size(0);
  const auto gd = h.scalar_type();
  const int64_t threads = at::get_num_threads();
  const int64_t vchunk = mlce::vocab_chunk(V, kVocabChunk);
  const int64_t rchunk = mlce::row_chunk(ceil_div(M, threads), vchunk, h.element_size(), kTileBudgetBytes);
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::parallel_for(0, M, ceil_div(M, threads), [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: the caller's TLS is not theirs
    auto buf = at::empty({std::min(rchunk, end - begin) * vchunk}, h.options());
    for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
      const int64_t vc = std::min(vchunk, V - c0);
      const auto w = in_dtype(weight.narrow(0, c0, vc), gd);
      for (int64_t r0 = begin; r0 < end; r0 += rchunk) {
        const int64_t mr = std::min(rchunk, end - r0);
        auto tile = buf.narrow(0, 0, mr * vc).view({mr, vc});
        at::mm_out(tile, h.narrow(0, r0, mr), w.t());
        online_lse_update<tile_t, acc_t>(tile, lab + r0, c0, st.run_max.data_ptr<acc_t>() + r0,
                                         st.run_sum.data_ptr<acc_t>() + r0, st.target.data_ptr<acc_t>() + r0);
      }
    }
  });
}

// acc (fp32/fp64) += a @ b. Product, then add: for small row counts CPU addmm_ takes a path that
// accumulates less accurately (~2.5x the error of mm + add in our tests).
void mm_accumulate(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, at::Tensor& scratch, bool first) {
  if (first && acc.scalar_type() == a.scalar_type()) {
    at::mm_out(acc, a, b);
    return;
  }
  auto part = scratch.narrow(0, 0, acc.numel()).view(acc.sizes());
  at::mm_out(part, a, b);
  if (first) {
    acc.copy_(part);
  } else {
    acc.add_(part);
  }
}

struct Grads {
  at::Tensor dh;  // [M, H] fp32/fp64 accumulator of the supervised rows (undefined when not asked for)
  at::Tensor dw;  // [V, H] in the weight's dtype (undefined when not asked for)
};

// Backward with recomputed logits. One parallel region: each thread takes whole vocabulary chunks
// (so it owns their dW rows) through all rows, with its own tile, single-threaded GEMMs and its own
// fp32 dH accumulator; the accumulators are summed in thread order at the end.
template <typename tile_t>
Grads backward_chunks(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& lse,
                      const at::Tensor& g, bool need_dh, bool need_dw) {
  using acc_t = at::opmath_type<tile_t>;
  const int64_t M = h.size(0), V = weight.size(0), H = h.size(1);
  const auto gd = h.scalar_type();
  const auto acc_opts = h.options().dtype(mlce::acc_dtype(gd));
  const int64_t threads = at::get_num_threads();
  const int64_t vchunk = vocab_chunk_for(V, threads);
  const int64_t chunks = ceil_div(V, vchunk);
  const int64_t rchunk = mlce::row_chunk(M, vchunk, h.element_size(), kTileBudgetBytes);
  const bool multi = M > rchunk;
  Grads out;
  auto dh_parts = need_dh ? at::zeros({threads, M, H}, acc_opts) : at::Tensor();
  if (need_dw) out.dw = at::empty({V, H}, weight.options());
  const int64_t* lab = labels.data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: the caller's TLS is not theirs
    auto buf = at::empty({rchunk * vchunk}, h.options());
    auto scratch = at::empty({(need_dw ? std::max(rchunk, vchunk) : rchunk) * H}, h.options());
    auto dw_acc = need_dw ? at::empty({vchunk, H}, acc_opts) : at::Tensor();
    auto dh = need_dh ? dh_parts.select(0, at::get_thread_num()) : at::Tensor();
    for (int64_t ci = begin; ci < end; ++ci) {
      const int64_t c0 = ci * vchunk, vc = std::min(vchunk, V - c0);
      const auto w = in_dtype(weight.narrow(0, c0, vc), gd);
      auto dwc = need_dw ? dw_acc.narrow(0, 0, vc) : at::Tensor();
      for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
        const int64_t mr = std::min(rchunk, M - r0);
        const auto hr = h.narrow(0, r0, mr);
        auto tile = buf.narrow(0, 0, mr * vc).view({mr, vc});
        at::mm_out(tile, hr, w.t());
        softmax_grad_inplace<tile_t, acc_t>(tile, lab + r0, c0, lse.data_ptr<double>() + r0,
                                            g.data_ptr<acc_t>() + r0);
        if (need_dh) {
          auto dhr = dh.narrow(0, r0, mr);
          mm_accumulate(dhr, tile, w, scratch, false);
        }
        if (need_dw && !multi && gd == weight.scalar_type()) {
          auto dst = out.dw.narrow(0, c0, vc);
          at::mm_out(dst, tile.t(), hr);  // one product per chunk: rounded once, straight into dW
        } else if (need_dw) {
          mm_accumulate(dwc, tile.t(), hr, scratch, r0 == 0);
        }
      }
      if (need_dw && (multi || gd != weight.scalar_type())) out.dw.narrow(0, c0, vc).copy_(dwc);
    }
  });
  if (need_dh) out.dh = threads == 1 ? dh_parts.select(0, 0) : dh_parts.sum(0);
  return out;
}

// grad_in_forward: rows outer over the whole vocabulary; fills st and returns the gradients of the
// loss for unit upstream gradient (dh [M, H] in the hidden dtype, dw [V, H]).
template <typename tile_t>
Grads forward_with_grad(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& g,
                        bool need_dh, bool need_dw, at::ScalarType hidden_dtype, Stats& st) {
  using acc_t = at::opmath_type<tile_t>;
  const int64_t M = h.size(0), V = weight.size(0), H = h.size(1);
  const auto gd = h.scalar_type();
  const auto acc_opts = h.options().dtype(mlce::acc_dtype(gd));
  const auto w = in_dtype(weight, gd);
  const int64_t rchunk = mlce::row_chunk(M, V, h.element_size(), kFullRowBudgetBytes);
  const bool multi = M > rchunk;
  Grads out;
  if (need_dh) out.dh = at::empty({M, H}, h.options().dtype(hidden_dtype));
  if (need_dw) out.dw = at::empty({V, H}, weight.options());
  auto dw_acc = need_dw && (multi || gd != weight.scalar_type()) ? at::empty({V, H}, acc_opts) : out.dw;
  auto buf = at::empty({rchunk * V}, h.options());
  auto scratch = at::empty({need_dw && multi ? V * H : 0}, h.options());
  constexpr bool half_tile = std::is_same_v<tile_t, at::BFloat16> || std::is_same_v<tile_t, at::Half>;
  auto row_exps = at::empty({half_tile ? at::get_num_threads() * V : 0}, h.options().dtype(at::kFloat));
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
    const int64_t mr = std::min(rchunk, M - r0);
    const auto hr = h.narrow(0, r0, mr);
    auto tile = buf.narrow(0, 0, mr * V).view({mr, V});
    at::mm_out(tile, hr, w.t());
    if constexpr (half_tile) {
      fused_softmax_grad<tile_t>(tile, lab + r0, g.data_ptr<float>() + r0, st, r0, row_exps);
    } else {
      online_lse_update<tile_t, acc_t>(tile, lab + r0, 0, st.run_max.data_ptr<acc_t>() + r0,
                                       st.run_sum.data_ptr<acc_t>() + r0, st.target.data_ptr<acc_t>() + r0);
      const auto lse = mlce::lse_of(st.run_max.narrow(0, r0, mr), st.run_sum.narrow(0, r0, mr)).contiguous();
      softmax_grad_inplace<tile_t, acc_t>(tile, lab + r0, 0, lse.data_ptr<double>(), g.data_ptr<acc_t>() + r0);
    }
    if (need_dh) {
      auto dst = out.dh.narrow(0, r0, mr);
      if (gd == hidden_dtype) {
        at::mm_out(dst, tile, w);
      } else {
        dst.copy_(at::mm(tile, w));
      }
    }
    if (need_dw) mm_accumulate(dw_acc, tile.t(), hr, scratch, r0 == 0);
  }
  if (need_dw && !dw_acc.is_same(out.dw)) out.dw.copy_(dw_acc);
  return out;
}

// An output the caller did not ask for: empty, so nothing of its size is allocated.
at::Tensor not_asked(const at::Tensor& like) { return at::empty({0}, like.options()); }

using Outputs4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs4 mlce_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                          int64_t ignore_index, c10::string_view reduction, c10::optional<int64_t> num_supervised,
                          std::array<bool, 2> grad_in_forward) {
  const auto red = mlce::parse_reduction(mlce::kOp, reduction);
  mlce::check_args(mlce::kOp, hidden, weight, labels, num_supervised);
  const bool need_dh = grad_in_forward[0], need_dw = grad_in_forward[1];
  mlce::check_grad_in_forward(red, need_dh || need_dw);
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto acc_opts = hidden.options().dtype(acc);
  const auto sup = mlce::select_supervised(mlce::kOp, labels, ignore_index, V, num_supervised, acc);
  const auto gd = cpu_gemm::gemm_dtype(hidden.scalar_type());
  Stats st(sup.count, acc_opts);
  at::Tensor grad_hidden = need_dh ? at::zeros({T, H}, hidden.options()) : not_asked(hidden);
  at::Tensor grad_weight = not_asked(weight);
  if (sup.count > 0) {
    const auto h = hidden.index_select(0, sup.rows).to(gd).contiguous();
    const auto lab = sup.labels.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd, "masked_linear_cross_entropy_cpu", [&] {
      if (need_dh || need_dw) {
        const auto g = mlce::unit_row_grad_scale(sup, red, acc_opts);
        auto grads = forward_with_grad<scalar_t>(h, weight, lab, g, need_dh, need_dw, hidden.scalar_type(), st);
        if (need_dh) grad_hidden.index_copy_(0, sup.rows, grads.dh);
        if (need_dw) grad_weight = grads.dw;
      } else {
        forward_chunks<scalar_t>(h, weight, lab, st);
      }
    });
  } else if (need_dw) {
    grad_weight = at::zeros({V, H}, weight.options());
  }
  auto [loss, lse] = mlce::finalize_forward(mlce::lse_of(st.run_max, st.run_sum), st.target, sup, T, red);
  return {loss, lse, grad_hidden, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> mlce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                     const at::Tensor& weight, const at::Tensor& labels,
                                                     const at::Tensor& lse, int64_t ignore_index,
                                                     c10::string_view reduction,
                                                     c10::optional<int64_t> num_supervised,
                                                     std::array<bool, 2> output_mask) {
  const auto red = mlce::parse_reduction(mlce::kOpBwd, reduction);
  mlce::check_args(mlce::kOpBwd, hidden, weight, labels, num_supervised);
  mlce::check_backward_args(grad_loss, lse, hidden, red);
  const bool need_dh = output_mask[0], need_dw = output_mask[1];
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  auto grad_hidden = need_dh ? at::zeros({T, H}, hidden.options()) : not_asked(hidden);
  auto grad_weight = need_dw ? at::zeros({V, H}, weight.options()) : not_asked(weight);
  if (!need_dh && !need_dw) return {grad_hidden, grad_weight};
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto sup = mlce::select_supervised(mlce::kOpBwd, labels, ignore_index, V, num_supervised, acc);
  if (sup.count == 0) return {grad_hidden, grad_weight};
  const auto gd = cpu_gemm::gemm_dtype(hidden.scalar_type());
  const auto h = hidden.index_select(0, sup.rows).to(gd).contiguous();
  const auto lab = sup.labels.contiguous();
  const auto lse_sup = lse.index_select(0, sup.rows).contiguous();
  const auto g = mlce::row_grad_scale(grad_loss, sup, red, acc);
  Grads grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gd, "mlce_backward_cpu", [&] {
    grads = backward_chunks<scalar_t>(h, weight, lab, lse_sup, g, need_dh, need_dw);
  });
  if (need_dh) grad_hidden.index_copy_(0, sup.rows, grads.dh.to(hidden.scalar_type()));
  if (need_dw) grad_weight = grads.dw;
  return {grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) {
  m.impl("masked_linear_cross_entropy", &mlce_forward_cpu);
  m.impl("masked_linear_cross_entropy_backward", &mlce_backward_cpu);
}

}  // namespace vita_ext
