// pixel_shuffle_projector on the CPU: y = gelu(layer_norm(pixel_shuffle(x)) @ w1^T + b1) @ w2^T + b2.
//
// Algorithm. Rows are processed in chunks of kChunkRows shuffled rows so temporaries stay bounded.
// Per chunk: a LayerNorm loop over rows (at::parallel_for) gathers the four C-long runs of each
// shuffled row straight from x (the shuffled tensor is never formed), computes fp32 mean and variance
// (two passes over the gathered row) and writes xn; then h = xn @ w1^T + b1 (at::addmm), exact GELU
// in place, y = g @ w2^T + b2, cast into the output. Half types compute in fp32 (weights converted
// once per call); fp64 computes in fp64 (gradcheck).
// The backward recomputes xn and h per chunk (nothing but the inputs is saved), then
// dW2 += dy^T g, db2 += sum dy, dh = (dy w2) * gelu'(h), dW1 += dh^T xn, db1 += sum dh, dxn = dh w1,
// dln_weight += sum dxn*xhat, dln_bias += sum dxn, and per row the LayerNorm backward
// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dxn * ln_weight, written
// to the four runs of x's (unshuffled) layout. Parameter gradients accumulate in fp32 across chunks.
//
// Cost, M = N*L/4 rows, K = 4C: forward 2*M*(K*D1 + D1*D2) FLOPs, reads x once (M*K elements) and
// the weights, writes M*D2; backward 2*M*(3*K*D1 + 2*D1*D2) FLOPs (h recompute, dW1, dxn; dW2, dg)
// plus O(M*(K + D1)) elementwise work.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "pixel_shuffle_projector.h"

namespace vita_ext {
namespace {

constexpr int64_t kChunkRows = 4096;

// Weights in the compute dtype, converted once per call.
struct AccParams {
  at::Tensor lnw, lnb, w1, b1, w2, b2;  // b1/b2 undefined when absent
};

AccParams to_acc(at::ScalarType acc, const at::Tensor& lnw, const at::Tensor& lnb, const at::Tensor& w1,
                 const c10::optional<at::Tensor>& b1, const at::Tensor& w2, const c10::optional<at::Tensor>& b2) {
  auto cvt = [acc](const at::Tensor& t) { return t.to(acc).contiguous(); };
  AccParams p{cvt(lnw), cvt(lnb), cvt(w1), at::Tensor(), cvt(w2), at::Tensor()};
  if (b1.has_value()) p.b1 = cvt(*b1);
  if (b2.has_value()) p.b2 = cvt(*b2);
  return p;
}

// Gathers shuffled rows [m0, m0+rows) from x and normalises them: xn = xhat * w + b. xhat, mean and
// rstd are written too when their pointers are non-null (the backward needs them).
template <typename scalar_t, typename acc_t>
void shuffle_layernorm_rows(const scalar_t* x, const PspGeom& geo, int64_t C, int64_t m0, int64_t rows,
                            const acc_t* w, const acc_t* b, double eps, acc_t* xn, acc_t* xhat, acc_t* rstd_out) {
  const int64_t K = 4 * C;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* out = xn + r * K;
      for (int q = 0; q < 4; ++q) {
        const scalar_t* src = x + geo.run_offset(m0 + r, q);
        for (int64_t c = 0; c < C; ++c) out[q * C + c] = static_cast<acc_t>(src[c]);
      }
      acc_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += out[k];
      const acc_t mean = sum / static_cast<acc_t>(K);
      acc_t sq = 0;
      for (int64_t k = 0; k < K; ++k) sq += (out[k] - mean) * (out[k] - mean);
      const acc_t rstd = acc_t(1) / std::sqrt(sq / static_cast<acc_t>(K) + static_cast<acc_t>(eps));
      acc_t* xh = xhat ? xhat + r * K : nullptr;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t v = (out[k] - mean) * rstd;
        if (xh) xh[k] = v;
        out[k] = v * w[k] + b[k];
      }
      if (rstd_out) rstd_out[r] = rstd;
    }
  });
}

template <typename acc_t>
inline acc_t gelu_erf(acc_t v) {
  return acc_t(0.5) * v * (acc_t(1) + std::erf(v * acc_t(M_SQRT1_2)));
}

// d gelu(v) / dv = Phi(v) + v * phi(v).
template <typename acc_t>
inline acc_t gelu_erf_grad(acc_t v) {
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(v * acc_t(M_SQRT1_2)));
  const acc_t pdf = std::exp(acc_t(-0.5) * v * v) * acc_t(0.5 * M_2_SQRTPI * M_SQRT1_2);
  return cdf + v * pdf;
}

template <typename acc_t>
void gelu_inplace(at::Tensor& h) {
  acc_t* p = h.data_ptr<acc_t>();
  at::parallel_for(0, h.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) p[i] = gelu_erf(p[i]);
  });
}

// g = gelu(h) and dh = dg * gelu'(h) (dg is overwritten by dh).
template <typename acc_t>
void gelu_grad_inplace(const at::Tensor& h, at::Tensor& dg) {
  const acc_t* hp = h.data_ptr<acc_t>();
  acc_t* dp = dg.data_ptr<acc_t>();
  at::parallel_for(0, h.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dp[i] *= gelu_erf_grad(hp[i]);
  });
}

at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, a, w.t()) : at::mm(a, w.t());
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                       const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                       const c10::optional<at::Tensor>& b2, double eps) {
  const PspDims d = check_pixel_shuffle_projector_args("vita_ext::pixel_shuffle_projector", x_in, ln_weight,
                                                       ln_bias, w1, b1, w2, b2);
  at::Tensor y = at::empty({d.N, d.T, d.D2}, x_in.options());
  if (d.M == 0) return y;
  const at::Tensor x = psp_inner_contiguous(x_in);
  const PspGeom geo = psp_geom(d, x);
  at::Tensor y2 = y.view({d.M, d.D2});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_projector_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const AccParams p = to_acc(acc, ln_weight, ln_bias, w1, b1, w2, b2);
    for (int64_t m0 = 0; m0 < d.M; m0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, d.M - m0);
      at::Tensor xn = at::empty({rows, d.K}, x.options().dtype(acc));
      shuffle_layernorm_rows<scalar_t, acc_t>(x.data_ptr<scalar_t>(), geo, d.C, m0, rows, p.lnw.data_ptr<acc_t>(),
                                              p.lnb.data_ptr<acc_t>(), eps, xn.data_ptr<acc_t>(), nullptr, nullptr);
      at::Tensor h = linear(xn, p.w1, p.b1);
      gelu_inplace<acc_t>(h);
      y2.narrow(0, m0, rows).copy_(linear(h, p.w2, p.b2));
    }
  });
  return y;
}

// LayerNorm backward of rows [m0, m0+rows), scattered into dx's unshuffled layout.
template <typename scalar_t, typename acc_t>
void layernorm_backward_unshuffle(const acc_t* dxn, const acc_t* xhat, const acc_t* rstd, const acc_t* w,
                                  int64_t C, int64_t m0, int64_t rows, const PspGeom& dgeo, scalar_t* dx) {
  const int64_t K = 4 * C;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* g = dxn + r * K;
      const acc_t* xh = xhat + r * K;
      acc_t s1 = 0, s2 = 0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t dxh = g[k] * w[k];
        s1 += dxh;
        s2 += dxh * xh[k];
      }
      s1 /= static_cast<acc_t>(K);
      s2 /= static_cast<acc_t>(K);
      for (int q = 0; q < 4; ++q) {
        scalar_t* dst = dx + dgeo.run_offset(m0 + r, q);
        for (int64_t c = 0; c < C; ++c) {
          const int64_t k = q * C + c;
          dst[c] = static_cast<scalar_t>(rstd[r] * (g[k] * w[k] - s1 - xh[k] * s2));
        }
      }
    }
  });
}

// Copies an fp32 (or fp64) accumulator into a tensor shaped and strided like the fake kernel's output.
at::Tensor like(const at::Tensor& proto, const at::Tensor& acc) {
  return at::empty_like(proto).copy_(acc);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& ln_weight,
                   const at::Tensor& ln_bias, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                   const at::Tensor& w2, const c10::optional<at::Tensor>& b2, double eps) {
  const PspDims d = check_pixel_shuffle_projector_backward_args("vita_ext::pixel_shuffle_projector_backward",
                                                                grad_y, x_in, ln_weight, ln_bias, w1, b1, w2, b2);
  const at::Tensor x = psp_inner_contiguous(x_in);
  at::Tensor dx = psp_empty_dx(x_in);
  const PspGeom geo = psp_geom(d, x), dgeo = psp_geom(d, dx);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopt = x.options().dtype(acc);
  at::Tensor dlnw = at::zeros({d.K}, aopt), dlnb = at::zeros({d.K}, aopt);
  at::Tensor dw1 = at::zeros({d.D1, d.K}, aopt), db1 = at::zeros({d.D1}, aopt);
  at::Tensor dw2 = at::zeros({d.D2, d.D1}, aopt), db2 = at::zeros({d.D2}, aopt);
  const at::Tensor gy = grad_y.reshape({d.M, d.D2});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_projector_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AccParams p = to_acc(acc, ln_weight, ln_bias, w1, b1, w2, b2);
    for (int64_t m0 = 0; m0 < d.M; m0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, d.M - m0);
      at::Tensor xn = at::empty({rows, d.K}, aopt), xhat = at::empty({rows, d.K}, aopt);
      at::Tensor rstd = at::empty({rows}, aopt);
      shuffle_layernorm_rows<scalar_t, acc_t>(x.data_ptr<scalar_t>(), geo, d.C, m0, rows, p.lnw.data_ptr<acc_t>(),
                                              p.lnb.data_ptr<acc_t>(), eps, xn.data_ptr<acc_t>(),
                                              xhat.data_ptr<acc_t>(), rstd.data_ptr<acc_t>());
      at::Tensor h = linear(xn, p.w1, p.b1);
      at::Tensor g = h.clone();
      gelu_inplace<acc_t>(g);
      const at::Tensor dy = gy.narrow(0, m0, rows).to(acc);
      dw2.addmm_(dy.t(), g);
      db2.add_(dy.sum(0));
      at::Tensor dh = at::mm(dy, p.w2);
      gelu_grad_inplace<acc_t>(h, dh);
      dw1.addmm_(dh.t(), xn);
      db1.add_(dh.sum(0));
      const at::Tensor dxn = at::mm(dh, p.w1).contiguous();
      dlnw.add_((dxn * xhat).sum(0));
      dlnb.add_(dxn.sum(0));
      layernorm_backward_unshuffle<scalar_t, acc_t>(dxn.data_ptr<acc_t>(), xhat.data_ptr<acc_t>(),
                                                    rstd.data_ptr<acc_t>(), p.lnw.data_ptr<acc_t>(), d.C, m0, rows,
                                                    dgeo, dx.data_ptr<scalar_t>());
    }
  });
  return {dx, like(ln_weight, dlnw), like(ln_bias, dlnb), like(w1, dw1), db1.to(w1.scalar_type()), like(w2, dw2),
          db2.to(w2.scalar_type())};
}

}  // namespace
}  // namespace vita_ext

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) {
  m.impl("pixel_shuffle_projector", &vita_ext::forward_cpu);
  m.impl("pixel_shuffle_projector_backward", &vita_ext::backward_cpu);
}
