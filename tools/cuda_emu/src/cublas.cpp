// cuBLAS stand-in: cublasGemmEx checks its arguments as the cuBLAS documentation states (status
// INVALID_VALUE for sizes, leading dimensions, operations and null scalars; NOT_SUPPORTED for a type /
// compute-type combination cuBLAS does not offer), then computes C = alpha op(A) op(B) + beta C
// column-major with a plain loop accumulating in double, rounded once to C's type through fp32 (as an
// fp32 accumulator would be) for CUBLAS_COMPUTE_32F*. beta == 0 never reads C (cuBLAS's rule, which
// matters here: C is often a NaN-filled fresh allocation). Not cuBLAS's numerics: no TF32, no split-K.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "cublas_v2.h"
#include "internal.h"

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
};

namespace {

cublasContext g_handle;

bool known_type(cudaDataType_t t) {
  switch (t) {
    case CUDA_R_32F: case CUDA_R_64F: case CUDA_R_16F: case CUDA_R_16BF: case CUDA_R_8I: case CUDA_R_32I:
      return true;
    default:
      return false;
  }
}

// The real-valued rows of cublasGemmEx's table of supported (compute, A/B, C) combinations.
bool supported(cublasComputeType_t ct, cudaDataType_t ab, cudaDataType_t c) {
  switch (ct) {
    case CUBLAS_COMPUTE_16F:
    case CUBLAS_COMPUTE_16F_PEDANTIC:
      return ab == CUDA_R_16F && c == CUDA_R_16F;
    case CUBLAS_COMPUTE_32I:
    case CUBLAS_COMPUTE_32I_PEDANTIC:
      return ab == CUDA_R_8I && c == CUDA_R_32I;
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
      return (ab == CUDA_R_16BF && (c == CUDA_R_16BF || c == CUDA_R_32F)) ||
             (ab == CUDA_R_16F && (c == CUDA_R_16F || c == CUDA_R_32F)) || (ab == CUDA_R_8I && c == CUDA_R_32F) ||
             (ab == CUDA_R_32F && c == CUDA_R_32F);
    case CUBLAS_COMPUTE_32F_FAST_16F:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
    case CUBLAS_COMPUTE_32F_FAST_TF32:
      return ab == CUDA_R_32F && c == CUDA_R_32F;
    case CUBLAS_COMPUTE_64F:
    case CUBLAS_COMPUTE_64F_PEDANTIC:
      return ab == CUDA_R_64F && c == CUDA_R_64F;
  }
  return false;
}

double load(const void* p, cudaDataType_t t, int64_t i) {
  switch (t) {
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_64F: return static_cast<const double*>(p)[i];
    case CUDA_R_16F: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case CUDA_R_16BF: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case CUDA_R_8I: return static_cast<const int8_t*>(p)[i];
    case CUDA_R_32I: return static_cast<const int32_t*>(p)[i];
    default: return 0;
  }
}

void store(void* p, cudaDataType_t t, int64_t i, double v, bool via_fp32) {
  const float f = static_cast<float>(v);
  switch (t) {
    case CUDA_R_32F: static_cast<float*>(p)[i] = f; break;
    case CUDA_R_64F: static_cast<double*>(p)[i] = v; break;
    case CUDA_R_16F: static_cast<c10::Half*>(p)[i] = via_fp32 ? c10::Half(f) : c10::Half(static_cast<float>(v)); break;
    case CUDA_R_16BF: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(f); break;
    case CUDA_R_32I: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(std::llround(v)); break;
    default: break;
  }
}

// op(X) of a column-major X with leading dimension ld, as a row-major rows x cols double matrix.
std::vector<double> op_matrix(const void* x, cudaDataType_t t, int ld, cublasOperation_t op, int rows, int cols) {
  std::vector<double> out(static_cast<size_t>(rows) * cols);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) {
      const int64_t idx = op == CUBLAS_OP_N ? i + static_cast<int64_t>(j) * ld : j + static_cast<int64_t>(i) * ld;
      out[static_cast<size_t>(i) * cols + j] = load(x, t, idx);
    }
  return out;
}

}  // namespace

cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  *handle = new cublasContext();
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  if (handle != &g_handle) delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetStream(cublasHandle_t handle, cudaStream_t* stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *stream = handle->stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->math = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *mode = handle->math;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t s) { return cublasGetStatusName(s); }

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  const auto op_ok = [](cublasOperation_t o) { return o == CUBLAS_OP_N || o == CUBLAS_OP_T || o == CUBLAS_OP_C; };
  if (!op_ok(transa) || !op_ok(transb) || m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  const int rows_a = transa == CUBLAS_OP_N ? m : k, rows_b = transb == CUBLAS_OP_N ? k : n;
  if (lda < std::max(1, rows_a) || ldb < std::max(1, rows_b) || ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
  if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (!known_type(Atype) || !known_type(Btype) || !known_type(Ctype)) return CUBLAS_STATUS_INVALID_VALUE;
  if (algo != CUBLAS_GEMM_DEFAULT && algo != CUBLAS_GEMM_DEFAULT_TENSOR_OP && (algo < 0 || algo > 23))
    return CUBLAS_STATUS_INVALID_VALUE;
  if (Atype != Btype || !supported(computeType, Atype, Ctype)) return CUBLAS_STATUS_NOT_SUPPORTED;
  ++cuda_emu::stats().gemms;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const bool fp64 = computeType == CUBLAS_COMPUTE_64F || computeType == CUBLAS_COMPUTE_64F_PEDANTIC;
  const bool i32 = computeType == CUBLAS_COMPUTE_32I || computeType == CUBLAS_COMPUTE_32I_PEDANTIC;
  const bool f16 = computeType == CUBLAS_COMPUTE_16F || computeType == CUBLAS_COMPUTE_16F_PEDANTIC;
  // The scalars' type follows the compute type: double for 64F, int for 32I, half for 16F, else float.
  double a, b;
  if (fp64) {
    a = *static_cast<const double*>(alpha);
    b = *static_cast<const double*>(beta);
  } else if (i32) {
    a = *static_cast<const int32_t*>(alpha);
    b = *static_cast<const int32_t*>(beta);
  } else if (f16) {
    a = static_cast<float>(*static_cast<const c10::Half*>(alpha));
    b = static_cast<float>(*static_cast<const c10::Half*>(beta));
  } else {
    a = *static_cast<const float*>(alpha);
    b = *static_cast<const float*>(beta);
  }
  if (C == nullptr || (k > 0 && a != 0.0 && (A == nullptr || B == nullptr))) return CUBLAS_STATUS_INVALID_VALUE;
  std::vector<double> opa, opb;
  if (k > 0 && a != 0.0) {
    opa = op_matrix(A, Atype, lda, transa, m, k);  // [m][k]
    opb = op_matrix(B, Btype, ldb, transb == CUBLAS_OP_N ? CUBLAS_OP_T : CUBLAS_OP_N, n, k);  // op(B)^T: [n][k]
  }
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      double acc = 0;
      if (!opa.empty()) {
        const double* x = &opa[static_cast<size_t>(i) * k];
        const double* y = &opb[static_cast<size_t>(j) * k];
        for (int l = 0; l < k; ++l) acc += x[l] * y[l];
      }
      const int64_t ci = i + static_cast<int64_t>(j) * ldc;
      double v = a * acc;
      if (b != 0.0) v += b * load(C, Ctype, ci);
      store(C, Ctype, ci, v, !fp64);
    }
  return CUBLAS_STATUS_SUCCESS;
}

namespace at {
namespace cuda {
cublasHandle_t getCurrentCUDABlasHandle() { return &g_handle; }
}  // namespace cuda
}  // namespace at
