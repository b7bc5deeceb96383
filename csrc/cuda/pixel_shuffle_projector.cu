// pixel_shuffle_projector on CUDA: y = gelu(layer_norm(pixel_shuffle(x)) @ w1^T + b1) @ w2^T + b2.
//
// NOTE for the first GPU session. Verify first: python_tests/test_pixel_shuffle_projector.py on
// cuda (forward, backward, opcheck, non-contiguous x), in particular the vectorised LayerNorm path
// (C % 8 == 0 with aligned strides: Long-VITA's C = 1024, slice vit_out[:, 1:, :]) and the scalar
// fallback (C = 3 in test_pixel_shuffle_order). Then measure on [64, 1024, 1024] bf16 against the
// reference (torch.compile'd and eager). Issue-4 tuning would try: the GELU (and b1) as the epilogue
// of GEMM1 (cuBLASLt CUBLASLT_EPILOGUE_GELU_BIAS or a custom kernel) so h1 never goes to memory in
// fp32; b2 as a cuBLASLt bias epilogue instead of pre-filling y; the LayerNorm row kept in registers
// (one read of x instead of three); larger chunks or none (kChunkRows); in the backward, fusing
// gelu' into the dg GEMM epilogue and the dln_* column sums into the LayerNorm-backward kernel.
//
// Algorithm (forward, per chunk of kChunkRows shuffled rows):
//   1. shuffle_layernorm: one warp per shuffled row reads its four C-long runs straight from x
//      (16-byte loads when aligned), fp32 mean/variance (two passes over the row, third pass writes),
//      writes xn in x's dtype. This is the GEMM operand; the shuffled raw x is never written.
//   2. h1 = xn @ w1^T            cublasGemmEx, x-dtype operands, fp32 output and compute.
//   3. bias_gelu: g = gelu_erf(h1 + b1) in x's dtype.
//   4. y = g @ w2^T (+ b2)       cublasGemmEx, output in x's dtype (b2 pre-filled, beta = 1).
// Backward (per chunk; xn, the pre-activation h, g and the LayerNorm statistics come from the forward
// when it saved them (save_activations), else xn and h1 are recomputed from the inputs): dW2 += dy^T g,
// db2 += colsum(dy), dg = dy w2 (fp32), dh = dg * gelu'(h), dW1 += dh^T xn, db1 += colsum(dh), dxn = dh w1
// (fp32), dln_weight += colsum(dxn * xhat), dln_bias += colsum(dxn) (per-slab partials then an ordered
// second pass: deterministic, no atomics), and layernorm_backward_unshuffle writes
// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dxn * ln_weight, into the
// four runs of x's layout (runs of different rows are disjoint: no races). Each step runs only for the
// gradients asked for (output_mask); a frozen ViT (x without grad) costs no dx buffer and no
// LayerNorm-backward kernel, frozen Linear weights no dW GEMMs.
//
// Cost, M = N*L/4 rows, K = 4C: forward 2*M*(K*D1 + D1*D2) FLOPs. DRAM bytes at bf16: x 2*M*K (read
// three times, the 2nd and 3rd mostly from L1/L2), xn 2*2*M*K (written, read), h1 2*4*M*D1 (fp32),
// g 2*2*M*D1, y 2*M*D2, plus the weights once per chunk.
// Backward FLOPs, per gradient: dW2 2*M*D1*D2; dW1 (and db1) 2*M*D1*D2 (dg) + 2*M*K*D1; dx, dln_weight,
// dln_bias additionally 2*M*K*D1 (dxn); all: 2*M*(2*K*D1 + 2*D1*D2). Without saved activations add
// 2*M*K*D1 for the recomputed h1 (when any GEMM gradient is asked for): ~2.5x the forward's in all,
// plus O(M*(K + D1)) fp32 traffic (dxn, dg, h1). Saved activations cost M*(K + 2*D1) elements of x's
// dtype + 2*M fp32 (Long-VITA, 4096 tiles: ~13 GB at bf16), which is why the default on CUDA recomputes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cuda/pixel_shuffle_projector_kernels.cuh"
#include "pixel_shuffle_projector.h"

namespace vita_ext {
namespace {

using namespace psp_cuda;  // the kernels and constants of cuda/pixel_shuffle_projector_kernels.cuh

// ------------------------------------------------------------------------------------------ GEMM

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: break;
  }
  TORCH_CHECK(false, "vita_ext::pixel_shuffle_projector: no cuBLAS type for ", dtype_name(t));
  return CUDA_R_32F;
}

// Row-major GEMM through cuBLAS (column-major): C[M,N] = alpha * op(A)[M,K] @ op(B)[K,N] + beta * C.
// A row-major matrix with row length ld is, read column-major with leading dimension ld, its own
// transpose. So C^T = op(B)^T @ op(A)^T is a column-major product with the operands swapped:
// cuBLAS gets (B, transB) first and (A, transA) second, with m = N and n = M. lda/ldb/ldc are the
// row lengths of A, B, C as stored (A is stored [M, K] when !transA, [K, M] when transA).
// Operands A and B share ab_type; compute is fp32 (fp64 for fp64 operands). For fp32 operands cuBLAS
// follows torch.backends.cuda.matmul.allow_tf32 through the handle's math mode (off by default).
void gemm_rowmajor(bool transA, bool transB, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda,
                   const void* B, int64_t ldb, cudaDataType_t ab_type, void* C, int64_t ldc, cudaDataType_t c_type,
                   double alpha, double beta) {
  if (M == 0 || N == 0) return;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const bool fp64 = ab_type == CUDA_R_64F;
  const float alpha_f = static_cast<float>(alpha), beta_f = static_cast<float>(beta);
  const void* pa = fp64 ? static_cast<const void*>(&alpha) : static_cast<const void*>(&alpha_f);
  const void* pb = fp64 ? static_cast<const void*>(&beta) : static_cast<const void*>(&beta_f);
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), pa, B, ab_type,
                                    static_cast<int>(ldb), A, ab_type, static_cast<int>(lda), pb, C, c_type,
                                    static_cast<int>(ldc), fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------- launches

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// LayerNorm of shuffled rows [m0, m0 + rows) into xn; mean/rstd (acc dtype) written when not null.
template <typename scalar_t>
void launch_shuffle_layernorm(const at::Tensor& x, const PspGeom& geo, const PspDims& d, int64_t m0, int64_t rows,
                              const at::Tensor& w, const at::Tensor& b, double eps, scalar_t* xn,
                              at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = d.C % kVec == 0 && geo.s0 % kVec == 0 && geo.s1 % kVec == 0 && aligned16(x.data_ptr()) &&
                   aligned16(w.data_ptr()) && aligned16(b.data_ptr()) && aligned16(xn);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kWarpsPerBlock))), block(32 * kWarpsPerBlock);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto kernel) {
    kernel<<<grid, block, 0, stream>>>(x.data_ptr<scalar_t>(), geo, d.C, m0, rows, w.data_ptr<scalar_t>(),
                                       b.data_ptr<scalar_t>(), static_cast<acc_t>(eps), xn, mean, rstd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec)
    run(shuffle_layernorm_kernel<scalar_t, kVec>);
  else
    run(shuffle_layernorm_kernel<scalar_t, 1>);
}

unsigned elt_blocks(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kEltThreads), 65535)); }

template <typename scalar_t>
void launch_bias_gelu(const at::Tensor& h, const scalar_t* bias, int64_t rows, int64_t D1, scalar_t* g,
                      scalar_t* h_out) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = rows * D1;
  if (D1 % 4 == 0) {
    bias_gelu_kernel<scalar_t, 4><<<elt_blocks(n / 4), kEltThreads, 0, stream>>>(h.data_ptr<acc_t>(), bias, n / 4,
                                                                                   D1, g, h_out);
  } else {
    bias_gelu_kernel<scalar_t, 1><<<elt_blocks(n), kEltThreads, 0, stream>>>(h.data_ptr<acc_t>(), bias, n, D1, g,
                                                                               h_out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// h: the fp32 recomputed pre-activation with bias separate, or the saved one (x's dtype, bias = null).
template <typename scalar_t, typename h_t>
void launch_gelu_backward(const h_t* h, const scalar_t* bias, int64_t rows, int64_t D1, at::Tensor& dg,
                          scalar_t* dh_s) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = rows * D1;
  if (D1 % 4 == 0) {
    gelu_backward_kernel<scalar_t, h_t, 4><<<elt_blocks(n / 4), kEltThreads, 0, stream>>>(
        h, bias, n / 4, D1, dg.data_ptr<acc_t>(), dh_s);
  } else {
    gelu_backward_kernel<scalar_t, h_t, 1><<<elt_blocks(n), kEltThreads, 0, stream>>>(h, bias, n, D1,
                                                                                        dg.data_ptr<acc_t>(), dh_s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[c] += sum_r in[r, c] for a contiguous [rows, cols] matrix; partial holds >= slabs * cols.
template <typename T, typename acc_t>
void column_sums(const T* in, int64_t rows, int64_t cols, acc_t* partial, acc_t* out) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t slabs = ceil_div(rows, kSlabRows);
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, kColTile)), static_cast<unsigned>(slabs));
  colsum_partial_kernel<T, acc_t><<<grid, dim3(kColTile, kRowThreads), 0, stream>>>(in, rows, cols, partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  colsum_finish_kernel<acc_t><<<elt_blocks(cols), kEltThreads, 0, stream>>>(partial, slabs, cols, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------- host ops

struct Params {
  at::Tensor lnw, lnb, w1, b1, w2, b2;  // contiguous; b1/b2 undefined when absent
};

Params contiguous_params(const at::Tensor& lnw, const at::Tensor& lnb, const at::Tensor& w1,
                         const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                         const c10::optional<at::Tensor>& b2) {
  Params p{lnw.contiguous(), lnb.contiguous(), w1.contiguous(), at::Tensor(), w2.contiguous(), at::Tensor()};
  if (b1.has_value()) p.b1 = b1->contiguous();
  if (b2.has_value()) p.b2 = b2->contiguous();
  return p;
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

void check_blas_sizes(const char* op, const PspDims& d) {
  TORCH_CHECK(d.K <= INT_MAX && d.D1 <= INT_MAX && d.D2 <= INT_MAX, op,
              ": 4C, D1 and D2 must each be < 2^31 for cuBLAS, got 4C = ", d.K, ", D1 = ", d.D1, ", D2 = ", d.D2);
}

using Outputs5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs5 forward_cuda(const at::Tensor& x_in, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                      const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                      const c10::optional<at::Tensor>& b2, double eps, bool save) {
  const char* op = "vita_ext::pixel_shuffle_projector";
  const PspDims d = check_pixel_shuffle_projector_args(op, x_in, ln_weight, ln_bias, w1, b1, w2, b2);
  check_blas_sizes(op, d);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = psp_acc_dtype(x_in.scalar_type());
  at::Tensor y = at::empty({d.N, d.T, d.D2}, x_in.options());
  PspSaved s;
  if (save) {
    s = PspSaved{at::empty({d.M, d.K}, x_in.options()), at::empty({d.M, d.D1}, x_in.options()),
                 at::empty({d.M, d.D1}, x_in.options()), at::empty({2, d.M}, x_in.options().dtype(acc)), true};
  }
  auto outputs = [&]() -> Outputs5 {
    if (!save) return {y, psp_not_asked(x_in), psp_not_asked(x_in), psp_not_asked(x_in), psp_not_asked(x_in)};
    return {y, s.xn, s.h, s.g, s.stats};
  };
  if (d.M == 0) return outputs();
  const at::Tensor x = psp_inner_contiguous(x_in);
  const PspGeom geo = psp_geom(d, x);
  const Params p = contiguous_params(ln_weight, ln_bias, w1, b1, w2, b2);
  const cudaDataType_t ab = cuda_type(x.scalar_type());
  at::Tensor y2 = y.view({d.M, d.D2});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_projector_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t chunk = std::min(kChunkRows, d.M);
    // Chunk temporaries; with save_activations xn, g (and h in x's dtype) go to the saved tensors.
    at::Tensor xn_buf = save ? at::Tensor() : at::empty({chunk, d.K}, x.options());
    at::Tensor h1 = at::empty({chunk, d.D1}, x.options().dtype(acc));
    at::Tensor g_buf = save ? at::Tensor() : at::empty({chunk, d.D1}, x.options());
    for (int64_t m0 = 0; m0 < d.M; m0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, d.M - m0);
      scalar_t* xn = save ? s.xn.data_ptr<scalar_t>() + m0 * d.K : xn_buf.data_ptr<scalar_t>();
      scalar_t* g = save ? s.g.data_ptr<scalar_t>() + m0 * d.D1 : g_buf.data_ptr<scalar_t>();
      acc_t* mean = save ? s.stats.data_ptr<acc_t>() + m0 : nullptr;
      acc_t* rstd = save ? s.stats.data_ptr<acc_t>() + d.M + m0 : nullptr;
      launch_shuffle_layernorm<scalar_t>(x, geo, d, m0, rows, p.lnw, p.lnb, eps, xn, mean, rstd);
      gemm_rowmajor(false, true, rows, d.D1, d.K, xn, d.K, p.w1.data_ptr(), d.K, ab, h1.data_ptr(), d.D1,
                    cuda_type(acc), 1.0, 0.0);
      launch_bias_gelu<scalar_t>(h1, ptr_or_null<scalar_t>(p.b1), rows, d.D1, g,
                                 save ? s.h.data_ptr<scalar_t>() + m0 * d.D1 : nullptr);
      at::Tensor yc = y2.narrow(0, m0, rows);  // whole rows of a contiguous tensor: contiguous
      if (p.b2.defined()) yc.copy_(p.b2.unsqueeze(0).expand({rows, d.D2}));
      gemm_rowmajor(false, true, rows, d.D2, d.D1, g, d.D1, p.w2.data_ptr(), d.D1, ab, yc.data_ptr(), d.D2, ab, 1.0,
                    p.b2.defined() ? 1.0 : 0.0);
    }
  });
  return outputs();
}

// A gradient shaped and strided like the fake kernel's output (empty_like of the parameter).
at::Tensor like(const at::Tensor& proto, const at::Tensor& acc) { return at::empty_like(proto).copy_(acc); }

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Accumulators of the parameter gradients asked for (fp32, fp64 for fp64 inputs), summed over chunks;
// undefined for the others.
struct GradAcc {
  at::Tensor dlnw, dlnb, dw1, db1, dw2, db2;
};

template <typename scalar_t>
void backward_chunk(const at::Tensor& x, const PspGeom& geo, at::Tensor& dx, const PspGeom& dgeo, const PspDims& d,
                    const Params& p, const PspSaved& s, const PspNeeds& need, const at::Tensor& gy, double eps,
                    int64_t m0, int64_t rows, GradAcc& acc_g, at::Tensor& partial_a, at::Tensor& partial_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const bool same = std::is_same<scalar_t, acc_t>::value;
  const cudaDataType_t ab = cuda_type(x.scalar_type()), ct = cuda_type(acc);
  const auto sopt = x.options(), aopt = x.options().dtype(acc);
  const scalar_t* b1 = ptr_or_null<scalar_t>(p.b1);

  // The chunk's activations: saved by the forward, or recomputed (only when a GEMM below needs them).
  const scalar_t* xn = nullptr;
  const scalar_t* g = nullptr;
  const acc_t* mean = nullptr;
  const acc_t* rstd = nullptr;
  at::Tensor xn_t, g_t, h1, mean_t, rstd_t;
  if (s.present) {
    xn = s.xn.data_ptr<scalar_t>() + m0 * d.K;
    g = s.g.data_ptr<scalar_t>() + m0 * d.D1;
    mean = s.stats.data_ptr<acc_t>() + m0;
    rstd = s.stats.data_ptr<acc_t>() + d.M + m0;
  } else if (need.dw2 || need.dh()) {
    xn_t = at::empty({rows, d.K}, sopt);
    mean_t = at::empty({rows}, aopt);
    rstd_t = at::empty({rows}, aopt);
    launch_shuffle_layernorm<scalar_t>(x, geo, d, m0, rows, p.lnw, p.lnb, eps, xn_t.data_ptr<scalar_t>(),
                                       mean_t.data_ptr<acc_t>(), rstd_t.data_ptr<acc_t>());
    h1 = at::empty({rows, d.D1}, aopt);
    gemm_rowmajor(false, true, rows, d.D1, d.K, xn_t.data_ptr(), d.K, p.w1.data_ptr(), d.K, ab, h1.data_ptr(), d.D1,
                  ct, 1.0, 0.0);
    g_t = at::empty({rows, d.D1}, sopt);
    launch_bias_gelu<scalar_t>(h1, b1, rows, d.D1, g_t.data_ptr<scalar_t>(), nullptr);
    xn = xn_t.data_ptr<scalar_t>();
    g = g_t.data_ptr<scalar_t>();
    mean = mean_t.data_ptr<acc_t>();
    rstd = rstd_t.data_ptr<acc_t>();
  }

  const at::Tensor dy = gy.narrow(0, m0, rows);  // contiguous rows
  if (need.dw2) {
    gemm_rowmajor(true, false, d.D2, d.D1, rows, dy.data_ptr(), d.D2, g, d.D1, ab, acc_g.dw2.data_ptr(), d.D1, ct,
                  1.0, 1.0);  // dW2 += dy^T g
  }
  if (need.db2) {
    column_sums<scalar_t, acc_t>(dy.data_ptr<scalar_t>(), rows, d.D2, partial_a.data_ptr<acc_t>(),
                                 acc_g.db2.data_ptr<acc_t>());
  }
  if (!need.dh()) return;

  at::Tensor dg = at::empty({rows, d.D1}, aopt);
  gemm_rowmajor(false, false, rows, d.D1, d.D2, dy.data_ptr(), d.D2, p.w2.data_ptr(), d.D1, ab, dg.data_ptr(), d.D1,
                ct, 1.0, 0.0);  // dg = dy w2
  at::Tensor dh_s = same ? dg : at::empty({rows, d.D1}, sopt);  // dh as a GEMM operand in x's dtype
  scalar_t* dh_out = same ? nullptr : dh_s.data_ptr<scalar_t>();
  if (s.present) {
    launch_gelu_backward<scalar_t, scalar_t>(s.h.data_ptr<scalar_t>() + m0 * d.D1, nullptr, rows, d.D1, dg, dh_out);
  } else {
    launch_gelu_backward<scalar_t, acc_t>(h1.data_ptr<acc_t>(), b1, rows, d.D1, dg, dh_out);
  }
  if (need.dw1) {
    gemm_rowmajor(true, false, d.D1, d.K, rows, dh_s.data_ptr(), d.D1, xn, d.K, ab, acc_g.dw1.data_ptr(), d.K, ct,
                  1.0, 1.0);  // dW1 += dh^T xn
  }
  if (need.db1) {
    column_sums<acc_t, acc_t>(dg.data_ptr<acc_t>(), rows, d.D1, partial_a.data_ptr<acc_t>(),
                              acc_g.db1.data_ptr<acc_t>());
  }
  if (!need.dxn()) return;

  at::Tensor dxn = at::empty({rows, d.K}, aopt);
  gemm_rowmajor(false, false, rows, d.K, d.D1, dh_s.data_ptr(), d.D1, p.w1.data_ptr(), d.K, ab, dxn.data_ptr(), d.K,
                ct, 1.0, 0.0);  // dxn = dh w1

  auto stream = at::cuda::getCurrentCUDAStream();
  if (need.dlnw || need.dlnb) {
    const int64_t slabs = ceil_div(rows, kSlabRows);
    const dim3 pgrid(static_cast<unsigned>(ceil_div(d.K, kColTile)), static_cast<unsigned>(slabs));
    ln_param_grad_partial_kernel<scalar_t><<<pgrid, dim3(kColTile, kRowThreads), 0, stream>>>(
        x.data_ptr<scalar_t>(), geo, d.C, m0, rows, mean, rstd, dxn.data_ptr<acc_t>(), partial_a.data_ptr<acc_t>(),
        partial_b.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need.dlnw) {
      colsum_finish_kernel<acc_t><<<elt_blocks(d.K), kEltThreads, 0, stream>>>(partial_a.data_ptr<acc_t>(), slabs,
                                                                                d.K, acc_g.dlnw.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need.dlnb) {
      colsum_finish_kernel<acc_t><<<elt_blocks(d.K), kEltThreads, 0, stream>>>(partial_b.data_ptr<acc_t>(), slabs,
                                                                                d.K, acc_g.dlnb.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (need.dx) {
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, kWarpsPerBlock))), block(32 * kWarpsPerBlock);
    layernorm_backward_unshuffle_kernel<scalar_t><<<grid, block, 0, stream>>>(
        x.data_ptr<scalar_t>(), geo, d.C, m0, rows, mean, rstd, p.lnw.data_ptr<scalar_t>(), dxn.data_ptr<acc_t>(),
        dx.data_ptr<scalar_t>(), dgeo);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

Grads backward_cuda(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& ln_weight,
                    const at::Tensor& ln_bias, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                    const at::Tensor& w2, const c10::optional<at::Tensor>& b2, double eps,
                    const c10::optional<at::Tensor>& xn_saved, const c10::optional<at::Tensor>& h_saved,
                    const c10::optional<at::Tensor>& g_saved, const c10::optional<at::Tensor>& stats_saved,
                    std::array<bool, 7> output_mask) {
  const char* op = "vita_ext::pixel_shuffle_projector_backward";
  const PspDims d =
      check_pixel_shuffle_projector_backward_args(op, grad_y, x_in, ln_weight, ln_bias, w1, b1, w2, b2);
  const PspSaved s = check_pixel_shuffle_projector_saved(op, d, x_in, xn_saved, h_saved, g_saved, stats_saved);
  const PspNeeds need = psp_needs(output_mask);
  check_blas_sizes(op, d);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = psp_inner_contiguous(x_in);
  at::Tensor dx = need.dx ? psp_empty_dx(x_in) : psp_not_asked(x_in);
  const PspGeom geo = psp_geom(d, x), dgeo = need.dx ? psp_geom(d, dx) : geo;
  const auto aopt = x.options().dtype(psp_acc_dtype(x.scalar_type()));
  auto zeros_if = [&](bool want, at::IntArrayRef shape) { return want ? at::zeros(shape, aopt) : at::Tensor(); };
  GradAcc g{zeros_if(need.dlnw, {d.K}),      zeros_if(need.dlnb, {d.K}),  zeros_if(need.dw1, {d.D1, d.K}),
            zeros_if(need.db1, {d.D1}),      zeros_if(need.dw2, {d.D2, d.D1}), zeros_if(need.db2, {d.D2})};
  if (d.M > 0 && need.any()) {
    const Params p = contiguous_params(ln_weight, ln_bias, w1, b1, w2, b2);
    const at::Tensor gy = grad_y.reshape({d.M, d.D2}).contiguous();
    const int64_t slabs = ceil_div(std::min(kChunkRows, d.M), kSlabRows);
    at::Tensor partial_a = at::empty({slabs * std::max({d.K, d.D1, d.D2})}, aopt);
    at::Tensor partial_b = at::empty({slabs * d.K}, aopt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_projector_bwd_cuda", [&] {
      for (int64_t m0 = 0; m0 < d.M; m0 += kChunkRows) {
        const int64_t rows = std::min(kChunkRows, d.M - m0);
        backward_chunk<scalar_t>(x, geo, dx, dgeo, d, p, s, need, gy, eps, m0, rows, g, partial_a, partial_b);
      }
    });
  }
  auto out = [&](bool want, const at::Tensor& proto, const at::Tensor& a) {
    return want ? like(proto, a) : psp_not_asked(proto);
  };
  auto out_bias = [&](bool want, const at::Tensor& w, const at::Tensor& a) {
    return want ? a.to(w.scalar_type()) : psp_not_asked(w);
  };
  return {dx,
          out(need.dlnw, ln_weight, g.dlnw),
          out(need.dlnb, ln_bias, g.dlnb),
          out(need.dw1, w1, g.dw1),
          out_bias(need.db1, w1, g.db1),
          out(need.dw2, w2, g.dw2),
          out_bias(need.db2, w2, g.db2)};
}

}  // namespace
}  // namespace vita_ext

TORCH_LIBRARY_IMPL(vita_ext, CUDA, m) {
  m.impl("pixel_shuffle_projector", &vita_ext::forward_cuda);
  m.impl("pixel_shuffle_projector_backward", &vita_ext::backward_cuda);
}
