// masked_linear_cross_entropy (+ _backward), CUDA: cross-entropy of hidden_states @ weight^T against
// labels without ever forming the [T, V] logits.
//
// Algorithm (mirrors cpu/masked_linear_cross_entropy.cpp):
//   select the M supervised rows (label != ignore_index; see masked_linear_cross_entropy.h: one host
//   sync in nonzero without num_supervised, none with it) and gather them into h_sup [M, H] (operand
//   dtype) with a row-gather kernel;
//   forward:  for each vocabulary chunk [c0, c0 + vc), for each row chunk of mr rows:
//               tile[mr, vc] (fp32) = h_sup[rows] @ W_c^T   (cublasGemmEx, bf16/fp16 in, fp32 out)
//               lse_update_kernel: one block per row folds the tile into the row's running
//               (max, sum of exp) and picks the target logit when its column is in the chunk;
//             lse = m + log(s) (fp64), loss_i = lse_i - target_i.
//   backward: vocabulary chunks outer, row chunks inner:
//               tile = h_sup[rows] @ W_c^T (recomputed, fp32);
//               softmax_grad_kernel: dl = g_i * (exp(tile - lse_i) - onehot), written in the
//               operand dtype (in place for fp32/fp64);
//               dH_sup[rows] (fp32) += dl @ W_c            (fp32-output GEMM, beta = 1: no rounding)
//               dW[c0 : c0 + vc] = dl^T @ h_sup            (one GEMM over all M rows, fp32
//               accumulation, one rounding to the weight dtype; with several row chunks, an fp32
//               [vc, H] buffer accumulates with beta = 1 and is rounded once per vocabulary chunk);
//             each GEMM only for a gradient autograd asks for (output_mask): a frozen LM head costs no
//             dW GEMM and no [V, H] buffer, a frozen trunk no dH GEMM. dH_sup is scattered into a zero
//             [T, H] in the input dtype.
//   grad_in_forward (the loss is backpropagated once, as in the training loop): row chunks of mr rows
//             outer, each over the whole vocabulary: tile[mr, V] = h_r @ W^T, lse_update over the row,
//             lse, softmax_grad in place, dH_r = dl @ W (fp32), dW (+)= dl^T @ h_r (fp32 [V, H]
//             accumulator when there are several row chunks); the backward scales what was stored.
// FLOPs, per gradient (M supervised rows):
//   forward 2*M*H*V.
//   backward (recompute): 2*M*H*V for the logits, + 2*M*H*V for dH, + 2*M*H*V for dW -> 6*M*H*V with
//     both, 4*M*H*V with a frozen head (stage 1), 8*M*H*V per step with the forward.
//   grad_in_forward: forward 2*M*H*V + 2*M*H*V for dH + 2*M*H*V for dW -> 6*M*H*V per step with both
//     (4*M*H*V with a frozen head); its backward is one scale of the stored gradients (O(T*H + V*H)).
//   Long-VITA (H = 5120, V = 152064) at M = 4096: 25.5 TFLOP per step recomputing, 19.1 TFLOP with
//   grad_in_forward.
// Weight read once per (vocab chunk, row chunk) pair, i.e. ceil(M / mr) times.
// Extra device memory (beyond inputs and outputs), vc = VITA_EXT_CE_VOCAB_CHUNK (default 8192),
// mr = min(M, 256 MB / (4 vc)) (VITA_EXT_CE_ROW_CHUNK overrides), e = operand element size:
//   4*mr*vc (fp32 tile, <= 256 MB) + e*mr*vc (dl, half dtypes) + e*M*H (h_sup) + 4*M*H (dH_sup)
//   + 4*vc*H (dW buffer, only when M > mr and dW is asked for) + O(M) row statistics.
//   grad_in_forward: mr = min(M, 256 MB / (4 V)); 4*mr*V + e*mr*V (tile, dl) + e*M*H + 4*M*H
//   + 4*V*H (dW accumulator, only when M > mr), and the stored gradients until the backward.
// NOTE for a GPU session: check fwd+bwd against the FLOP counts above (cuBLAS should run near peak
// at mr, vc = 8192); tune vc (8192 vs 16384) and the tile budget; the element-wise kernels touch the
// tile once or twice and should be < 10% of the GEMM time -- if not, fuse the lse update into a
// cuBLASLt epilogue or vectorise the loads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "cuda/gemm.cuh"
#include "cuda/rows.cuh"
#include "masked_linear_cross_entropy.h"

namespace vita_ext {
namespace {

using mlce::Reduction;

constexpr int kThreads = 256;  // one block per logits row; a multiple of 32
constexpr int kWarps = kThreads / 32;
constexpr int64_t kVocabChunk = 8192;
constexpr int64_t kTileBudgetBytes = int64_t(256) << 20;  // one fp32 logits tile

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// NaN-propagating max: a NaN logit must make the row's statistics NaN, as in PyTorch.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (b > a || b != b) ? b : a;
}

// (m, s) <- the (max, sum of exp(x - max)) of the union of two sets given by (m, s) and (m2, s2).
// A set whose max is -inf adds nothing; NaN in either max makes both NaN.
template <typename acc_t>
__device__ __forceinline__ void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m2 == neg_inf<acc_t>()) return;
  if (m == neg_inf<acc_t>()) {
    m = m2;
    s = s2;
    return;
  }
  const acc_t mx = nan_max(m, m2);
  s = s * dev_exp(m - mx) + s2 * dev_exp(m2 - mx);
  m = mx;
}

// Folds row `blockIdx.x` of the tile ([rows, vc], row stride vc) into run_max/run_sum of that row;
// target[row] gets the logit of labels[row] if it falls in [c0, c0 + vc).
template <typename acc_t>
__global__ void lse_update_kernel(const acc_t* tile, int64_t vc, int64_t c0, const int64_t* labels, acc_t* run_max,
                                  acc_t* run_sum, acc_t* target) {
  const int64_t row = blockIdx.x;
  const acc_t* x = tile + row * vc;
  acc_t m = neg_inf<acc_t>(), s = 0;
  for (int64_t j = threadIdx.x; j < vc; j += blockDim.x) lse_merge(m, s, x[j], acc_t(1));
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  __shared__ acc_t sh_m[kWarps];
  __shared__ acc_t sh_s[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
  __syncthreads();
  if (warp != 0) return;
  m = lane < kWarps ? sh_m[lane] : neg_inf<acc_t>();
  s = lane < kWarps ? sh_s[lane] : acc_t(0);
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  if (lane != 0) return;
  acc_t rm = run_max[row], rs = run_sum[row];
  lse_merge(rm, rs, m, s);
  run_max[row] = rm;
  run_sum[row] = rs;
  const int64_t col = labels[row] - c0;
  if (col >= 0 && col < vc) target[row] = x[col];
}

// dl[row, j] = g[row] * (exp(tile[row, j] - lse[row]) - [c0 + j == labels[row]]) in the operand
// dtype; one block per row. The exponent is formed in fp64 (one subtraction; lse is fp64 so that its
// rounding does not scale the whole row) and rounded to acc_t before the exp. dl may alias tile
// (fp32/fp64): each element is read before it is written, by the same thread.
template <typename scalar_t, typename acc_t>
__global__ void softmax_grad_kernel(const acc_t* tile, scalar_t* dl, int64_t vc, int64_t c0, const int64_t* labels,
                                    const double* lse, const acc_t* g) {
  const int64_t row = blockIdx.x;
  const int64_t base = row * vc;
  const double l = lse[row];
  const acc_t gi = g[row];
  const int64_t col = labels[row] - c0;
  for (int64_t j = threadIdx.x; j < vc; j += blockDim.x) {
    const acc_t z = static_cast<acc_t>(static_cast<double>(tile[base + j]) - l);
    const acc_t p = dev_exp(z) - (j == col ? acc_t(1) : acc_t(0));
    dl[base + j] = static_cast<scalar_t>(gi * p);
  }
}

// Row statistics of the forward: running max, running sum of exp, target logit (NaN until found, so
// a label outside [0, V) on the unchecked path gives a NaN loss).
struct Stats {
  at::Tensor run_max, run_sum, target;
  Stats(int64_t M, const at::TensorOptions& acc_opts)
      : run_max(at::full({M}, -std::numeric_limits<double>::infinity(), acc_opts)),
        run_sum(at::zeros({M}, acc_opts)),
        target(at::full({M}, std::numeric_limits<double>::quiet_NaN(), acc_opts)) {}
};

template <typename acc_t>
void launch_lse_update(const at::Tensor& tile, int64_t rows, int64_t vc, int64_t c0, const at::Tensor& labels,
                       int64_t r0, Stats& st) {
  lse_update_kernel<acc_t><<<static_cast<unsigned>(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      tile.data_ptr<acc_t>(), vc, c0, labels.data_ptr<int64_t>() + r0, st.run_max.data_ptr<acc_t>() + r0,
      st.run_sum.data_ptr<acc_t>() + r0, st.target.data_ptr<acc_t>() + r0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_softmax_grad(const at::Tensor& tile, at::Tensor& dl, int64_t rows, int64_t vc, int64_t c0,
                         const at::Tensor& labels, int64_t r0, const double* lse, const at::Tensor& g) {
  softmax_grad_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      tile.data_ptr<acc_t>(), dl.data_ptr<scalar_t>(), vc, c0, labels.data_ptr<int64_t>() + r0, lse,
      g.data_ptr<acc_t>() + r0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// h: [M, H] operand dtype (contiguous), w: rowmajor weight. Fills the per-row statistics.
template <typename scalar_t>
void forward_chunks(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels, Stats& st) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = h.size(0), H = h.size(1), V = w.size(0), ldw = cuda_gemm::row_stride(w);
  const auto dtype = h.scalar_type(), acc = mlce::acc_dtype(dtype);
  const int64_t vchunk = mlce::vocab_chunk(V, kVocabChunk);
  const int64_t rchunk = mlce::row_chunk(M, vchunk, 4, kTileBudgetBytes);
  auto tile = at::empty({rchunk * vchunk}, h.options().dtype(acc));
  for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
    const int64_t vc = std::min(vchunk, V - c0);
    const auto wc = w.narrow(0, c0, vc);
    for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
      const int64_t mr = std::min(rchunk, M - r0);
      cuda_gemm::gemm(mr, vc, H, {h.narrow(0, r0, mr).data_ptr(), dtype, H, false}, {wc.data_ptr(), dtype, ldw, true},
                      tile.data_ptr(), acc, vc, 0.0);
      launch_lse_update<acc_t>(tile, mr, vc, c0, labels, r0, st);
    }
  }
}

struct Grads {
  at::Tensor dh;  // [M, H] acc dtype, the supervised rows (undefined when not asked for)
  at::Tensor dw;  // [V, H] operand dtype (undefined when not asked for)
};

// Backward with recomputed logits; only the GEMMs of the gradients asked for run.
template <typename scalar_t>
Grads backward_chunks(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& lse,
                      const at::Tensor& g, bool need_dh, bool need_dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = h.size(0), H = h.size(1), V = w.size(0), ldw = cuda_gemm::row_stride(w);
  const auto dtype = h.scalar_type(), acc = mlce::acc_dtype(dtype);
  const auto opts = h.options().dtype(acc);
  Grads out;
  if (need_dh) out.dh = at::zeros({M, H}, opts);
  if (need_dw) out.dw = at::empty({V, H}, h.options());
  const int64_t vchunk = mlce::vocab_chunk(V, kVocabChunk);
  const int64_t rchunk = mlce::row_chunk(M, vchunk, 4, kTileBudgetBytes);
  const bool multi = M > rchunk;
  auto tile = at::empty({rchunk * vchunk}, opts);
  auto dl = dtype == acc ? tile : at::empty({rchunk * vchunk}, h.options());
  auto dw_acc = multi && need_dw ? at::empty({vchunk, H}, opts) : at::Tensor();
  for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
    const int64_t vc = std::min(vchunk, V - c0);
    const auto wc = w.narrow(0, c0, vc);
    for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
      const int64_t mr = std::min(rchunk, M - r0);
      const auto hr = h.narrow(0, r0, mr);
      cuda_gemm::gemm(mr, vc, H, {hr.data_ptr(), dtype, H, false}, {wc.data_ptr(), dtype, ldw, true},
                      tile.data_ptr(), acc, vc, 0.0);
      launch_softmax_grad<scalar_t, acc_t>(tile, dl, mr, vc, c0, labels, r0, lse.data_ptr<double>() + r0, g);
      if (need_dh) {
        cuda_gemm::gemm(mr, H, vc, {dl.data_ptr(), dtype, vc, false}, {wc.data_ptr(), dtype, ldw, false},
                        out.dh.narrow(0, r0, mr).data_ptr(), acc, H, 1.0);
      }
      if (need_dw && multi) {
        cuda_gemm::gemm(vc, H, mr, {dl.data_ptr(), dtype, vc, true}, {hr.data_ptr(), dtype, H, false},
                        dw_acc.data_ptr(), acc, H, r0 == 0 ? 0.0 : 1.0);
      } else if (need_dw) {
        cuda_gemm::gemm(vc, H, mr, {dl.data_ptr(), dtype, vc, true}, {hr.data_ptr(), dtype, H, false},
                        out.dw.narrow(0, c0, vc).data_ptr(), dtype, H, 0.0);
      }
    }
    if (need_dw && multi) out.dw.narrow(0, c0, vc).copy_(dw_acc.narrow(0, 0, vc));
  }
  return out;
}

// grad_in_forward: row chunks outer over the whole vocabulary. Fills st and returns the gradients of
// the loss for a unit upstream gradient (g = dloss/dloss_i).
template <typename scalar_t>
Grads forward_with_grad(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels, const at::Tensor& g,
                        bool need_dh, bool need_dw, Stats& st) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = h.size(0), H = h.size(1), V = w.size(0), ldw = cuda_gemm::row_stride(w);
  const auto dtype = h.scalar_type(), acc = mlce::acc_dtype(dtype);
  const auto opts = h.options().dtype(acc);
  const int64_t rchunk = mlce::row_chunk(M, V, 4, kTileBudgetBytes);
  const bool multi = M > rchunk;
  Grads out;
  if (need_dh) out.dh = at::empty({M, H}, opts);
  if (need_dw) out.dw = at::empty({V, H}, h.options());
  auto tile = at::empty({rchunk * V}, opts);
  auto dl = dtype == acc ? tile : at::empty({rchunk * V}, h.options());
  auto dw_acc = multi && need_dw ? at::empty({V, H}, opts) : at::Tensor();
  for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
    const int64_t mr = std::min(rchunk, M - r0);
    const auto hr = h.narrow(0, r0, mr);
    cuda_gemm::gemm(mr, V, H, {hr.data_ptr(), dtype, H, false}, {w.data_ptr(), dtype, ldw, true}, tile.data_ptr(),
                    acc, V, 0.0);
    launch_lse_update<acc_t>(tile, mr, V, 0, labels, r0, st);
    const auto lse = mlce::lse_of(st.run_max.narrow(0, r0, mr), st.run_sum.narrow(0, r0, mr)).contiguous();
    // g is indexed from r0 inside the launch; lse is this chunk's own [mr] tensor.
    launch_softmax_grad<scalar_t, acc_t>(tile, dl, mr, V, 0, labels, r0, lse.data_ptr<double>(), g);
    if (need_dh) {
      cuda_gemm::gemm(mr, H, V, {dl.data_ptr(), dtype, V, false}, {w.data_ptr(), dtype, ldw, false},
                      out.dh.narrow(0, r0, mr).data_ptr(), acc, H, 0.0);
    }
    if (need_dw && multi) {
      cuda_gemm::gemm(V, H, mr, {dl.data_ptr(), dtype, V, true}, {hr.data_ptr(), dtype, H, false}, dw_acc.data_ptr(),
                      acc, H, r0 == 0 ? 0.0 : 1.0);
    } else if (need_dw) {
      cuda_gemm::gemm(V, H, mr, {dl.data_ptr(), dtype, V, true}, {hr.data_ptr(), dtype, H, false}, out.dw.data_ptr(),
                      dtype, H, 0.0);
    }
  }
  if (need_dw && multi) out.dw.copy_(dw_acc);
  return out;
}

// An output the caller did not ask for: empty, so nothing of its size is allocated.
at::Tensor not_asked(const at::Tensor& like) { return at::empty({0}, like.options()); }

using Outputs4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs4 mlce_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                           int64_t ignore_index, c10::string_view reduction, c10::optional<int64_t> num_supervised,
                           std::array<bool, 2> grad_in_forward) {
  const auto red = mlce::parse_reduction(mlce::kOp, reduction);
  mlce::check_args(mlce::kOp, hidden, weight, labels, num_supervised);
  const bool need_dh = grad_in_forward[0], need_dw = grad_in_forward[1];
  mlce::check_grad_in_forward(red, need_dh || need_dw);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto acc_opts = hidden.options().dtype(acc);
  const auto sup = mlce::select_supervised(mlce::kOp, labels, ignore_index, V, num_supervised, acc);
  Stats st(sup.count, acc_opts);
  at::Tensor grad_hidden = need_dh ? at::zeros({T, H}, hidden.options()) : not_asked(hidden);
  at::Tensor grad_weight = not_asked(weight);
  if (sup.count > 0) {
    const auto h = cuda_rows::gather_rows(hidden, sup.rows);
    const auto w = cuda_gemm::rowmajor(weight);
    const auto lab = sup.labels.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "mlce_forward_cuda", [&] {
      if (need_dh || need_dw) {
        const auto g = mlce::unit_row_grad_scale(sup, red, acc_opts);
        auto grads = forward_with_grad<scalar_t>(h, w, lab, g, need_dh, need_dw, st);
        if (need_dh) cuda_rows::scatter_rows(grads.dh, sup.rows, grad_hidden);
        if (need_dw) grad_weight = grads.dw;
      } else {
        forward_chunks<scalar_t>(h, w, lab, st);
      }
    });
  } else if (need_dw) {
    grad_weight = at::zeros({V, H}, weight.options());
  }
  auto [loss, lse] = mlce::finalize_forward(mlce::lse_of(st.run_max, st.run_sum), st.target, sup, T, red);
  return {loss, lse, grad_hidden, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> mlce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                      const at::Tensor& weight, const at::Tensor& labels,
                                                      const at::Tensor& lse, int64_t ignore_index,
                                                      c10::string_view reduction,
                                                      c10::optional<int64_t> num_supervised,
                                                      std::array<bool, 2> output_mask) {
  const auto red = mlce::parse_reduction(mlce::kOpBwd, reduction);
  mlce::check_args(mlce::kOpBwd, hidden, weight, labels, num_supervised);
  mlce::check_backward_args(grad_loss, lse, hidden, red);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const bool need_dh = output_mask[0], need_dw = output_mask[1];
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  auto grad_hidden = need_dh ? at::zeros({T, H}, hidden.options()) : not_asked(hidden);
  auto grad_weight = need_dw ? at::zeros({V, H}, weight.options()) : not_asked(weight);
  if (!need_dh && !need_dw) return {grad_hidden, grad_weight};
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto sup = mlce::select_supervised(mlce::kOpBwd, labels, ignore_index, V, num_supervised, acc);
  if (sup.count == 0) return {grad_hidden, grad_weight};
  const auto h = cuda_rows::gather_rows(hidden, sup.rows);
  const auto w = cuda_gemm::rowmajor(weight);
  const auto lab = sup.labels.contiguous();
  const auto lse_sup = lse.index_select(0, sup.rows).contiguous();
  const auto g = mlce::row_grad_scale(grad_loss, sup, red, acc);
  Grads grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "mlce_backward_cuda", [&] {
    grads = backward_chunks<scalar_t>(h, w, lab, lse_sup, g, need_dh, need_dw);
  });
  if (need_dh) cuda_rows::scatter_rows(grads.dh, sup.rows, grad_hidden);
  if (need_dw) grad_weight = grads.dw;
  return {grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CUDA, m) {
  m.impl("masked_linear_cross_entropy", &mlce_forward_cuda);
  m.impl("masked_linear_cross_entropy_backward", &mlce_backward_cuda);
}

}  // namespace vita_ext
