// Row-wise fused epilogues of the CPU kernels (declarations and contracts in row_kernels.h).
//
// Vectorization. The loops are plain C++ that GCC/clang vectorize at -O3; float reductions carry
// `omp simd reduction` (compiled with -fopenmp) so they may be reassociated across lanes, which plain
// -O3 forbids. exp is our own branch-free polynomial (below) because calls to std::exp do not
// vectorize without -ffast-math, and -ffast-math would assume away the NaN/Inf we must propagate.
// Each exported function is a thin wrapper around an always-inline template, marked VITA_CLONES so
// that on x86-64 Linux the compiler emits AVX-512, AVX2 and baseline versions and the loader picks one
// for the CPU at hand (elsewhere: one baseline version).
//
// exp (float). exp(x) = 2^n * exp(r), n = nearest integer to x / ln 2 (by the 1.5 * 2^23 rounding
// trick, no call), r = x - n ln2 in [-ln2/2, ln2/2] (ln 2 split in two constants, Cody-Waite), exp(r)
// by its Taylor polynomial of degree 7 (truncation < 6e-9 relative, below half an ulp), 2^n built
// in the exponent bits: ~2 ulp at most. x < -87 gives 0 (the true value is < 1.7e-38) and x > 88
// gives +inf, so exp(-inf) = 0 exactly, as the softmax needs; NaN propagates.
#include "cpu/row_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(VITA_EXT_NO_CLONES) && (!defined(__clang__) || __clang_major__ >= 14)
#define VITA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VITA_CLONES
#endif

#if defined(_OPENMP)
#define VITA_PRAGMA(x) _Pragma(#x)
#define VITA_SIMD_SUM(var) VITA_PRAGMA(omp simd reduction(+ : var))
#define VITA_SIMD_SUM2(a, b) VITA_PRAGMA(omp simd reduction(+ : a, b))
#define VITA_SIMD_MAX(var) VITA_PRAGMA(omp simd reduction(max : var))
#else
#define VITA_SIMD_SUM(var)
#define VITA_SIMD_SUM2(a, b)
#define VITA_SIMD_MAX(var)
#endif

#define VITA_INLINE inline __attribute__((always_inline))

namespace vita_ext {
namespace rows {
namespace {

template <typename T>
VITA_INLINE float to_f(T v) {
  return static_cast<float>(v);
}

VITA_INLINE float exp_poly(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 10 significant bits: n * kLn2Hi is exact for |n| < 2^14
  constexpr float kLn2Lo = -2.12194440054690583e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  // Comparisons written so that NaN falls through unchanged (std::fmin/fmax would drop it).
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const int32_t ni = tb - 0x4B400000;  // the integer n, read from t's mantissa
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t sb = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &sb, sizeof(scale));
  float y = p * scale;
  y = x < -87.0f ? 0.0f : y;
  y = x > 88.0f ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// ------------------------------------------------------------------------------ cross-entropy

template <typename T>
VITA_INLINE float row_max(const T* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  VITA_SIMD_MAX(m)
  for (int64_t j = 0; j < n; ++j) m = m > to_f(x[j]) ? m : to_f(x[j]);
  // A SIMD max may drop a NaN; the sum of exp(x - m) restores it (exp(NaN - m) = NaN), except when
  // every other element is -inf: look for a NaN then (a rare, cold path).
  if (m == -std::numeric_limits<float>::infinity()) {
    for (int64_t j = 0; j < n; ++j) {
      if (to_f(x[j]) != to_f(x[j])) m = to_f(x[j]);
    }
  }
  return m;
}

// sum_j exp(v_j - m) of a float run: float lanes within blocks of kSumBlock elements, double across
// blocks (at worst ~64 float ulps per lane, far below a bf16/fp16 logit's rounding). With keep, v_j
// becomes exp(v_j - m). The exp loop runs from float data: on the bf16 rows it ran 2.5x slower when it
// converted each element itself (measured, one AVX-512 thread: 1.54 vs 0.63 ns an element).
constexpr int64_t kSumBlock = 1024;

template <bool keep>
VITA_INLINE double exp_sum_blocks(float* v, int64_t n, float m) {
  double s = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t len = n - b0 < kSumBlock ? n - b0 : kSumBlock;
    float* vb = v + b0;
    float bs = 0.0f;
    VITA_SIMD_SUM(bs)
    for (int64_t j = 0; j < len; ++j) {
      const float y = exp_poly(vb[j] - m);
      if constexpr (keep) vb[j] = y;
      bs += y;
    }
    s += static_cast<double>(bs);
  }
  return s;
}

template <typename T>
VITA_INLINE void max_sumexp_impl(const T* x, int64_t n, float& max_out, double& sum_out) {
  const float m = row_max(x, n);
  max_out = m;
  if (m == -std::numeric_limits<float>::infinity()) {
    sum_out = 0.0;
    return;
  }
  if constexpr (std::is_same_v<T, float>) {  // fp32 rows: fp64 accumulation, as PyTorch's own fp32 results need
    double s = 0.0;
    VITA_SIMD_SUM(s)
    for (int64_t j = 0; j < n; ++j) s += static_cast<double>(exp_poly(x[j] - m));
    sum_out = s;
  } else {  // bf16/fp16 rows: converted block by block, summed as softmax_grad_row sums
    float buf[kSumBlock];
    double s = 0.0;
    for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
      const int64_t len = n - b0 < kSumBlock ? n - b0 : kSumBlock;
      for (int64_t j = 0; j < len; ++j) buf[j] = to_f(x[b0 + j]);
      s += exp_sum_blocks<false>(buf, len, m);
    }
    sum_out = s;
  }
}

template <typename T>
VITA_INLINE void softmax_grad_impl(T* x, int64_t n, double lse, float g, int64_t col) {
  const float at_col = (col >= 0 && col < n) ? to_f(x[col]) : 0.0f;
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t j = 0; j < n; ++j) {
      const float z = static_cast<float>(static_cast<double>(to_f(x[j])) - lse);
      x[j] = static_cast<T>(g * exp_poly(z));
    }
  } else {
    // A bf16/fp16 tile: z in float from lse split into hi + lo floats (|z| error ~1e-7 relative, far
    // below the tile's rounding), so the loop runs in float lanes (2x the double lanes).
    // Converted block by block first (see exp_sum_blocks: the exp loop is faster from float data).
    const float lse_hi = static_cast<float>(lse);
    const float lse_lo = static_cast<float>(lse - static_cast<double>(lse_hi));
    float buf[kSumBlock];
    for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
      const int64_t len = n - b0 < kSumBlock ? n - b0 : kSumBlock;
      T* xb = x + b0;
      for (int64_t j = 0; j < len; ++j) buf[j] = to_f(xb[j]);
      for (int64_t j = 0; j < len; ++j) buf[j] = g * exp_poly((buf[j] - lse_hi) - lse_lo);
      for (int64_t j = 0; j < len; ++j) xb[j] = static_cast<T>(buf[j]);
    }
  }
  if (col >= 0 && col < n) {
    const float z = static_cast<float>(static_cast<double>(at_col) - lse);
    x[col] = static_cast<T>(g * (exp_poly(z) - 1.0f));
  }
}

// grad_in_forward over a whole bf16/fp16 row: the exps of the max/sum pass, kept in float, are the
// softmax (times the sum), so the gradient pass needs no second exp (one exp per element, not two).
template <typename T>
VITA_INLINE void softmax_grad_row_impl(T* x, int64_t n, float* e, float g, int64_t col, float& max_out,
                                       double& sum_out) {
  const bool has_col = col >= 0 && col < n;
  const float at_col = has_col ? to_f(x[col]) : 0.0f;
  for (int64_t j = 0; j < n; ++j) e[j] = to_f(x[j]);
  const float m = row_max(e, n);
  max_out = m;
  if (m == -std::numeric_limits<float>::infinity()) {  // every logit -inf: exp(-inf - lse) is NaN there
    sum_out = 0.0;
    for (int64_t j = 0; j < n; ++j) x[j] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  sum_out = exp_sum_blocks<true>(e, n, m);  // the same sum as max_sumexp's
  const float scale = static_cast<float>(static_cast<double>(g) / sum_out);
  for (int64_t j = 0; j < n; ++j) x[j] = static_cast<T>(e[j] * scale);
  if (has_col) {
    const double lse = static_cast<double>(m) + std::log(sum_out);
    const float z = static_cast<float>(static_cast<double>(at_col) - lse);
    x[col] = static_cast<T>(g * (exp_poly(z) - 1.0f));
  }
}

// --------------------------------------------------------------------------------- LayerNorm

template <typename in_t, typename out_t, typename acc_t>
VITA_INLINE void layernorm_impl(const in_t* const* runs, int parts, int64_t run, const acc_t* w, const acc_t* b,
                                acc_t eps, acc_t* v, out_t* out, acc_t& mean_out, acc_t& rstd_out) {
  const int64_t K = parts * run;
  for (int q = 0; q < parts; ++q) {
    const in_t* src = runs[q];
    acc_t* dst = v + q * run;
    for (int64_t c = 0; c < run; ++c) dst[c] = static_cast<acc_t>(src[c]);
  }
  acc_t sum = 0;
  VITA_SIMD_SUM(sum)
  for (int64_t k = 0; k < K; ++k) sum += v[k];
  const acc_t mean = sum / static_cast<acc_t>(K);
  acc_t sq = 0;
  VITA_SIMD_SUM(sq)
  for (int64_t k = 0; k < K; ++k) sq += (v[k] - mean) * (v[k] - mean);
  const acc_t rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(K) + eps);
  for (int64_t k = 0; k < K; ++k) out[k] = static_cast<out_t>((v[k] - mean) * rstd * w[k] + b[k]);
  mean_out = mean;
  rstd_out = rstd;
}

template <typename x_t, typename d_t, typename acc_t>
VITA_INLINE void layernorm_backward_impl(const x_t* const* runs, int parts, int64_t run, const d_t* dxn,
                                         const acc_t* w, acc_t mean, acc_t rstd, acc_t* xhat,
                                         x_t* const* dx_runs, acc_t* sum_w, acc_t* sum_b) {
  const int64_t K = parts * run;
  for (int q = 0; q < parts; ++q) {
    const x_t* src = runs[q];
    acc_t* dst = xhat + q * run;
    for (int64_t c = 0; c < run; ++c) dst[c] = (static_cast<acc_t>(src[c]) - mean) * rstd;
  }
  if (sum_w != nullptr) {
    for (int64_t k = 0; k < K; ++k) sum_w[k] += static_cast<acc_t>(dxn[k]) * xhat[k];
  }
  if (sum_b != nullptr) {
    for (int64_t k = 0; k < K; ++k) sum_b[k] += static_cast<acc_t>(dxn[k]);
  }
  if (dx_runs == nullptr) return;
  acc_t s1 = 0, s2 = 0;
  VITA_SIMD_SUM2(s1, s2)
  for (int64_t k = 0; k < K; ++k) {
    const acc_t dxh = static_cast<acc_t>(dxn[k]) * w[k];
    s1 += dxh;
    s2 += dxh * xhat[k];
  }
  s1 /= static_cast<acc_t>(K);
  s2 /= static_cast<acc_t>(K);
  for (int q = 0; q < parts; ++q) {
    x_t* dst = dx_runs[q];
    const d_t* g = dxn + q * run;
    const acc_t* wq = w + q * run;
    const acc_t* xh = xhat + q * run;
    for (int64_t c = 0; c < run; ++c) {
      dst[c] = static_cast<x_t>(rstd * (static_cast<acc_t>(g[c]) * wq[c] - s1 - xh[c] * s2));
    }
  }
}

// ------------------------------------------------------------------------------------- GEMV

template <typename T>
VITA_INLINE void dot_rows_impl(const T* W, int64_t ldw, int64_t V, int64_t H, const float* x, int64_t K, float* out,
                               int64_t ldo) {
  for (int64_t v = 0; v < V; ++v) {
    const T* w = W + v * ldw;
    for (int64_t k = 0; k < K; ++k) {  // the weight row stays in L1 across the K rows
      const float* xk = x + k * H;
      float acc = 0.0f;
      VITA_SIMD_SUM(acc)
      for (int64_t h = 0; h < H; ++h) acc += xk[h] * to_f(w[h]);
      out[k * ldo + v] = acc;
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------- exported wrappers

VITA_CLONES void max_sumexp(const float* x, int64_t n, float& max, double& sum) { max_sumexp_impl(x, n, max, sum); }
VITA_CLONES void max_sumexp(const c10::BFloat16* x, int64_t n, float& max, double& sum) {
  max_sumexp_impl(x, n, max, sum);
}
VITA_CLONES void max_sumexp(const c10::Half* x, int64_t n, float& max, double& sum) {
  max_sumexp_impl(x, n, max, sum);
}

void max_sumexp(const double* x, int64_t n, double& max_out, double& sum_out) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = (x[j] > m || x[j] != x[j]) ? x[j] : m;
  max_out = m;
  sum_out = 0.0;
  if (m == -std::numeric_limits<double>::infinity()) return;
  for (int64_t j = 0; j < n; ++j) sum_out += std::exp(x[j] - m);
}

VITA_CLONES void softmax_grad(float* x, int64_t n, double lse, float g, int64_t col) {
  softmax_grad_impl(x, n, lse, g, col);
}
VITA_CLONES void softmax_grad(c10::BFloat16* x, int64_t n, double lse, float g, int64_t col) {
  softmax_grad_impl(x, n, lse, g, col);
}
VITA_CLONES void softmax_grad(c10::Half* x, int64_t n, double lse, float g, int64_t col) {
  softmax_grad_impl(x, n, lse, g, col);
}

void softmax_grad(double* x, int64_t n, double lse, double g, int64_t col) {
  for (int64_t j = 0; j < n; ++j) x[j] = g * (std::exp(x[j] - lse) - (j == col ? 1.0 : 0.0));
}

VITA_CLONES void softmax_grad_row(c10::BFloat16* x, int64_t n, float* e, float g, int64_t col, float& max,
                                  double& sum) {
  softmax_grad_row_impl(x, n, e, g, col, max, sum);
}
VITA_CLONES void softmax_grad_row(c10::Half* x, int64_t n, float* e, float g, int64_t col, float& max, double& sum) {
  softmax_grad_row_impl(x, n, e, g, col, max, sum);
}

VITA_CLONES void layernorm(const float* const* runs, int parts, int64_t run, const float* w, const float* b,
                           float eps, float* scratch, float* out, float& mean, float& rstd) {
  layernorm_impl(runs, parts, run, w, b, eps, scratch, out, mean, rstd);
}
VITA_CLONES void layernorm(const c10::BFloat16* const* runs, int parts, int64_t run, const float* w, const float* b,
                           float eps, float* scratch, c10::BFloat16* out, float& mean, float& rstd) {
  layernorm_impl(runs, parts, run, w, b, eps, scratch, out, mean, rstd);
}
VITA_CLONES void layernorm(const c10::BFloat16* const* runs, int parts, int64_t run, const float* w, const float* b,
                           float eps, float* scratch, float* out, float& mean, float& rstd) {
  layernorm_impl(runs, parts, run, w, b, eps, scratch, out, mean, rstd);
}
VITA_CLONES void layernorm(const c10::Half* const* runs, int parts, int64_t run, const float* w, const float* b,
                           float eps, float* scratch, c10::Half* out, float& mean, float& rstd) {
  layernorm_impl(runs, parts, run, w, b, eps, scratch, out, mean, rstd);
}
VITA_CLONES void layernorm(const c10::Half* const* runs, int parts, int64_t run, const float* w, const float* b,
                           float eps, float* scratch, float* out, float& mean, float& rstd) {
  layernorm_impl(runs, parts, run, w, b, eps, scratch, out, mean, rstd);
}
void layernorm(const double* const* runs, int parts, int64_t run, const double* w, const double* b, double eps,
               double* scratch, double* out, double& mean, double& rstd) {
  layernorm_impl(runs, parts, run, w, b, eps, scratch, out, mean, rstd);
}

VITA_CLONES void layernorm_backward(const float* const* runs, int parts, int64_t run, const float* dxn,
                                    const float* w, float mean, float rstd, float* scratch, float* const* dx_runs,
                                    float* sum_w, float* sum_b) {
  layernorm_backward_impl(runs, parts, run, dxn, w, mean, rstd, scratch, dx_runs, sum_w, sum_b);
}
VITA_CLONES void layernorm_backward(const c10::BFloat16* const* runs, int parts, int64_t run,
                                    const c10::BFloat16* dxn, const float* w, float mean, float rstd, float* scratch,
                                    c10::BFloat16* const* dx_runs, float* sum_w, float* sum_b) {
  layernorm_backward_impl(runs, parts, run, dxn, w, mean, rstd, scratch, dx_runs, sum_w, sum_b);
}
VITA_CLONES void layernorm_backward(const c10::BFloat16* const* runs, int parts, int64_t run, const float* dxn,
                                    const float* w, float mean, float rstd, float* scratch,
                                    c10::BFloat16* const* dx_runs, float* sum_w, float* sum_b) {
  layernorm_backward_impl(runs, parts, run, dxn, w, mean, rstd, scratch, dx_runs, sum_w, sum_b);
}
VITA_CLONES void layernorm_backward(const c10::Half* const* runs, int parts, int64_t run, const c10::Half* dxn,
                                    const float* w, float mean, float rstd, float* scratch,
                                    c10::Half* const* dx_runs, float* sum_w, float* sum_b) {
  layernorm_backward_impl(runs, parts, run, dxn, w, mean, rstd, scratch, dx_runs, sum_w, sum_b);
}
VITA_CLONES void layernorm_backward(const c10::Half* const* runs, int parts, int64_t run, const float* dxn,
                                    const float* w, float mean, float rstd, float* scratch,
                                    c10::Half* const* dx_runs, float* sum_w, float* sum_b) {
  layernorm_backward_impl(runs, parts, run, dxn, w, mean, rstd, scratch, dx_runs, sum_w, sum_b);
}
void layernorm_backward(const double* const* runs, int parts, int64_t run, const double* dxn, const double* w,
                        double mean, double rstd, double* scratch, double* const* dx_runs, double* sum_w,
                        double* sum_b) {
  layernorm_backward_impl(runs, parts, run, dxn, w, mean, rstd, scratch, dx_runs, sum_w, sum_b);
}

VITA_CLONES void dot_rows(const float* W, int64_t ldw, int64_t V, int64_t H, const float* x, int64_t K, float* out,
                          int64_t ldo) {
  dot_rows_impl(W, ldw, V, H, x, K, out, ldo);
}
VITA_CLONES void dot_rows(const c10::BFloat16* W, int64_t ldw, int64_t V, int64_t H, const float* x, int64_t K,
                          float* out, int64_t ldo) {
  dot_rows_impl(W, ldw, V, H, x, K, out, ldo);
}
VITA_CLONES void dot_rows(const c10::Half* W, int64_t ldw, int64_t V, int64_t H, const float* x, int64_t K,
                          float* out, int64_t ldo) {
  dot_rows_impl(W, ldw, V, H, x, K, out, ldo);
}

}  // namespace rows
}  // namespace vita_ext
