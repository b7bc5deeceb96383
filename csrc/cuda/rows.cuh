// Row gather / scatter for the masked LM-head ops: move K selected rows of a [T, H] matrix (any
// strides) to or from a contiguous [K, H] buffer, converting the dtype on the way.
// Cost: K*H elements read and written; memory-bound and small next to the vocabulary GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

namespace vita_ext {
namespace cuda_rows {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride over rows beyond this

// dst[k, h] = src[rows[k] * s0 + h * s1]; one block per row (grid-stride), threads stride over H.
template <typename src_t, typename dst_t>
__global__ void gather_rows_kernel(const src_t* src, int64_t s0, int64_t s1, const int64_t* rows, int64_t n,
                                   int64_t H, dst_t* dst) {
  for (int64_t k = blockIdx.x; k < n; k += gridDim.x) {
    const src_t* in = src + rows[k] * s0;
    dst_t* out = dst + k * H;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) out[h] = static_cast<dst_t>(in[h * s1]);
  }
}

// dst[rows[k], h] = src[k, h] for contiguous src [n, H] and contiguous dst [T, H]; rows distinct.
template <typename src_t, typename dst_t>
__global__ void scatter_rows_kernel(const src_t* src, const int64_t* rows, int64_t n, int64_t H, dst_t* dst) {
  for (int64_t k = blockIdx.x; k < n; k += gridDim.x) {
    const src_t* in = src + k * H;
    dst_t* out = dst + rows[k] * H;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) out[h] = static_cast<dst_t>(in[h]);
  }
}

inline unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>(n, kMaxBlocks)); }

// src [T, H] (any strides), rows [n] int64 in [0, T) (already validated) -> contiguous [n, H].
inline at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& rows) {
  const int64_t n = rows.size(0), H = src.size(1);
  auto dst = at::empty({n, H}, src.options());
  if (n == 0 || H == 0) return dst;
  const auto idx = rows.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "vita_ext_gather_rows", [&] {
    gather_rows_kernel<scalar_t, scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        src.data_ptr<scalar_t>(), src.stride(0), src.stride(1), idx.data_ptr<int64_t>(), n, H,
        dst.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dst;
}

// Contiguous dst [T, H] (rows not listed are left as they are) receives contiguous src [n, H], src
// in dst's accumulation dtype (fp32, fp64 for fp64), rounded once on the way.
inline void scatter_rows(const at::Tensor& src, const at::Tensor& rows, at::Tensor& dst) {
  const int64_t n = rows.size(0), H = src.size(1);
  if (n == 0 || H == 0) return;
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && dst.size(1) == H,
              "vita_ext scatter_rows: contiguous tensors of equal width expected");
  const auto idx = rows.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "vita_ext_scatter_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(src.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "vita_ext scatter_rows: source must hold the accumulation dtype");
    scatter_rows_kernel<acc_t, scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
        src.data_ptr<acc_t>(), idx.data_ptr<int64_t>(), n, H, dst.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda_rows
}  // namespace vita_ext
