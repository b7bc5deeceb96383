// Row-major GEMM on cuBLAS (cublasGemmEx), with the output dtype free of the operand dtype: the ops
// here need bf16/fp16 operands with an fp32 C (logits tiles, accumulation with beta = 1 in fp32
// without intermediate rounding), and bf16/fp16 operands with a bf16/fp16 C (one rounding).
//
//   C[M, N] = op(A) @ op(B) + beta * C       (alpha = 1; all matrices row-major)
//   op(A) is [M, K]: A is stored as [M, K] (trans = false) or as [K, M] (trans = true);
//   op(B) is [K, N]: B is stored as [K, N] (trans = false) or as [N, K] (trans = true);
//   ld = the stride between consecutive rows of the stored matrix (>= its number of columns).
// Examples: logits = h @ W^T is gemm(M, V, H, {h, !t}, {W, t}); dH += dlogits @ W is
// gemm(M, H, V, {dl, !t}, {W, !t}, beta = 1); dW = dlogits^T @ h is gemm(V, H, M, {dl, t}, {h, !t}).
//
// Why this works: cuBLAS is column-major, and a row-major X with row stride ld is, to cuBLAS, the
// column-major X^T with leading dimension ld. So we ask cuBLAS for C^T = op(B)^T @ op(A)^T, i.e.
// swap the operands and the M/N sizes; a stored matrix needs a cuBLAS transpose exactly when it
// needs one in row-major terms.
//
// Compute: CUBLAS_COMPUTE_32F for fp32/bf16/fp16 C (fp32 accumulation; fp32 inputs follow the
// handle's math mode, i.e. torch.backends.cuda.matmul.allow_tf32, as torch.mm does), and
// CUBLAS_COMPUTE_64F for fp64. The current stream's handle is used (at::cuda::getCurrentCUDABlasHandle
// binds it to the current stream and gives it torch's workspace).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAStream.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>

namespace vita_ext {
namespace cuda_gemm {

inline cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "vita_ext gemm: unsupported dtype ", t);
  }
  return CUDA_R_32F;
}

inline size_t dtype_bytes(cudaDataType_t t) {
  switch (t) {
    case CUDA_R_64F: return 8;
    case CUDA_R_32F: return 4;
    default: return 2;
  }
}

struct Operand {
  const void* ptr;
  at::ScalarType dtype;
  int64_t ld;  // row stride of the stored (row-major) matrix
  bool trans;  // stored transposed relative to op(X)
};

inline int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "vita_ext gemm: ", what, " = ", v, " does not fit cuBLAS's int");
  return static_cast<int>(v);
}

// C[M, N] (row stride ldc, dtype c_dtype) = op(A) @ op(B) + beta * C. beta is 0 or 1.
inline void gemm(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, void* C,
                 at::ScalarType c_dtype, int64_t ldc, double beta) {
  TORCH_CHECK(beta == 0.0 || beta == 1.0, "vita_ext gemm: beta must be 0 or 1, got ", beta);
  if (M == 0 || N == 0) return;
  const cudaDataType_t ct = cuda_dtype(c_dtype);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (K == 0) {
    // cuBLAS would scale C by beta; with beta = 0 the product is exactly 0.
    if (beta == 0.0) {
      const size_t es = dtype_bytes(ct);
      C10_CUDA_CHECK(cudaMemset2DAsync(C, ldc * es, 0, N * es, M, stream));
    }
    return;
  }
  // Row-major stored widths: A is [M, K] or [K, M]; B is [K, N] or [N, K].
  TORCH_CHECK(A.ld >= (A.trans ? M : K) && B.ld >= (B.trans ? K : N) && ldc >= N,
              "vita_ext gemm: leading dimension too small");
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cublasOperation_t opA = A.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opB = B.trans ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int m = to_int(N, "N"), n = to_int(M, "M"), k = to_int(K, "K");
  const int lda = to_int(A.ld, "lda"), ldb = to_int(B.ld, "ldb"), ldcc = to_int(ldc, "ldc");
  if (ct == CUDA_R_64F) {
    const double one = 1.0, b = beta;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, opB, opA, m, n, k, &one, B.ptr, cuda_dtype(B.dtype), ldb, A.ptr,
                                      cuda_dtype(A.dtype), lda, &b, C, ct, ldcc, CUBLAS_COMPUTE_64F,
                                      CUBLAS_GEMM_DEFAULT));
  } else {
    const float one = 1.0f, b = static_cast<float>(beta);
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, opB, opA, m, n, k, &one, B.ptr, cuda_dtype(B.dtype), ldb, A.ptr,
                                      cuda_dtype(A.dtype), lda, &b, C, ct, ldcc, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
  }
}

// A 2-D tensor usable as a GEMM operand without a copy when its last dimension is unit-stride and
// its rows do not overlap (e.g. a row slice of a larger matrix); otherwise a contiguous copy.
inline at::Tensor rowmajor(const at::Tensor& t) {
  const bool unit_cols = t.size(1) <= 1 || t.stride(1) == 1;
  const bool disjoint_rows = t.size(0) <= 1 || t.stride(0) >= std::max<int64_t>(t.size(1), 1);
  const bool ok = unit_cols && disjoint_rows;
  return ok ? t : t.contiguous();
}

// The row stride of a rowmajor() tensor as cuBLAS wants it (a single row's stride is meaningless).
inline int64_t row_stride(const at::Tensor& t) {
  const int64_t width = std::max<int64_t>(t.size(1), 1);
  return t.size(0) <= 1 ? width : std::max(t.stride(0), width);
}

}  // namespace cuda_gemm
}  // namespace vita_ext
