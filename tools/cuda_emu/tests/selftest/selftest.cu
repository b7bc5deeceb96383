// Self-test kernels of the CUDA emulation tier: each case either computes something the Python test
// (tests/test_emulator.py) checks, or breaks one CUDA rule and must raise. Compiled through the same
// rewrite as csrc/cuda; the schemas are in src/selftest_schema.cpp.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <string>

namespace {

constexpr unsigned kFull = 0xffffffffu;

__device__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// Per-block sums of x (n elements), 256 threads per block: shuffles, shared memory and a barrier.
__global__ void __launch_bounds__(256) block_sum_kernel(const float* x, int64_t n, float* out) {
  __shared__ float partial[8];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float v = warp_sum(i < n ? x[i] : 0.f);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x >= 32) return;
  v = threadIdx.x < 8 ? partial[threadIdx.x] : 0.f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(kFull, v, off);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// One warp: every shuffle flavour, at width 32 and 8, and the votes; 12 values per lane.
__global__ void shuffles_kernel(float* out) {
  const int lane = threadIdx.x;
  const float v = static_cast<float>(lane);
  float* o = out + lane * 12;
  o[0] = __shfl_sync(kFull, v, 3);
  o[1] = __shfl_xor_sync(kFull, v, 5);
  o[2] = __shfl_up_sync(kFull, v, 2);
  o[3] = __shfl_down_sync(kFull, v, 2);
  o[4] = __shfl_sync(kFull, v, 1, 8);
  o[5] = __shfl_xor_sync(kFull, v, 4, 8);
  o[6] = __shfl_up_sync(kFull, v, 3, 8);
  o[7] = __shfl_down_sync(kFull, v, 3, 8);
  o[8] = static_cast<float>(__ballot_sync(kFull, lane % 3 == 0) & 0xffffu);
  o[9] = static_cast<float>(__any_sync(kFull, lane == 7));
  o[10] = static_cast<float>(__all_sync(kFull, lane < 31));
  o[11] = static_cast<float>(__popc(__activemask()));
}

// Half-warps shuffle separately (disjoint masks are two collectives); then the block-wide votes.
__global__ void half_warps_kernel(float* out) {
  const int t = threadIdx.x, lane = t % 32;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  float v = __shfl_xor_sync(mask, static_cast<float>(t), 1);
  __syncwarp();
  out[t] = v + 1000.f * static_cast<float>(__syncthreads_count(t % 3 == 0)) +
           100000.f * static_cast<float>(__syncthreads_and(t < 1000)) +
           200000.f * static_cast<float>(__syncthreads_or(t == 5));
}

__global__ void histogram_kernel(const float* x, int64_t n, int bins, int* hist, double* total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int b = static_cast<int>(x[i]) % bins;
    atomicAdd(hist + b, 1);
    atomicAdd(total, static_cast<double>(x[i]));
  }
}

// Reads shared memory nobody wrote: NaN when the emulator fills it (as it does by default).
__global__ void uninit_shared_kernel(float* out) {
  __shared__ float s[64];
  extern __shared__ float dyn[];
  out[threadIdx.x] = s[threadIdx.x];
  out[64 + threadIdx.x] = dyn[threadIdx.x];
}

// A missing barrier: thread t reads what thread t + 1 wrote. Correct only when t + 1 happens to run
// first (reverse order); NaN from the unwritten shared memory otherwise.
__global__ void race_kernel(const float* x, float* out) {
  __shared__ float s[64];
  const int t = threadIdx.x;
  s[t] = x[t];
  out[t] = s[(t + 1) % 64];
}

// --------------------------------------------------------------------------- rule breakers

__global__ void divergent_sync_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = warp_sum(1.f);
}

__global__ void different_shuffles_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(kFull, v, 1);
  } else {
    v = __shfl_xor_sync(kFull, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void shuffle_vs_sync_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(kFull, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void read_outside_mask_kernel(float* out) {
  const unsigned mask = 0x0000ffffu;
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(mask, 1.f, 20);
}

__global__ void plain_kernel(float* out) { out[threadIdx.x] = 1.f; }

__global__ void full_warp_sum_kernel(float* out) { out[threadIdx.x] = warp_sum(1.f); }

__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1.f; }

__global__ void big_static_smem_kernel(float* out) {
  __shared__ float big[13 * 1024];  // 52 KB
  big[threadIdx.x] = 1.f;
  out[threadIdx.x] = big[threadIdx.x];
}

__global__ void dyn_smem_kernel(float* out, int n) {
  extern __shared__ __align__(16) unsigned char raw[];
  float* f = reinterpret_cast<float*>(raw);
  for (int i = threadIdx.x; i < n; i += blockDim.x) f[i] = static_cast<float>(i % 7);
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int i = 0; i < n; ++i) s += f[i];
    out[0] = s;
  }
}

// ------------------------------------------------------------------------------- host side

at::Tensor out_like(int64_t n) { return at::empty({n}, at::TensorOptions().dtype(at::kFloat)); }

at::Tensor run_case(c10::string_view name_sv, const at::Tensor& x_in) {
  const std::string name(name_sv);
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = x.numel();
  if (name == "block_sum") {
    const int64_t blocks = (n + 255) / 256;
    at::Tensor out = out_like(blocks);
    block_sum_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(x.data_ptr<float>(), n, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "shuffles") {
    at::Tensor out = out_like(32 * 12);
    shuffles_kernel<<<1, 32, 0, stream>>>(out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "half_warps") {
    at::Tensor out = out_like(64);
    half_warps_kernel<<<1, 64, 0, stream>>>(out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "histogram") {
    at::Tensor hist = at::zeros({16}, at::TensorOptions().dtype(at::kInt));
    at::Tensor total = at::zeros({1}, at::TensorOptions().dtype(at::kDouble));
    histogram_kernel<<<3, 64, 0, stream>>>(x.data_ptr<float>(), n, 16, hist.data_ptr<int>(), total.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return at::cat({hist.to(at::kDouble), total});
  }
  if (name == "uninit_shared") {
    at::Tensor out = out_like(128);
    uninit_shared_kernel<<<1, 64, 64 * sizeof(float), stream>>>(out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "race") {
    at::Tensor out = out_like(64);
    race_kernel<<<1, 64, 0, stream>>>(x.data_ptr<float>(), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  at::Tensor out = out_like(2048);
  float* o = out.data_ptr<float>();
  if (name == "divergent_sync") divergent_sync_kernel<<<1, 64, 0, stream>>>(o);
  else if (name == "exited_lane") exited_lane_kernel<<<1, 32, 0, stream>>>(o);
  else if (name == "absent_lane") full_warp_sum_kernel<<<1, 48, 0, stream>>>(o);
  else if (name == "different_shuffles") different_shuffles_kernel<<<1, 32, 0, stream>>>(o);
  else if (name == "shuffle_vs_sync") shuffle_vs_sync_kernel<<<1, 64, 0, stream>>>(o);
  else if (name == "read_outside_mask") read_outside_mask_kernel<<<1, 32, 0, stream>>>(o);
  else if (name == "empty_grid") plain_kernel<<<0, 32, 0, stream>>>(o);
  else if (name == "too_many_threads") plain_kernel<<<1, dim3(32, 64), 0, stream>>>(o);
  else if (name == "grid_y") plain_kernel<<<dim3(1, 70000), 32, 0, stream>>>(o);
  else if (name == "block_z") plain_kernel<<<1, dim3(1, 1, 65), 0, stream>>>(o);
  else if (name == "launch_bounds") bounded_kernel<<<1, 128, 0, stream>>>(o);
  else if (name == "static_smem") big_static_smem_kernel<<<1, 32, 0, stream>>>(o);
  else if (name == "smem_no_optin") dyn_smem_kernel<<<1, 32, 64 * 1024, stream>>>(o, 16 * 1024);
  else if (name == "smem_over_max") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    dyn_smem_kernel<<<1, 32, 240 * 1024, stream>>>(o, 16);
  } else if (name == "smem_optin") {
    C10_CUDA_CHECK(cudaFuncSetAttribute(dyn_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
    dyn_smem_kernel<<<1, 128, 100 * 1024, stream>>>(o, 25 * 1024);
  } else if (name == "unchecked") {
    plain_kernel<<<1, 4096, 0, stream>>>(o);
    return out;  // no C10_CUDA_KERNEL_LAUNCH_CHECK: the emulator raises at the end of the op
  } else if (name == "host_thread_idx") {
    o[0] = static_cast<float>(threadIdx.x);
  } else {
    TORCH_CHECK(false, "cuda_emu selftest: unknown case '", name, "'");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

cudaDataType_t blas_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: TORCH_CHECK(false, "cuda_emu selftest gemm: dtype ", t);
  }
  return CUDA_R_32F;
}

// Row-major C[M, N] = op(A) op(B) (+ C when accumulate) through cublasGemmEx, operands swapped for
// cuBLAS's column-major view (as csrc/cuda/gemm.cuh does).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool ta, bool tb, const at::Tensor& c_in, bool accumulate) {
  at::Tensor c = c_in.clone();
  const int64_t M = ta ? a.size(1) : a.size(0), K = ta ? a.size(0) : a.size(1), N = tb ? b.size(0) : b.size(1);
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous() && c.size(0) == M && c.size(1) == N);
  const bool fp64 = a.scalar_type() == at::kDouble;
  const float one = 1.f, beta = accumulate ? 1.f : 0.f;
  const double one_d = 1.0, beta_d = accumulate ? 1.0 : 0.0;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    ta ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M),
                                    static_cast<int>(K), fp64 ? static_cast<const void*>(&one_d) : &one,
                                    b.data_ptr(), blas_type(b.scalar_type()), static_cast<int>(b.size(1)),
                                    a.data_ptr(), blas_type(a.scalar_type()), static_cast<int>(a.size(1)),
                                    fp64 ? static_cast<const void*>(&beta_d) : &beta, c.data_ptr(),
                                    blas_type(c.scalar_type()), static_cast<int>(N),
                                    fp64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return c;
}

// The status cublasGemmEx returns for one malformed call (as cuBLAS documents it).
int64_t gemm_status(c10::string_view which_sv) {
  const std::string which(which_sv);
  float a[16] = {}, b[16] = {}, c[16] = {};
  const float one = 1.f, zero = 0.f;
  cublasHandle_t h = at::cuda::getCurrentCUDABlasHandle();
  int m = 4, n = 4, k = 4, lda = 4, ldb = 4, ldc = 4;
  cudaDataType_t at_ = CUDA_R_32F, bt = CUDA_R_32F, ct = CUDA_R_32F;
  cublasComputeType_t comp = CUBLAS_COMPUTE_32F;
  cublasOperation_t opa = CUBLAS_OP_N;
  const void* alpha = &one;
  if (which == "ok") {
  } else if (which == "lda") {
    lda = 3;
  } else if (which == "ldb_trans") {
    opa = CUBLAS_OP_T;
    m = 2;
    lda = 3;  // A^T is stored k x m: lda must be >= k = 4
  } else if (which == "ldc") {
    ldc = 2;
  } else if (which == "negative") {
    k = -1;
  } else if (which == "null_alpha") {
    alpha = nullptr;
  } else if (which == "mixed_ab") {
    bt = CUDA_R_16F;
  } else if (which == "fp32_in_fp16_out") {
    ct = CUDA_R_16F;
  } else if (which == "fp64_compute_fp32") {
    comp = CUBLAS_COMPUTE_64F;
  } else if (which == "bad_op") {
    opa = static_cast<cublasOperation_t>(7);
  } else {
    TORCH_CHECK(false, "cuda_emu selftest gemm_status: unknown case '", which, "'");
  }
  return cublasGemmEx(h, opa, CUBLAS_OP_N, m, n, k, alpha, a, at_, lda, b, bt, ldb, &zero, c, ct, ldc, comp,
                      CUBLAS_GEMM_DEFAULT);
}

}  // namespace

TORCH_LIBRARY_IMPL(cuda_emu_selftest, CUDA, m) {
  m.impl("run", &run_case);
  m.impl("gemm", &gemm);
}

// gemm_status takes no tensor: it is registered as a catch-all in src/selftest_schema.cpp.
int64_t cuda_emu_selftest_gemm_status(c10::string_view which) { return gemm_status(which); }
