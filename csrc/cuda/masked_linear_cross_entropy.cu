// masked_linear_cross_entropy (+ _backward), CUDA: cross-entropy of hidden_states @ weight^T against
// labels without ever forming the [T, V] logits.
//
// Algorithm (mirrors cpu/masked_linear_cross_entropy.cpp):
//   select the M supervised rows (label != ignore_index; one host sync in nonzero, the label range
//   check rides on it) and gather them into h_sup [M, H] (operand dtype) with a row-gather kernel;
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
//             each row of dW is written by exactly one vocabulary chunk; dH_sup is scattered into a
//             zero [T, H] in the input dtype.
// Cost: forward 2*M*H*V FLOPs, backward 6*M*H*V; weight read once per (vocab chunk, row chunk)
// pair, i.e. ceil(M / mr) times. Long-VITA (H = 5120, V = 152064) at M = 4096: 19.1 TFLOP fwd+bwd.
// Extra device memory (beyond inputs and outputs), vc = VITA_EXT_CE_VOCAB_CHUNK (default 8192),
// mr = min(M, 256 MB / (4 vc)) (VITA_EXT_CE_ROW_CHUNK overrides), e = operand element size:
//   4*mr*vc (fp32 tile, <= 256 MB) + e*mr*vc (dl, half dtypes) + e*M*H (h_sup) + 4*M*H (dH_sup)
//   + 4*vc*H (dW buffer, only when M > mr) + O(M) row statistics.
// NOTE for a GPU session: check fwd+bwd against the 6*M*H*V FLOP bound (cuBLAS should run near peak
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

#include <limits>

#include "cuda/gemm.cuh"
#include "cuda/rows.cuh"
#include "masked_linear_cross_entropy.h"

namespace vita_ext {
namespace {

using mlce::Reduction;

constexpr int kThreads = 256;  // one block per logits row; a multiple of 32
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// (m, s) <- the (max, sum of exp(x - max)) of the union of two sets given by (m, s) and (m2, s2).
template <typename acc_t>
__device__ __forceinline__ void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m2 == neg_inf<acc_t>()) return;
  if (m == neg_inf<acc_t>()) {
    m = m2;
    s = s2;
    return;
  }
  const acc_t mx = m > m2 ? m : m2;
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

// h: [M, H] operand dtype (contiguous), w: rowmajor weight. Returns the per-row (running max,
// running sum of exp, target logit) [M] in the acc dtype.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_chunks(const at::Tensor& h, const at::Tensor& w,
                                                              const at::Tensor& labels) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = h.size(0), H = h.size(1), V = w.size(0), ldw = cuda_gemm::row_stride(w);
  const auto dtype = h.scalar_type(), acc = mlce::acc_dtype(dtype);
  const auto opts = h.options().dtype(acc);
  auto run_max = at::full({M}, -std::numeric_limits<double>::infinity(), opts);
  auto run_sum = at::zeros({M}, opts);
  auto target = at::zeros({M}, opts);
  const int64_t vchunk = mlce::vocab_chunk(V), rchunk = mlce::row_chunk(M, vchunk);
  auto tile = at::empty({rchunk * vchunk}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
    const int64_t vc = std::min(vchunk, V - c0);
    const auto wc = w.narrow(0, c0, vc);
    for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
      const int64_t mr = std::min(rchunk, M - r0);
      cuda_gemm::gemm(mr, vc, H, {h.narrow(0, r0, mr).data_ptr(), dtype, H, false}, {wc.data_ptr(), dtype, ldw, true},
                      tile.data_ptr(), acc, vc, 0.0);
      lse_update_kernel<acc_t><<<static_cast<unsigned>(mr), kThreads, 0, stream>>>(
          tile.data_ptr<acc_t>(), vc, c0, labels.data_ptr<int64_t>() + r0, run_max.data_ptr<acc_t>() + r0,
          run_sum.data_ptr<acc_t>() + r0, target.data_ptr<acc_t>() + r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {run_max, run_sum, target};
}

// Returns (dH_sup [M, H] acc dtype, dW [V, H] operand dtype).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward_chunks(const at::Tensor& h, const at::Tensor& w, const at::Tensor& labels,
                                                   const at::Tensor& lse, const at::Tensor& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = h.size(0), H = h.size(1), V = w.size(0), ldw = cuda_gemm::row_stride(w);
  const auto dtype = h.scalar_type(), acc = mlce::acc_dtype(dtype);
  const auto opts = h.options().dtype(acc);
  auto dh = at::zeros({M, H}, opts);
  auto dw = at::empty({V, H}, h.options());
  const int64_t vchunk = mlce::vocab_chunk(V), rchunk = mlce::row_chunk(M, vchunk);
  const bool multi = M > rchunk;
  auto tile = at::empty({rchunk * vchunk}, opts);
  auto dl = dtype == acc ? tile : at::empty({rchunk * vchunk}, h.options());
  auto dw_acc = multi ? at::empty({vchunk, H}, opts) : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
    const int64_t vc = std::min(vchunk, V - c0);
    const auto wc = w.narrow(0, c0, vc);
    for (int64_t r0 = 0; r0 < M; r0 += rchunk) {
      const int64_t mr = std::min(rchunk, M - r0);
      const auto hr = h.narrow(0, r0, mr);
      cuda_gemm::gemm(mr, vc, H, {hr.data_ptr(), dtype, H, false}, {wc.data_ptr(), dtype, ldw, true},
                      tile.data_ptr(), acc, vc, 0.0);
      softmax_grad_kernel<scalar_t, acc_t><<<static_cast<unsigned>(mr), kThreads, 0, stream>>>(
          tile.data_ptr<acc_t>(), dl.data_ptr<scalar_t>(), vc, c0, labels.data_ptr<int64_t>() + r0,
          lse.data_ptr<double>() + r0, g.data_ptr<acc_t>() + r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda_gemm::gemm(mr, H, vc, {dl.data_ptr(), dtype, vc, false}, {wc.data_ptr(), dtype, ldw, false},
                      dh.narrow(0, r0, mr).data_ptr(), acc, H, 1.0);
      if (multi) {
        cuda_gemm::gemm(vc, H, mr, {dl.data_ptr(), dtype, vc, true}, {hr.data_ptr(), dtype, H, false},
                        dw_acc.data_ptr(), acc, H, r0 == 0 ? 0.0 : 1.0);
      } else {
        cuda_gemm::gemm(vc, H, mr, {dl.data_ptr(), dtype, vc, true}, {hr.data_ptr(), dtype, H, false},
                        dw.narrow(0, c0, vc).data_ptr(), dtype, H, 0.0);
      }
    }
    if (multi) dw.narrow(0, c0, vc).copy_(dw_acc.narrow(0, 0, vc));
  }
  return {dh, dw};
}

std::tuple<at::Tensor, at::Tensor> mlce_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const at::Tensor& labels, int64_t ignore_index,
                                                     c10::string_view reduction) {
  const auto red = mlce::parse_reduction(mlce::kOp, reduction);
  mlce::check_args(mlce::kOp, hidden, weight, labels);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), V = weight.size(0);
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto sup = mlce::select_supervised(mlce::kOp, labels, ignore_index, V);
  at::Tensor run_max = at::zeros({sup.count}, hidden.options().dtype(acc)), run_sum = run_max, target = run_max;
  if (sup.count > 0) {
    const auto h = cuda_rows::gather_rows(hidden, sup.rows);
    const auto w = cuda_gemm::rowmajor(weight);
    const auto lab = sup.labels.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "mlce_forward_cuda", [&] {
      std::tie(run_max, run_sum, target) = forward_chunks<scalar_t>(h, w, lab);
    });
  }
  return mlce::finalize_forward(run_max, run_sum, target, sup, T, red);
}

std::tuple<at::Tensor, at::Tensor> mlce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                      const at::Tensor& weight, const at::Tensor& labels,
                                                      const at::Tensor& lse, int64_t ignore_index,
                                                      c10::string_view reduction) {
  const auto red = mlce::parse_reduction(mlce::kOpBwd, reduction);
  mlce::check_args(mlce::kOpBwd, hidden, weight, labels);
  mlce::check_backward_args(grad_loss, lse, hidden, red);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto acc = mlce::acc_dtype(hidden.scalar_type());
  const auto sup = mlce::select_supervised(mlce::kOpBwd, labels, ignore_index, V);
  auto grad_hidden = at::zeros({T, H}, hidden.options());
  if (sup.count == 0) return {grad_hidden, at::zeros({V, H}, weight.options())};
  const auto h = cuda_rows::gather_rows(hidden, sup.rows);
  const auto w = cuda_gemm::rowmajor(weight);
  const auto lab = sup.labels.contiguous();
  const auto lse_sup = lse.index_select(0, sup.rows).contiguous();
  const auto g = mlce::row_grad_scale(grad_loss, sup, red, acc).contiguous();
  at::Tensor dh, dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "mlce_backward_cuda", [&] {
    std::tie(dh, dw) = backward_chunks<scalar_t>(h, w, lab, lse_sup, g);
  });
  cuda_rows::scatter_rows(dh, sup.rows, grad_hidden);
  return {grad_hidden, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CUDA, m) {
  m.impl("masked_linear_cross_entropy", &mlce_forward_cuda);
  m.impl("masked_linear_cross_entropy_backward", &mlce_backward_cuda);
}

}  // namespace vita_ext
