// merge_attention_ on CUDA: in-place log-sum-exp merge of a partial attention result.
//
// One warp per (b, s, h) row, 8 rows per block. Every lane reads the row's two lse values, computes
// lse' = max + log1p(exp(-|lse - block_lse|)) and the weights exp(lse - lse'), exp(block_lse - lse') in
// fp32 (a -inf side weighs 0; both -inf give lse' = -inf and out' = 0, as in reference.merge_attention;
// a NaN side gives NaN, a +inf side lse' = +inf and out' NaN, as torch.logaddexp: see cpu/merge_attention.cpp),
// then the lanes stream the row: 4 elements per lane per step with vector loads when D % 4 == 0 and
// both rows are aligned, element by element otherwise. The row's lse is written by lane 0 after a
// __syncwarp, so no lane can read an already-updated lse. A row's lse belongs to exactly one warp.
// out/lse/block_out/block_lse are addressed through their (b, s, h) strides: out and lse can be views
// into a larger buffer (ring attention merges into chunks of the output), merged in place.
// Cost: 3 * B * S * H * D FLOPs; bytes: out read + written, block_out read, 12 bytes of lse per row.
//
// NOTE for a GPU session: bandwidth-bound; check it reaches ~80% of HBM bandwidth for [1, 128K, 40, 128]
// fp32 out + bf16 block_out, and compare with a fused torch expression.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "attention_lse.h"

namespace vita_ext {
namespace {

constexpr int kWarps = 8;

struct Strides3 {
  int64_t a, b, c;  // strides of dims (0, 1, 2) as the caller names them
};

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename O, typename BO>
__global__ void __launch_bounds__(kWarps * 32)
    merge_attention_kernel(O* out, Strides3 os, float* lse, Strides3 ls, const BO* bout, Strides3 bos,
                           const float* blse, Strides3 bls, int64_t B, int64_t S, int64_t H, int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * S * H) return;  // whole warps leave together
  const int64_t h = row % H, s = (row / H) % S, b = row / (H * S);
  float* lp = lse + b * ls.a + h * ls.b + s * ls.c;
  const float la = *lp, lb = blse[b * bls.a + h * bls.b + s * bls.c];
  // fmaxf drops a NaN and |inf - inf| is NaN: both cases first, as torch.logaddexp
  const float merged = (isnan(la) || isnan(lb)) ? NAN
                       : (la == lb && isinf(la)) ? la
                                                 : fmaxf(la, lb) + log1pf(expf(-fabsf(la - lb)));
  const float safe = (merged == -INFINITY) ? 0.f : merged;
  const float wa = expf(la - safe), wb = expf(lb - safe);
  O* o = out + b * os.a + s * os.b + h * os.c;
  const BO* bo = bout + b * bos.a + s * bos.b + h * bos.c;
  const bool vec = D % 4 == 0 && reinterpret_cast<uintptr_t>(o) % sizeof(Pack4<O>) == 0 &&
                   reinterpret_cast<uintptr_t>(bo) % sizeof(Pack4<BO>) == 0;
  if (vec) {
    for (int64_t c = 4 * lane; c < D; c += 4 * 32) {
      Pack4<O> x = *reinterpret_cast<const Pack4<O>*>(o + c);
      const Pack4<BO> y = *reinterpret_cast<const Pack4<BO>*>(bo + c);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        x.v[t] = static_cast<O>(static_cast<float>(x.v[t]) * wa + static_cast<float>(y.v[t]) * wb);
      }
      *reinterpret_cast<Pack4<O>*>(o + c) = x;
    }
  } else {
    for (int64_t c = lane; c < D; c += 32) {
      o[c] = static_cast<O>(static_cast<float>(o[c]) * wa + static_cast<float>(bo[c]) * wb);
    }
  }
  __syncwarp();  // every lane has read the old lse before it is replaced
  if (lane == 0) *lp = merged;
}

template <typename F>
void dispatch_storage(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "vita_ext::merge_attention_: unsupported dtype ", dtype_name(t));
  }
}

Strides3 strides3(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

void merge_attention_cuda(at::Tensor& out, at::Tensor& lse, const at::Tensor& block_out_in,
                          const at::Tensor& block_lse) {
  attn::check_merge_attention_args("vita_ext::merge_attention_", out, lse, block_out_in, block_lse);
  if (lse.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor block_out = attn::inner_contiguous(block_out_in);
  const int64_t B = out.size(0), S = out.size(1), H = out.size(2), D = out.size(3);
  const int64_t blocks = (B * S * H + kWarps - 1) / kWarps;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "vita_ext::merge_attention_: too many rows for one CUDA grid");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_storage(out.scalar_type(), [&](auto o_tag) {
    dispatch_storage(block_out.scalar_type(), [&](auto b_tag) {
      using O = decltype(o_tag);
      using BO = decltype(b_tag);
      merge_attention_kernel<O, BO><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(
          static_cast<O*>(out.data_ptr()), strides3(out), lse.data_ptr<float>(), strides3(lse),
          static_cast<const BO*>(block_out.data_ptr()), strides3(block_out), block_lse.data_ptr<float>(),
          strides3(block_lse), B, S, H, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CUDA, m) { m.impl("merge_attention_", &merge_attention_cuda); }

}  // namespace vita_ext
