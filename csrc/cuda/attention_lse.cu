// attention_lse / attention_lse_backward on CUDA: FlashAttention-2 tiling with plain FMA (no tensor
// cores yet), written to be obviously right first.
//
// Head dims: any D in [1, 256]. Kernels are compiled for DMAX in {32, 64, 128, 256} and a head dim is
// padded (with zeros, in shared memory and registers) to the next DMAX, so D = 80 runs as 128.
// Dtypes: fp32, bf16, fp16 (fp64 is CPU-only). Math is fp32 for bf16/fp16 inputs and fp64 for fp32
// inputs: the backward's P = exp(s - lse) is not renormalised like a softmax, and with fp32 math
// the fp32 gradients were measured (on the CPU twin of this algorithm) to break the 2x rule against
// PyTorch's fp32 autograd in a few % of random draws.
//
// Forward: one block of 128 threads per (b, q head, tile of R query rows); a group of G threads
// (G = 4, or 8 for DMAX = 256) owns one query row, each thread DMAX / G of its dims (interleaved,
// d = e * G + g, so a group reads consecutive shared-memory words). Key/value tiles of KT keys are
// staged in shared memory as fp32; each group forms its row's KT scores (partial dots + __shfl_xor
// over the group), then the online-softmax update in registers. Key tiles outside the block's visible
// range (causal, packed segments) are never loaded. R = 32 (16 for DMAX = 256), KT = 32 (16).
// Cost: 4 * B * Hq * Sq * Sk_visible * DMAX FLOPs; K/V read once per query tile (L2-resident mostly).
//
// Backward: (1) Delta = rowsum(dO * O) - dlse, one warp per row. (2) one block per (b, kv head, tile of
// 128 / G keys): each group owns one key and accumulates its dK, dV in registers while looping over the
// query tiles (R rows, staged as fp32 with dO, lse, Delta and the row mask) of every q head of the GQA
// group that can see the tile; dS goes to shared memory and the tile's dQ share, dS K, is added with
// one atomicAdd per (row, dim) into an fp32/fp64 buffer, cast to the input dtype at the end.
// Cost: 10 * B * Hq * Sq * Sk_visible * DMAX FLOPs; dQ atomics: B * Hq * Sq * D per key tile seen.
//
// NOTE for a GPU session: first run python_tests/test_attention_lse.py and test_merge_attention.py on
// the device (correctness, incl. D = 80 padding, Sq > Sk, cu_seqlens, GQA), then compute-sanitizer
// (memcheck + racecheck) on a small case. Then measure against flash-attn / SDPA: this FMA version is
// expected to be several times slower than tensor-core kernels; the next steps are mma.sync tiles for
// bf16/fp16, a split-KV decode path (Sq = 1 uses 1/32 of a block and one block per head today), and
// packing a GQA group's query heads in one block for decode.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "attention_lse.h"

namespace vita_ext {
namespace {

using attn::MaskSpec;

constexpr int kThreads = 128;

template <typename T>
using MathT = std::conditional_t<std::is_same_v<T, float>, double, float>;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ float exp_m(float x) { return expf(x); }
__device__ __forceinline__ double exp_m(double x) { return exp(x); }
__device__ __forceinline__ float log_m(float x) { return logf(x); }
__device__ __forceinline__ double log_m(double x) { return log(x); }

// Sum over the G consecutive lanes of a group (G divides 32); every lane gets the same bits.
template <int G, typename M>
__device__ __forceinline__ M group_sum(M x) {
#pragma unroll
  for (int off = G / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <int DMAX>
struct Tile {
  static constexpr int G = DMAX <= 128 ? 4 : 8;       // threads per query row (fwd) or key (bwd)
  static constexpr int E = DMAX / G;                   // dims per thread
  static constexpr int kRows = DMAX <= 128 ? 32 : 16;  // query rows per tile
  static constexpr int kFwdKeys = DMAX <= 128 ? 32 : 16;
  static constexpr int kBwdKeys = kThreads / G;        // one key per group
  static constexpr int kPad = DMAX + G;                // bwd K/V row stride: groups of a warp hit distinct banks
  static_assert(kThreads / G == kRows, "forward: one group per query row");
};

struct Strides {
  int64_t b, s, h;
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;   // [B, Sq, Hq, D] contiguous
  float* lse;  // [B, Hq, Sq]
  Strides qs, ks, vs;
  int64_t Sq, Sk, Hq, Hkv, D;
  double scale;
  MaskSpec mask;
};

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const FwdParams p) {
  using C = Tile<DMAX>;
  using M = MathT<T>;
  constexpr int G = C::G, E = C::E, KT = C::kFwdKeys;
  __shared__ float k_s[KT][DMAX];
  __shared__ float v_s[KT][DMAX];

  const int tid = threadIdx.x, g = tid % G;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.Hq / p.Hkv);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * C::kRows, i = i0 + tid / G;
  const int64_t i_last = min64(i0 + C::kRows, p.Sq) - 1;
  const bool valid = i < p.Sq;
  int64_t lo = 0, hi = 0, kbeg, kend, unused;
  if (valid) attn::row_range(p.mask, i, lo, hi);
  attn::row_range(p.mask, i0, kbeg, unused);
  attn::row_range(p.mask, i_last, unused, kend);

  const T* q = static_cast<const T*>(p.q) + b * p.qs.b + (valid ? i : 0) * p.qs.s + h * p.qs.h;
  const T* k = static_cast<const T*>(p.k) + b * p.ks.b + hk * p.ks.h;
  const T* v = static_cast<const T*>(p.v) + b * p.vs.b + hk * p.vs.h;
  float qr[E];
  M o[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = e * G + g;
    qr[e] = (valid && d < p.D) ? static_cast<float>(q[d]) : 0.f;
    o[e] = M(0);
  }
  const M scale = static_cast<M>(p.scale), neg_inf = -INFINITY;
  M m = neg_inf, l = M(0);

  for (int64_t j0 = kbeg; j0 < kend; j0 += KT) {
    __syncthreads();  // the previous tile is consumed
    for (int idx = tid; idx < KT * DMAX; idx += kThreads) {
      const int jj = idx / DMAX, d = idx % DMAX;
      const int64_t j = j0 + jj;
      const bool in = j < kend && d < p.D;
      k_s[jj][d] = in ? static_cast<float>(k[j * p.ks.s + d]) : 0.f;
      v_s[jj][d] = in ? static_cast<float>(v[j * p.vs.s + d]) : 0.f;
    }
    __syncthreads();
    M s[KT];
    M tile_max = neg_inf;
#pragma unroll
    for (int jj = 0; jj < KT; ++jj) {
      M part = M(0);
#pragma unroll
      for (int e = 0; e < E; ++e) part += static_cast<M>(qr[e]) * static_cast<M>(k_s[jj][e * G + g]);
      part = group_sum<G>(part);
      const int64_t j = j0 + jj;
      s[jj] = (j >= lo && j < hi) ? part * scale : neg_inf;
      tile_max = max(tile_max, s[jj]);
    }
    const M m_new = max(m, tile_max);
    if (m_new == neg_inf) continue;  // nothing seen yet; no barrier or shuffle below
    const M alpha = (m == neg_inf) ? M(0) : exp_m(m - m_new);
    l *= alpha;
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] *= alpha;
#pragma unroll
    for (int jj = 0; jj < KT; ++jj) {
      const M pj = exp_m(s[jj] - m_new);
      l += pj;
#pragma unroll
      for (int e = 0; e < E; ++e) o[e] += pj * static_cast<M>(v_s[jj][e * G + g]);
    }
    m = m_new;
  }
  if (!valid) return;
  T* out = static_cast<T*>(p.out) + ((b * p.Sq + i) * p.Hq + h) * p.D;
  const bool seen = l > M(0);
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = e * G + g;
    if (d < p.D) out[d] = static_cast<T>(seen ? o[e] / l : M(0));
  }
  if (g == 0) p.lse[(b * p.Hq + h) * p.Sq + i] = seen ? static_cast<float>(m + log_m(l)) : -INFINITY;
}

// ----------------------------------------------------------------------------------------------------
// Backward

// Delta[b, h, i] = sum_d dO * O - dlse, one warp per row.
template <typename T, typename TO, typename M>
__global__ void attention_bwd_delta_kernel(const T* dout, Strides gs, const TO* out, Strides os, const float* dlse,
                                           M* delta, int64_t B, int64_t Sq, int64_t Hq, int64_t D) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B * Hq * Sq) return;  // whole warps leave together
  const int64_t i = row % Sq, h = (row / Sq) % Hq, b = row / (Sq * Hq);
  const T* g = dout + b * gs.b + i * gs.s + h * gs.h;
  const TO* o = out + b * os.b + i * os.s + h * os.h;
  M acc = M(0);
  for (int64_t d = lane; d < D; d += 32) acc += static_cast<M>(static_cast<float>(g[d])) * static_cast<M>(o[d]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) delta[row] = acc - (dlse ? static_cast<M>(dlse[row]) : M(0));
}

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  const float* lse;  // [B, Hq, Sq] contiguous
  const void* delta;  // [B, Hq, Sq] in the math type
  void* dq;           // [B, Sq, Hq, D] accumulator in the math type, scaled
  void* dk;           // [B, Sk, Hkv, D] contiguous, input dtype
  void* dv;
  Strides qs, ks, vs, gs;
  int64_t Sq, Sk, Hq, Hkv, D;
  double scale;
  MaskSpec mask;
};

// Shared memory of the backward block, carved from one dynamic buffer (8-byte types first).
template <typename M, int DMAX>
struct BwdSmem {
  using C = Tile<DMAX>;
  static constexpr int R = C::kRows, KB = C::kBwdKeys;
  static constexpr size_t kDs = 0;                                     // M [R][KB]
  static constexpr size_t kDelta = kDs + sizeof(M) * R * KB;           // M [R]
  static constexpr size_t kLo = kDelta + sizeof(M) * R;                // int64 [R]
  static constexpr size_t kHi = kLo + sizeof(int64_t) * R;             // int64 [R]
  static constexpr size_t kLse = kHi + sizeof(int64_t) * R;            // float [R]
  static constexpr size_t kQ = kLse + sizeof(float) * R;               // float [R][DMAX]
  static constexpr size_t kDo = kQ + sizeof(float) * R * DMAX;         // float [R][DMAX]
  static constexpr size_t kK = kDo + sizeof(float) * R * DMAX;         // float [KB][kPad]
  static constexpr size_t kV = kK + sizeof(float) * KB * C::kPad;      // float [KB][kPad]
  static constexpr size_t kBytes = kV + sizeof(float) * KB * C::kPad;
};

// Stages rows [i0, i0 + R) of head h (zeros past `end`): q, dO, lse, Delta and the visible-key range.
template <typename T, typename M, int DMAX>
__device__ void stage_rows(const BwdParams& p, unsigned char* smem, int64_t b, int64_t h, int64_t i0, int64_t end) {
  using S = BwdSmem<M, DMAX>;
  float* q_s = reinterpret_cast<float*>(smem + S::kQ);
  float* do_s = reinterpret_cast<float*>(smem + S::kDo);
  for (int idx = threadIdx.x; idx < S::R * DMAX; idx += kThreads) {
    const int r = idx / DMAX, d = idx % DMAX;
    const int64_t i = i0 + r;
    const bool in = i < end && d < p.D;
    q_s[idx] = in ? static_cast<float>(static_cast<const T*>(p.q)[b * p.qs.b + i * p.qs.s + h * p.qs.h + d]) : 0.f;
    do_s[idx] = in ? static_cast<float>(static_cast<const T*>(p.dout)[b * p.gs.b + i * p.gs.s + h * p.gs.h + d]) : 0.f;
  }
  for (int r = threadIdx.x; r < S::R; r += kThreads) {
    const int64_t i = i0 + r;
    int64_t lo = 0, hi = 0;
    float lse = -INFINITY;
    M delta = M(0);
    if (i < end) {
      attn::row_range(p.mask, i, lo, hi);
      lse = p.lse[(b * p.Hq + h) * p.Sq + i];
      delta = static_cast<const M*>(p.delta)[(b * p.Hq + h) * p.Sq + i];
    }
    reinterpret_cast<int64_t*>(smem + S::kLo)[r] = lo;
    reinterpret_cast<int64_t*>(smem + S::kHi)[r] = hi;
    reinterpret_cast<float*>(smem + S::kLse)[r] = lse;
    reinterpret_cast<M*>(smem + S::kDelta)[r] = delta;
  }
}

// dQ[i0 + r, d] += scale * sum_j dS[r, j] K[j, d]: one atomicAdd per (row, dim) per key tile.
template <typename M, int DMAX>
__device__ void add_dq(const BwdParams& p, const unsigned char* smem, int64_t b, int64_t h, int64_t i0, int64_t end) {
  using S = BwdSmem<M, DMAX>;
  const M* ds_s = reinterpret_cast<const M*>(smem + S::kDs);
  const float* k_s = reinterpret_cast<const float*>(smem + S::kK);
  M* dq = static_cast<M*>(p.dq);
  for (int idx = threadIdx.x; idx < S::R * DMAX; idx += kThreads) {
    const int r = idx / DMAX, d = idx % DMAX;
    const int64_t i = i0 + r;
    if (i >= end || d >= p.D) continue;
    M acc = M(0);
#pragma unroll 8
    for (int jj = 0; jj < S::KB; ++jj) acc += ds_s[r * S::KB + jj] * static_cast<M>(k_s[jj * Tile<DMAX>::kPad + d]);
    if (acc != M(0)) atomicAdd(dq + ((b * p.Sq + i) * p.Hq + h) * p.D + d, acc * static_cast<M>(p.scale));
  }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(const BwdParams p) {
  using C = Tile<DMAX>;
  using M = MathT<T>;
  using S = BwdSmem<M, DMAX>;
  constexpr int G = C::G, E = C::E, KB = C::kBwdKeys, R = C::kRows, P = C::kPad;
  extern __shared__ __align__(16) unsigned char smem[];
  M* ds_s = reinterpret_cast<M*>(smem + S::kDs);
  const M* delta_s = reinterpret_cast<const M*>(smem + S::kDelta);
  const int64_t* lo_s = reinterpret_cast<const int64_t*>(smem + S::kLo);
  const int64_t* hi_s = reinterpret_cast<const int64_t*>(smem + S::kHi);
  const float* lse_s = reinterpret_cast<const float*>(smem + S::kLse);
  const float* q_s = reinterpret_cast<const float*>(smem + S::kQ);
  const float* do_s = reinterpret_cast<const float*>(smem + S::kDo);
  float* k_s = reinterpret_cast<float*>(smem + S::kK);
  float* v_s = reinterpret_cast<float*>(smem + S::kV);

  const int tid = threadIdx.x, g = tid % G, jl = tid / G;
  const int64_t b = blockIdx.z, hk = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * KB, j = j0 + jl;
  const int64_t j1 = min64(j0 + KB, p.Sk), group = p.Hq / p.Hkv;
  for (int idx = tid; idx < KB * DMAX; idx += kThreads) {
    const int jj = idx / DMAX, d = idx % DMAX;
    const bool in = j0 + jj < p.Sk && d < p.D;
    const int64_t kj = in ? j0 + jj : 0;
    k_s[jj * P + d] = in ? static_cast<float>(static_cast<const T*>(p.k)[b * p.ks.b + kj * p.ks.s + hk * p.ks.h + d]) : 0.f;
    v_s[jj * P + d] = in ? static_cast<float>(static_cast<const T*>(p.v)[b * p.vs.b + kj * p.vs.s + hk * p.vs.h + d]) : 0.f;
  }
  M dk[E], dv[E];
#pragma unroll
  for (int e = 0; e < E; ++e) dk[e] = dv[e] = M(0);
  int64_t first, end;
  attn::rows_seeing(p.mask, j0, j1, first, end);
  const M scale = static_cast<M>(p.scale);

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = first; i0 < end; i0 += R) {
      __syncthreads();  // K/V staged; the previous row tile and its dS are consumed
      stage_rows<T, M, DMAX>(p, smem, b, h, i0, end);
      __syncthreads();
      for (int r = 0; r < R; ++r) {
        M sp = M(0), dp = M(0);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int d = e * G + g;
          sp += static_cast<M>(k_s[jl * P + d]) * static_cast<M>(q_s[r * DMAX + d]);
          dp += static_cast<M>(v_s[jl * P + d]) * static_cast<M>(do_s[r * DMAX + d]);
        }
        sp = group_sum<G>(sp);
        dp = group_sum<G>(dp);
        const float lse = lse_s[r];
        const bool vis = j < p.Sk && j >= lo_s[r] && j < hi_s[r] && lse != -INFINITY;
        const M pr = vis ? exp_m(sp * scale - static_cast<M>(lse)) : M(0);
        const M ds = pr * (dp - delta_s[r]);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int d = e * G + g;
          dv[e] += pr * static_cast<M>(do_s[r * DMAX + d]);
          dk[e] += ds * static_cast<M>(q_s[r * DMAX + d]);
        }
        if (g == 0) ds_s[r * KB + jl] = ds;
      }
      __syncthreads();
      add_dq<M, DMAX>(p, smem, b, h, i0, end);
    }
  }
  if (j >= p.Sk) return;
  T* gk = static_cast<T*>(p.dk) + ((b * p.Sk + j) * p.Hkv + hk) * p.D;
  T* gv = static_cast<T*>(p.dv) + ((b * p.Sk + j) * p.Hkv + hk) * p.D;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = e * G + g;
    if (d < p.D) {
      gk[d] = static_cast<T>(dk[e] * scale);
      gv[d] = static_cast<T>(dv[e]);
    }
  }
}

// ----------------------------------------------------------------------------------------------------
// Host side

template <typename F>
void dispatch_storage(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype_name(t));
  }
}

template <typename F>
void dispatch_dmax(int64_t d, F&& f) {
  if (d <= 32) f(std::integral_constant<int, 32>{});
  else if (d <= 64) f(std::integral_constant<int, 64>{});
  else if (d <= 128) f(std::integral_constant<int, 128>{});
  else f(std::integral_constant<int, 256>{});
}

void check_grid(const char* op, int64_t tiles, int64_t heads, int64_t batch) {
  TORCH_CHECK(tiles < (int64_t{1} << 31) && heads <= 65535 && batch <= 65535, op,
              ": too many tiles, heads or batch entries for one CUDA grid (", tiles, ", ", heads, ", ", batch, ")");
}

std::tuple<at::Tensor, at::Tensor> attention_lse_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, bool causal, double softmax_scale,
                                                      const c10::optional<at::Tensor>& cu_seqlens,
                                                      c10::optional<int64_t> max_seqlen) {
  const char* op = "vita_ext::attention_lse";
  const std::vector<int64_t> cu = attn::check_attention_lse_args(op, q_in, k_in, v_in, cu_seqlens, max_seqlen);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = attn::inner_contiguous(q_in), k = attn::inner_contiguous(k_in),
                   v = attn::inner_contiguous(v_in);
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  at::Tensor cu_keep;
  const MaskSpec mask = attn::make_mask(q, k, causal, cu, cu_keep, cu_seqlens, max_seqlen);
  FwdParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
              strides_of(q), strides_of(k), strides_of(v), Sq, k.size(1), Hq, k.size(2), D, softmax_scale, mask};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_storage(op, q.scalar_type(), [&](auto t_tag) {
    using T = decltype(t_tag);
    dispatch_dmax(D, [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      const int64_t tiles = (Sq + Tile<DMAX>::kRows - 1) / Tile<DMAX>::kRows;
      check_grid(op, tiles, Hq, B);
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(Hq), static_cast<unsigned>(B));
      attention_fwd_kernel<T, DMAX><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

template <typename T>
void launch_delta(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& dlse, at::Tensor& delta,
                  cudaStream_t stream) {
  using M = MathT<T>;
  const int64_t B = dout.size(0), Sq = dout.size(1), Hq = dout.size(2), D = dout.size(3);
  const int64_t rows = B * Hq * Sq, warps = 8;
  const int64_t blocks = (rows + warps - 1) / warps;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "vita_ext::attention_lse_backward: too many rows for one CUDA grid");
  const float* dl = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  const T* g = static_cast<const T*>(dout.data_ptr());
  if (out.scalar_type() == dout.scalar_type()) {
    attention_bwd_delta_kernel<T, T, M><<<static_cast<unsigned>(blocks), warps * 32, 0, stream>>>(
        g, strides_of(dout), static_cast<const T*>(out.data_ptr()), strides_of(out), dl,
        static_cast<M*>(delta.data_ptr()), B, Sq, Hq, D);
  } else {
    attention_bwd_delta_kernel<T, float, M><<<static_cast<unsigned>(blocks), warps * 32, 0, stream>>>(
        g, strides_of(dout), out.data_ptr<float>(), strides_of(out), dl, static_cast<M*>(delta.data_ptr()), B, Sq,
        Hq, D);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_lse_backward_cuda(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, bool causal,
    double softmax_scale, const c10::optional<at::Tensor>& cu_seqlens, c10::optional<int64_t> max_seqlen) {
  const char* op = "vita_ext::attention_lse_backward";
  const std::vector<int64_t> cu = attn::check_attention_lse_backward_args(op, grad_out_in, grad_lse, q_in, k_in,
                                                                          v_in, out_in, lse_in, cu_seqlens,
                                                                          max_seqlen);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = attn::inner_contiguous(q_in), k = attn::inner_contiguous(k_in),
                   v = attn::inner_contiguous(v_in), dout = attn::inner_contiguous(grad_out_in),
                   out = attn::inner_contiguous(out_in), lse = lse_in.contiguous();
  const auto fmt = at::MemoryFormat::Contiguous;
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(fmt));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(fmt));
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Sk = k.size(1), Hkv = k.size(2);
  if (dk.numel() == 0 || q.numel() == 0) {
    dk.zero_();
    dv.zero_();
    return {at::zeros(q.sizes(), q.options().memory_format(fmt)), dk, dv};
  }
  const at::ScalarType math = q.scalar_type() == at::kFloat ? at::kDouble : at::kFloat;
  at::Tensor delta = at::empty({B, Hq, Sq}, lse.options().dtype(math));
  at::Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(math).memory_format(fmt));
  const at::Tensor dlse = (grad_lse.has_value() && grad_lse->defined()) ? grad_lse->contiguous() : at::Tensor();
  at::Tensor cu_keep;
  const MaskSpec mask = attn::make_mask(q, k, causal, cu, cu_keep, cu_seqlens, max_seqlen);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BwdParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr<float>(), delta.data_ptr(),
              dq_acc.data_ptr(), dk.data_ptr(), dv.data_ptr(), strides_of(q), strides_of(k), strides_of(v),
              strides_of(dout), Sq, Sk, Hq, Hkv, D, softmax_scale, mask};
  dispatch_storage(op, q.scalar_type(), [&](auto t_tag) {
    using T = decltype(t_tag);
    launch_delta<T>(dout, out, dlse, delta, stream);
    dispatch_dmax(D, [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      const int64_t tiles = (Sk + Tile<DMAX>::kBwdKeys - 1) / Tile<DMAX>::kBwdKeys;
      check_grid(op, tiles, Hkv, B);
      constexpr size_t smem = BwdSmem<MathT<T>, DMAX>::kBytes;
      auto kernel = attention_bwd_kernel<T, DMAX>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(Hkv), static_cast<unsigned>(B));
      kernel<<<grid, kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dq_acc.to(q.scalar_type()), dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CUDA, m) {
  m.impl("attention_lse", &attention_lse_cuda);
  m.impl("attention_lse_backward", &attention_lse_backward_cuda);
}

}  // namespace vita_ext
