// Row-wise fused epilogues of the CPU kernels: the parts PyTorch does not fuse (the CE epilogue over a
// logits row, the pixel-shuffle gather + LayerNorm and its backward). The GEMMs around them run
// through ATen; these loops are written so the compiler vectorizes them, and on x86-64 Linux they are
// compiled three times (AVX-512, AVX2, baseline) and picked at load time for the running CPU
// (GCC/clang target_clones), as ATen picks its own kernels. Definitions in row_kernels.cpp.
//
// Element types: float, c10::BFloat16, c10::Half rows (float arithmetic), and double (fp64 arithmetic,
// for gradcheck). NaN and Inf propagate as in the equivalent PyTorch composition.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace vita_ext {
namespace rows {

// Cross-entropy, forward: the row's max (NaN if any element is NaN) and sum_j exp(x_j - max) (fp64
// accumulation; not computed when the max is -inf: every element is then -inf and adds nothing).
void max_sumexp(const float* x, int64_t n, float& max, double& sum);
void max_sumexp(const c10::BFloat16* x, int64_t n, float& max, double& sum);
void max_sumexp(const c10::Half* x, int64_t n, float& max, double& sum);
void max_sumexp(const double* x, int64_t n, double& max, double& sum);

// Cross-entropy, backward: x_j <- g * (exp(round(x_j - lse)) - [j == col]) in place (x_j - lse formed in
// fp64 and rounded to float, so the exponent is accurate to its own ulp); col may be outside [0, n).
void softmax_grad(float* x, int64_t n, double lse, float g, int64_t col);
void softmax_grad(c10::BFloat16* x, int64_t n, double lse, float g, int64_t col);
void softmax_grad(c10::Half* x, int64_t n, double lse, float g, int64_t col);
void softmax_grad(double* x, int64_t n, double lse, double g, int64_t col);

// Cross-entropy with its gradient in the forward pass, one bf16/fp16 row over the WHOLE vocabulary:
// max and sum as max_sumexp (the same values), then x_j <- g * (e_j / sum - [j == col]) in place, where
// e_j = exp(x_j - max) is kept from the sum pass in the float scratch e (n floats): one exp per element
// instead of max_sumexp's plus softmax_grad's. x[col] is formed from exp(x_col - lse) as in softmax_grad.
// A row of -inf only (max -inf, sum 0) becomes NaN, as softmax_grad makes it.
void softmax_grad_row(c10::BFloat16* x, int64_t n, float* e, float g, int64_t col, float& max, double& sum);
void softmax_grad_row(c10::Half* x, int64_t n, float* e, float g, int64_t col, float& max, double& sum);

// LayerNorm of one row of K elements given as `parts` runs of `run` elements each (the pixel shuffle's
// four C-long runs): out = (v - mean) * rstd * w + b, with v the concatenated runs. Statistics in
// float (double for double), two passes (mean, then centred variance). scratch: K floats (doubles).
// Writes mean and rstd.
void layernorm(const float* const* runs, int parts, int64_t run, const float* w, const float* b, float eps,
               float* scratch, float* out, float& mean, float& rstd);
void layernorm(const c10::BFloat16* const* runs, int parts, int64_t run, const float* w, const float* b, float eps,
               float* scratch, c10::BFloat16* out, float& mean, float& rstd);
void layernorm(const c10::BFloat16* const* runs, int parts, int64_t run, const float* w, const float* b, float eps,
               float* scratch, float* out, float& mean, float& rstd);
void layernorm(const c10::Half* const* runs, int parts, int64_t run, const float* w, const float* b, float eps,
               float* scratch, c10::Half* out, float& mean, float& rstd);
void layernorm(const c10::Half* const* runs, int parts, int64_t run, const float* w, const float* b, float eps,
               float* scratch, float* out, float& mean, float& rstd);
void layernorm(const double* const* runs, int parts, int64_t run, const double* w, const double* b, double eps,
               double* scratch, double* out, double& mean, double& rstd);

// LayerNorm backward of one row: from dxn (the gradient of the LayerNorm output), the row's input runs
// and its (mean, rstd): dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dxn * w,
// written to dx_runs when not null; sum_w += dxn * xhat and sum_b += dxn when not null (the LayerNorm
// parameter gradients' partial sums, float / double). scratch: K floats (doubles).
void layernorm_backward(const float* const* runs, int parts, int64_t run, const float* dxn, const float* w,
                        float mean, float rstd, float* scratch, float* const* dx_runs, float* sum_w, float* sum_b);
void layernorm_backward(const c10::BFloat16* const* runs, int parts, int64_t run, const c10::BFloat16* dxn,
                        const float* w, float mean, float rstd, float* scratch, c10::BFloat16* const* dx_runs,
                        float* sum_w, float* sum_b);
void layernorm_backward(const c10::BFloat16* const* runs, int parts, int64_t run, const float* dxn, const float* w,
                        float mean, float rstd, float* scratch, c10::BFloat16* const* dx_runs, float* sum_w,
                        float* sum_b);
void layernorm_backward(const c10::Half* const* runs, int parts, int64_t run, const c10::Half* dxn, const float* w,
                        float mean, float rstd, float* scratch, c10::Half* const* dx_runs, float* sum_w,
                        float* sum_b);
void layernorm_backward(const c10::Half* const* runs, int parts, int64_t run, const float* dxn, const float* w,
                        float mean, float rstd, float* scratch, c10::Half* const* dx_runs, float* sum_w,
                        float* sum_b);
void layernorm_backward(const double* const* runs, int parts, int64_t run, const double* dxn, const double* w,
                        double mean, double rstd, double* scratch, double* const* dx_runs, double* sum_w,
                        double* sum_b);

// LM head for a few rows (decode): out[k * ldo + v] = sum_h x[k * H + h] * W[v * ldw + h] for v in
// [0, V), k in [0, K), fp32 products and sums (x is fp32). Each weight row is read once for all K rows:
// the op is bound by reading W, which a bf16/fp16 GEMV through oneDNN/MKL reads far slower.
void dot_rows(const float* W, int64_t ldw, int64_t V, int64_t H, const float* x, int64_t K, float* out, int64_t ldo);
void dot_rows(const c10::BFloat16* W, int64_t ldw, int64_t V, int64_t H, const float* x, int64_t K, float* out,
              int64_t ldo);
void dot_rows(const c10::Half* W, int64_t ldw, int64_t V, int64_t H, const float* x, int64_t K, float* out,
              int64_t ldo);

}  // namespace rows
}  // namespace vita_ext
