// pixel_shuffle_projector, CUDA: the device kernels (LayerNorm with the shuffle gather and its
// backward, bias + GELU and its derivative, deterministic column sums) and their constants. Included by
// cuda/pixel_shuffle_projector.cu only, which holds the algorithm comment, the launches and the host ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>

#include "pixel_shuffle_projector.h"

namespace vita_ext {
namespace psp_cuda {

constexpr int64_t kChunkRows = 8192;  // fp32 temporaries per chunk: rows * (K + 2*D1) * 4 bytes
constexpr int kWarpsPerBlock = 4;     // LayerNorm kernels: one warp per shuffled row
constexpr int kColTile = 32;          // column sums: 32 columns x 8 row-threads per block
constexpr int kRowThreads = 8;
constexpr int kSlabRows = 128;        // rows per partial sum
constexpr int kEltThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float erf_(float v) { return erff(v); }
__device__ __forceinline__ double erf_(double v) { return erf(v); }
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float rsqrt_(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_(double v) { return rsqrt(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t gelu_erf(acc_t v) {
  return acc_t(0.5) * v * (acc_t(1) + erf_(v * acc_t(0.70710678118654752440)));
}

// d gelu(v) / dv = Phi(v) + v * phi(v).
template <typename acc_t>
__device__ __forceinline__ acc_t gelu_erf_grad(acc_t v) {
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_(v * acc_t(0.70710678118654752440)));
  const acc_t pdf = exp_(acc_t(-0.5) * v * v) * acc_t(0.39894228040143267794);
  return cdf + v * pdf;
}

// ------------------------------------------------------------------------------- LayerNorm kernels

// One warp per shuffled row r (global row m0 + r). VEC elements per load; the host guarantees that
// C, the strides and the pointers are multiples of VEC elements (16 bytes) when VEC > 1.
template <typename scalar_t, int VEC>
__global__ void shuffle_layernorm_kernel(const scalar_t* __restrict__ x, PspGeom geo, int64_t C, int64_t m0,
                                         int64_t rows, const scalar_t* __restrict__ w,
                                         const scalar_t* __restrict__ b, at::opmath_type<scalar_t> eps,
                                         scalar_t* __restrict__ xn, at::opmath_type<scalar_t>* __restrict__ mean_out,
                                         at::opmath_type<scalar_t>* __restrict__ rstd_out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;  // the whole warp leaves together, so the shuffles below stay full-warp
  const int64_t K = 4 * C;
  const scalar_t* run[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) run[q] = x + geo.run_offset(m0 + r, q);

  acc_t sum = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < C; c += 32 * VEC) {
      const V v = *reinterpret_cast<const V*>(run[q] + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum += static_cast<acc_t>(v.v[i]);
    }
  const acc_t mean = warp_sum(sum) / static_cast<acc_t>(K);

  acc_t sq = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < C; c += 32 * VEC) {
      const V v = *reinterpret_cast<const V*>(run[q] + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t dv = static_cast<acc_t>(v.v[i]) - mean;
        sq += dv * dv;
      }
    }
  const acc_t rstd = rsqrt_(warp_sum(sq) / static_cast<acc_t>(K) + eps);

  scalar_t* out = xn + r * K;
#pragma unroll
  for (int q = 0; q < 4; ++q)
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < C; c += 32 * VEC) {
      const int64_t k = q * C + c;
      const V v = *reinterpret_cast<const V*>(run[q] + c);
      const V wv = *reinterpret_cast<const V*>(w + k);
      const V bv = *reinterpret_cast<const V*>(b + k);
      V o;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        o.v[i] = static_cast<scalar_t>((static_cast<acc_t>(v.v[i]) - mean) * rstd * static_cast<acc_t>(wv.v[i]) +
                                       static_cast<acc_t>(bv.v[i]));
      *reinterpret_cast<V*>(out + k) = o;
    }
  if (lane == 0 && mean_out != nullptr) {
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// One warp per shuffled row: dx (in x's unshuffled layout, geometry dgeo) from dxn (fp32 [rows, K]).
template <typename scalar_t>
__global__ void layernorm_backward_unshuffle_kernel(const scalar_t* __restrict__ x, PspGeom geo, int64_t C,
                                                    int64_t m0, int64_t rows,
                                                    const at::opmath_type<scalar_t>* __restrict__ mean,
                                                    const at::opmath_type<scalar_t>* __restrict__ rstd,
                                                    const scalar_t* __restrict__ w,
                                                    const at::opmath_type<scalar_t>* __restrict__ dxn,
                                                    scalar_t* __restrict__ dx, PspGeom dgeo) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  const int64_t K = 4 * C;
  const acc_t mu = mean[r], rs = rstd[r];
  const acc_t* g = dxn + r * K;

  acc_t s1 = 0, s2 = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const scalar_t* src = x + geo.run_offset(m0 + r, q);
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t xh = (static_cast<acc_t>(src[c]) - mu) * rs;
      const acc_t dxh = g[q * C + c] * static_cast<acc_t>(w[q * C + c]);
      s1 += dxh;
      s2 += dxh * xh;
    }
  }
  s1 = warp_sum(s1) / static_cast<acc_t>(K);
  s2 = warp_sum(s2) / static_cast<acc_t>(K);

#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const scalar_t* src = x + geo.run_offset(m0 + r, q);
    scalar_t* dst = dx + dgeo.run_offset(m0 + r, q);
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t xh = (static_cast<acc_t>(src[c]) - mu) * rs;
      const acc_t dxh = g[q * C + c] * static_cast<acc_t>(w[q * C + c]);
      dst[c] = static_cast<scalar_t>(rs * (dxh - s1 - xh * s2));
    }
  }
}

// ------------------------------------------------------------------------------ elementwise kernels

// g = gelu(h + bias) over a row-major [rows, D1] matrix, VEC elements per thread (VEC divides D1);
// h_out, if not null, gets the pre-activation h + bias in x's dtype (the saved activation).
template <typename scalar_t, int VEC>
__global__ void bias_gelu_kernel(const at::opmath_type<scalar_t>* __restrict__ h, const scalar_t* __restrict__ bias,
                                 int64_t n_vec, int64_t D1, scalar_t* __restrict__ g, scalar_t* __restrict__ h_out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC, col = e % D1;
    const Vec<acc_t, VEC> hv = *reinterpret_cast<const Vec<acc_t, VEC>*>(h + e);
    Vec<scalar_t, VEC> o, hs;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = hv.v[j] + (bias != nullptr ? static_cast<acc_t>(bias[col + j]) : acc_t(0));
      o.v[j] = static_cast<scalar_t>(gelu_erf(v));
      hs.v[j] = static_cast<scalar_t>(v);
    }
    *reinterpret_cast<Vec<scalar_t, VEC>*>(g + e) = o;
    if (h_out != nullptr) *reinterpret_cast<Vec<scalar_t, VEC>*>(h_out + e) = hs;
  }
}

// dg <- dg * gelu'(h + bias) in place (it becomes dh); dh_s, if not null, gets dh in x's dtype. h is
// the fp32 GEMM output (recomputed, bias separate) or the saved pre-activation in x's dtype (h_t =
// scalar_t, bias already in it, bias = nullptr).
template <typename scalar_t, typename h_t, int VEC>
__global__ void gelu_backward_kernel(const h_t* __restrict__ h, const scalar_t* __restrict__ bias, int64_t n_vec,
                                     int64_t D1, at::opmath_type<scalar_t>* __restrict__ dg,
                                     scalar_t* __restrict__ dh_s) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC, col = e % D1;
    const Vec<h_t, VEC> hv = *reinterpret_cast<const Vec<h_t, VEC>*>(h + e);
    Vec<acc_t, VEC> dv = *reinterpret_cast<const Vec<acc_t, VEC>*>(dg + e);
    Vec<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t v = static_cast<acc_t>(hv.v[j]) + (bias != nullptr ? static_cast<acc_t>(bias[col + j]) : acc_t(0));
      dv.v[j] *= gelu_erf_grad(v);
      o.v[j] = static_cast<scalar_t>(dv.v[j]);
    }
    *reinterpret_cast<Vec<acc_t, VEC>*>(dg + e) = dv;
    if (dh_s != nullptr) *reinterpret_cast<Vec<scalar_t, VEC>*>(dh_s + e) = o;
  }
}

// ----------------------------------------------------------------------------------- column sums
// Deterministic column sums: each block sums kSlabRows rows of 32 columns into partial[slab, col];
// colsum_finish_kernel then adds the slabs in order into an fp32 accumulator.

template <typename T, typename acc_t>
__global__ void colsum_partial_kernel(const T* __restrict__ in, int64_t rows, int64_t cols,
                                      acc_t* __restrict__ partial) {
  __shared__ acc_t sh[kRowThreads][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kSlabRows;
  const int64_t r1 = r0 + kSlabRows < rows ? r0 + kSlabRows : rows;
  acc_t s = 0;
  if (c < cols)
    for (int64_t r = r0 + ty; r < r1; r += kRowThreads) s += static_cast<acc_t>(in[r * cols + c]);
  sh[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && c < cols) {
    acc_t t = 0;
#pragma unroll
    for (int i = 0; i < kRowThreads; ++i) t += sh[i][tx];
    partial[blockIdx.y * cols + c] = t;
  }
}

// Partials of dln_weight = colsum(dxn * xhat) and dln_bias = colsum(dxn); xhat is recomputed from x.
template <typename scalar_t>
__global__ void ln_param_grad_partial_kernel(const scalar_t* __restrict__ x, PspGeom geo, int64_t C, int64_t m0,
                                             int64_t rows, const at::opmath_type<scalar_t>* __restrict__ mean,
                                             const at::opmath_type<scalar_t>* __restrict__ rstd,
                                             const at::opmath_type<scalar_t>* __restrict__ dxn,
                                             at::opmath_type<scalar_t>* __restrict__ partial_w,
                                             at::opmath_type<scalar_t>* __restrict__ partial_b) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t shw[kRowThreads][kColTile];
  __shared__ acc_t shb[kRowThreads][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t K = 4 * C;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kSlabRows;
  const int64_t r1 = r0 + kSlabRows < rows ? r0 + kSlabRows : rows;
  acc_t sw = 0, sb = 0;
  if (k < K) {
    const int q = static_cast<int>(k / C);
    const int64_t c = k - q * C;
    for (int64_t r = r0 + ty; r < r1; r += kRowThreads) {
      const acc_t d = dxn[r * K + k];
      const acc_t xh = (static_cast<acc_t>(x[geo.run_offset(m0 + r, q) + c]) - mean[r]) * rstd[r];
      sw += d * xh;
      sb += d;
    }
  }
  shw[ty][tx] = sw;
  shb[ty][tx] = sb;
  __syncthreads();
  if (ty == 0 && k < K) {
    acc_t tw = 0, tb = 0;
#pragma unroll
    for (int i = 0; i < kRowThreads; ++i) {
      tw += shw[i][tx];
      tb += shb[i][tx];
    }
    partial_w[blockIdx.y * K + k] = tw;
    partial_b[blockIdx.y * K + k] = tb;
  }
}

template <typename acc_t>
__global__ void colsum_finish_kernel(const acc_t* __restrict__ partial, int64_t slabs, int64_t cols,
                                     acc_t* __restrict__ out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t t = 0;
    for (int64_t s = 0; s < slabs; ++s) t += partial[s * cols + c];
    out[c] += t;
  }
}

}  // namespace psp_cuda
}  // namespace vita_ext
