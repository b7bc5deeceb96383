// masked_lm_head, CUDA: logits = hidden_states[positions] @ weight^T for K selected rows only.
//
// Algorithm: gather the K rows (any strides of hidden_states) into a contiguous [K, H] buffer with a
// small kernel that also wraps negative positions and checks the range on the device -- no value comes
// back to the host, so a decode step stays asynchronous and CUDA-graph capturable; a position outside
// [-T, T) gives a row of NaN (hence NaN logits) instead of an error -- then one cublasGemmEx with fp32
// accumulation writing [K, V] in the input dtype (one rounding).
// Cost: 2*K*H*V FLOPs; bytes ~ V*H*sizeof(dtype) + K*(H + V)*sizeof(dtype). For decode and
// last-token prefill (K = 1) the op is bound by reading the weight once: Long-VITA's [152064, 5120]
// bf16 head is 1.557 GB -> ~0.47 ms at H100's ~3.35 TB/s, ~0.33 ms at H200's ~4.8 TB/s.
// NOTE for a GPU session: measure K = 1 and K = 8 against that bound; cuBLAS picks a GEMV-like kernel
// for K = 1, and the gather should stay below ~10 us.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "cuda/gemm.cuh"
#include "masked_lm_head.h"

namespace vita_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride over rows beyond this

// dst[k, :] = src[p, :] with p = positions[k] wrapped into [0, T) (Python indexing); NaN when the
// position is outside [-T, T). One block per row (grid-stride), threads stride over H.
template <typename scalar_t>
__global__ void gather_positions_kernel(const scalar_t* src, int64_t s0, int64_t s1, const int64_t* positions,
                                        int64_t K, int64_t T, int64_t H, scalar_t* dst) {
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    int64_t p = positions[k];
    p = p < 0 ? p + T : p;
    const bool ok = p >= 0 && p < T;
    const scalar_t* in = src + (ok ? p : 0) * s0;
    scalar_t* out = dst + k * H;
    const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) out[h] = ok ? in[h * s1] : nan;
  }
}

at::Tensor masked_lm_head_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& positions) {
  lm_head::check_args(hidden, weight, positions);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0), K = positions.size(0);
  auto out = at::empty({K, V}, hidden.options());
  if (K == 0 || V == 0) return out;
  auto rows = at::empty({K, H}, hidden.options());
  if (H > 0) {
    const auto pos = positions.contiguous();
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "masked_lm_head_gather", [&] {
      gather_positions_kernel<scalar_t><<<static_cast<unsigned>(std::min<int64_t>(K, kMaxBlocks)), kThreads, 0,
                                          stream>>>(hidden.data_ptr<scalar_t>(), hidden.stride(0), hidden.stride(1),
                                                    pos.data_ptr<int64_t>(), K, T, H, rows.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto w = cuda_gemm::rowmajor(weight);
  const auto dtype = hidden.scalar_type();
  cuda_gemm::gemm(K, V, H, {rows.data_ptr(), dtype, H, false}, {w.data_ptr(), dtype, cuda_gemm::row_stride(w), true},
                  out.data_ptr(), dtype, V, 0.0);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CUDA, m) { m.impl("masked_lm_head", &masked_lm_head_cuda); }

}  // namespace vita_ext
