// pixel_shuffle_projector on the CPU: y = gelu(layer_norm(pixel_shuffle(x)) @ w1^T + b1) @ w2^T + b2.
//
// Algorithm. GEMMs and the GELU run through ATen (oneDNN/MKL GEMMs in the GEMM dtype of cpu/cpu_gemm.h:
// bf16 on CPUs with native bf16 dot products, rounded once as PyTorch's eager matmul does, else fp32;
// at::gelu / at::gelu_backward, ATen's vectorized kernels). Our code is what PyTorch does not fuse: the
// pixel shuffle + LayerNorm as one pass (rows::layernorm gathers the four C-long runs of each shuffled
// row straight from x; the shuffled tensor is never formed) and its backward (rows::layernorm_backward
// writes dx straight into x's unshuffled layout and accumulates the LayerNorm parameter gradients).
// Rows are processed in chunks of kChunkRows shuffled rows so temporaries stay bounded.
//   forward, per chunk: xn = shuffle_layernorm(x) (fp32 statistics); h = xn @ w1^T + b1 (addmm);
//     g = gelu(h); y = g @ w2^T + b2. With save_activations, xn, h, g and the statistics are written
//     to the saved tensors instead of temporaries (as eager autograd keeps them), so the backward
//     recomputes nothing.
//   backward, per chunk, from the saved activations or recomputing them: dW2 += dy^T g, db2 += sum dy,
//     dg = dy w2, dh = gelu_backward(dg, h), dW1 += dh^T xn, db1 += sum dh, dxn = dh w1, and per row
//     the LayerNorm backward dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat =
//     dxn * ln_weight, dln_weight += sum dxn*xhat, dln_bias += sum dxn. Each step runs only for the
//     gradients asked for (output_mask): a frozen ViT costs no dx and no LayerNorm-backward row pass,
//     frozen weights no dW GEMMs. Parameter gradients accumulate in fp32 across chunks (in fixed
//     64-row slabs for the LayerNorm ones: deterministic).
//
// Cost, M = N*L/4 rows, K = 4C: forward 2*M*(K*D1 + D1*D2) FLOPs, reads x once (M*K elements) and the
// weights, writes M*D2. Backward, per gradient: 2*M*D1*D2 for dW2; 2*M*D1*D2 (dg) + 2*M*K*D1 for dW1,
// + 2*M*K*D1 (dxn) for dx / dln_*; plus 2*M*K*D1 for the recomputed h without saved activations; and
// O(M*(K + D1)) elementwise work. Saved activations: M*(K + 2*D1) elements of x's dtype + 2*M fp32.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_gemm.h"
#include "cpu/row_kernels.h"
#include "pixel_shuffle_projector.h"

namespace vita_ext {
namespace {

constexpr int64_t kChunkRows = 4096;
constexpr int64_t kSlabRows = 64;  // rows per partial sum of the LayerNorm parameter gradients

at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// Parameters in the dtypes the kernels use: LayerNorm affine in the accumulation dtype (row kernels),
// Linear weights and biases in the GEMM dtype. Converted once per call.
struct Params {
  at::Tensor lnw, lnb, w1, b1, w2, b2;  // b1/b2 undefined when absent
};

Params make_params(at::ScalarType acc, at::ScalarType gd, const at::Tensor& lnw, const at::Tensor& lnb,
                   const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                   const c10::optional<at::Tensor>& b2) {
  Params p{lnw.to(acc).contiguous(), lnb.to(acc).contiguous(), in_dtype(w1, gd), at::Tensor(), in_dtype(w2, gd),
           at::Tensor()};
  if (b1.has_value()) p.b1 = in_dtype(*b1, gd);
  if (b2.has_value()) p.b2 = in_dtype(*b2, gd);
  return p;
}

// out = a @ w^T (+ b), into out (a view of a contiguous buffer).
void linear_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& w, const at::Tensor& b) {
  if (b.defined()) {
    at::addmm_out(out, b, a, w.t());
  } else {
    at::mm_out(out, a, w.t());
  }
}

// Shuffled rows [m0, m0 + rows) of x, normalised: xn (out_t, [rows, K]) and their mean/rstd.
template <typename x_t, typename out_t, typename acc_t>
void shuffle_layernorm(const at::Tensor& x, const PspGeom& geo, int64_t C, int64_t m0, int64_t rows,
                       const Params& p, double eps, at::Tensor& xn, acc_t* mean, acc_t* rstd) {
  const x_t* xp = x.data_ptr<x_t>();
  out_t* out = xn.data_ptr<out_t>();
  const acc_t* w = p.lnw.data_ptr<acc_t>();
  const acc_t* b = p.lnb.data_ptr<acc_t>();
  const int64_t K = 4 * C;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(K);
    for (int64_t r = begin; r < end; ++r) {
      const x_t* runs[4];
      for (int q = 0; q < 4; ++q) runs[q] = xp + geo.run_offset(m0 + r, q);
      rows::layernorm(runs, 4, C, w, b, static_cast<acc_t>(eps), scratch.data(), out + r * K, mean[r], rstd[r]);
    }
  });
}

// LayerNorm backward of rows [m0, m0 + rows): dx (when dx_geo is given) into x's unshuffled layout, and
// the LayerNorm parameter gradients' column sums added to dlnw / dlnb (when defined), summed per
// kSlabRows-row slab and then over slabs in order.
template <typename x_t, typename d_t, typename acc_t>
void layernorm_backward_rows(const at::Tensor& x, const PspGeom& geo, int64_t C, int64_t m0, int64_t rows,
                             const at::Tensor& dxn, const Params& p, const acc_t* mean, const acc_t* rstd,
                             at::Tensor* dx, const PspGeom& dgeo, at::Tensor& dlnw, at::Tensor& dlnb) {
  const int64_t K = 4 * C, slabs = (rows + kSlabRows - 1) / kSlabRows;
  const x_t* xp = x.data_ptr<x_t>();
  const d_t* g = dxn.data_ptr<d_t>();
  const acc_t* w = p.lnw.data_ptr<acc_t>();
  x_t* dxp = dx != nullptr ? dx->data_ptr<x_t>() : nullptr;
  const auto aopt = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor part_w = dlnw.defined() ? at::empty({slabs, K}, aopt) : at::Tensor();
  at::Tensor part_b = dlnb.defined() ? at::empty({slabs, K}, aopt) : at::Tensor();
  at::parallel_for(0, slabs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(K);
    for (int64_t s = begin; s < end; ++s) {
      acc_t* sw = part_w.defined() ? part_w.data_ptr<acc_t>() + s * K : nullptr;
      acc_t* sb = part_b.defined() ? part_b.data_ptr<acc_t>() + s * K : nullptr;
      if (sw != nullptr) std::fill(sw, sw + K, acc_t(0));
      if (sb != nullptr) std::fill(sb, sb + K, acc_t(0));
      for (int64_t r = s * kSlabRows; r < std::min(rows, (s + 1) * kSlabRows); ++r) {
        const x_t* runs[4];
        x_t* dx_runs[4];
        for (int q = 0; q < 4; ++q) {
          runs[q] = xp + geo.run_offset(m0 + r, q);
          if (dxp != nullptr) dx_runs[q] = dxp + dgeo.run_offset(m0 + r, q);
        }
        rows::layernorm_backward(runs, 4, C, g + r * K, w, mean[r], rstd[r], scratch.data(),
                                 dxp != nullptr ? dx_runs : nullptr, sw, sb);
      }
    }
  });
  if (part_w.defined()) dlnw.add_(part_w.sum(0));
  if (part_b.defined()) dlnb.add_(part_b.sum(0));
}

// The two above for a GEMM dtype gd chosen at run time: x's own dtype, or fp32 for half types.
template <typename x_t, typename acc_t = at::opmath_type<x_t>>
void ln_forward(at::ScalarType gd, const at::Tensor& x, const PspGeom& geo, int64_t C, int64_t m0, int64_t rows,
                const Params& p, double eps, at::Tensor& xn, acc_t* mean, acc_t* rstd) {
  if constexpr (!std::is_same_v<x_t, acc_t>) {
    if (gd == at::kFloat) return shuffle_layernorm<x_t, float, acc_t>(x, geo, C, m0, rows, p, eps, xn, mean, rstd);
  }
  shuffle_layernorm<x_t, x_t, acc_t>(x, geo, C, m0, rows, p, eps, xn, mean, rstd);
}

template <typename x_t, typename acc_t = at::opmath_type<x_t>>
void ln_backward(at::ScalarType gd, const at::Tensor& x, const PspGeom& geo, int64_t C, int64_t m0, int64_t rows,
                 const at::Tensor& dxn, const Params& p, const acc_t* mean, const acc_t* rstd, at::Tensor* dx,
                 const PspGeom& dgeo, at::Tensor& dlnw, at::Tensor& dlnb) {
  if constexpr (!std::is_same_v<x_t, acc_t>) {
    if (gd == at::kFloat) {
      return layernorm_backward_rows<x_t, float, acc_t>(x, geo, C, m0, rows, dxn, p, mean, rstd, dx, dgeo, dlnw,
                                                        dlnb);
    }
  }
  layernorm_backward_rows<x_t, x_t, acc_t>(x, geo, C, m0, rows, dxn, p, mean, rstd, dx, dgeo, dlnw, dlnb);
}

// A parameter gradient summed over row chunks: the first chunk's product (or column sum) is kept as it
// comes (one GEMM rounding, as eager autograd); a second chunk switches to an fp32 (fp64) accumulator.
struct GradSum {
  at::ScalarType acc;
  at::Tensor total;  // undefined until the first chunk
  void add(const at::Tensor& part) {
    if (!total.defined()) {
      total = part;
      return;
    }
    if (total.scalar_type() != acc) total = total.to(acc);
    total.add_(part);
  }
  void add_mm(const at::Tensor& a, const at::Tensor& b) { add(at::mm(a, b)); }
  void add_colsum(const at::Tensor& a) { add(at::sum(a, {0}, false, acc)); }
  // Shaped, strided and typed like proto (what the fake kernel promises); zeros when nothing was added.
  at::Tensor result(const at::Tensor& proto) const {
    if (!total.defined()) return at::zeros_like(proto);
    if (total.scalar_type() == proto.scalar_type() && total.strides() == proto.strides()) return total;
    return at::empty_like(proto).copy_(total);
  }
};

using Outputs5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs5 forward_cpu(const at::Tensor& x_in, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                     const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                     const c10::optional<at::Tensor>& b2, double eps, bool save) {
  const PspDims d = check_pixel_shuffle_projector_args("vita_ext::pixel_shuffle_projector", x_in, ln_weight,
                                                       ln_bias, w1, b1, w2, b2);
  const auto dt = x_in.scalar_type(), acc = psp_acc_dtype(dt), gd = cpu_gemm::gemm_dtype(dt);
  at::Tensor y = at::empty({d.N, d.T, d.D2}, x_in.options());
  PspSaved s;
  if (save) {
    s = PspSaved{at::empty({d.M, d.K}, x_in.options()), at::empty({d.M, d.D1}, x_in.options()),
                 at::empty({d.M, d.D1}, x_in.options()), at::empty({2, d.M}, x_in.options().dtype(acc)), true};
  }
  auto outputs = [&]() -> Outputs5 {
    if (!save) return {y, psp_not_asked(x_in), psp_not_asked(x_in), psp_not_asked(x_in), psp_not_asked(x_in)};
    return {y, s.xn, s.h, s.g, s.stats};
  };
  if (d.M == 0) return outputs();
  const at::Tensor x = psp_inner_contiguous(x_in);
  const PspGeom geo = psp_geom(d, x);
  const Params p = make_params(acc, gd, ln_weight, ln_bias, w1, b1, w2, b2);
  at::Tensor y2 = y.view({d.M, d.D2});
  const auto gopt = x.options().dtype(gd);
  at::Tensor stats = save ? s.stats : at::empty({2, std::min(kChunkRows, d.M)}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pixel_shuffle_projector_cpu", [&] {
    using x_t = scalar_t;
    using acc_t = at::opmath_type<x_t>;
    const bool direct = gd == dt;  // GEMMs write straight into the saved tensors / y
    for (int64_t m0 = 0; m0 < d.M; m0 += kChunkRows) {
      const int64_t rows = std::min(kChunkRows, d.M - m0);
      auto slice = [&](const at::Tensor& t) { return t.narrow(0, m0, rows); };
      at::Tensor xn = save && direct ? slice(s.xn) : at::empty({rows, d.K}, gopt);
      acc_t* mean = stats.data_ptr<acc_t>() + (save ? m0 : 0);
      acc_t* rstd = mean + stats.size(1);
      ln_forward<x_t>(gd, x, geo, d.C, m0, rows, p, eps, xn, mean, rstd);
      at::Tensor h = save && direct ? slice(s.h) : at::empty({rows, d.D1}, gopt);
      linear_out(h, xn, p.w1, p.b1);
      at::Tensor g = h;
      if (save) {
        g = direct ? slice(s.g) : at::empty({rows, d.D1}, gopt);
        at::gelu_out(g, h);
      } else {
        at::gelu_(h);
      }
      at::Tensor yc = slice(y2);
      if (direct) {
        linear_out(yc, g, p.w2, p.b2);
      } else {
        at::Tensor tmp = at::empty({rows, d.D2}, gopt);
        linear_out(tmp, g, p.w2, p.b2);
        yc.copy_(tmp);
      }
      if (save && !direct) {
        slice(s.xn).copy_(xn);
        slice(s.h).copy_(h);
        slice(s.g).copy_(g);
      }
    }
  });
  return outputs();
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& ln_weight,
                   const at::Tensor& ln_bias, const at::Tensor& w1, const c10::optional<at::Tensor>& b1,
                   const at::Tensor& w2, const c10::optional<at::Tensor>& b2, double eps,
                   const c10::optional<at::Tensor>& xn_saved, const c10::optional<at::Tensor>& h_saved,
                   const c10::optional<at::Tensor>& g_saved, const c10::optional<at::Tensor>& stats_saved,
                   std::array<bool, 7> output_mask) {
  const char* op = "vita_ext::pixel_shuffle_projector_backward";
  const PspDims d = check_pixel_shuffle_projector_backward_args(op, grad_y, x_in, ln_weight, ln_bias, w1, b1, w2, b2);
  const PspSaved s = check_pixel_shuffle_projector_saved(op, d, x_in, xn_saved, h_saved, g_saved, stats_saved);
  const PspNeeds need = psp_needs(output_mask);
  const auto dt = x_in.scalar_type(), acc = psp_acc_dtype(dt), gd = cpu_gemm::gemm_dtype(dt);
  const auto aopt = x_in.options().dtype(acc), gopt = x_in.options().dtype(gd);
  const at::Tensor x = psp_inner_contiguous(x_in);
  at::Tensor dx = need.dx ? psp_empty_dx(x_in) : psp_not_asked(x_in);
  const PspGeom geo = psp_geom(d, x), dgeo = need.dx ? psp_geom(d, dx) : geo;
  GradSum dw1{acc}, db1{acc}, dw2{acc}, db2{acc};
  at::Tensor dlnw = need.dlnw ? at::zeros({d.K}, aopt) : at::Tensor();
  at::Tensor dlnb = need.dlnb ? at::zeros({d.K}, aopt) : at::Tensor();
  if (d.M > 0 && need.any()) {
    const Params p = make_params(acc, gd, ln_weight, ln_bias, w1, b1, w2, b2);
    const at::Tensor gy = grad_y.reshape({d.M, d.D2});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pixel_shuffle_projector_bwd_cpu", [&] {
      using x_t = scalar_t;
      using acc_t = at::opmath_type<x_t>;
      for (int64_t m0 = 0; m0 < d.M; m0 += kChunkRows) {
        const int64_t rows = std::min(kChunkRows, d.M - m0);
        auto slice = [&](const at::Tensor& t) { return t.narrow(0, m0, rows); };
        // The chunk's activations: saved, or recomputed as in the forward (only what is needed).
        at::Tensor xn, h, g, stats;
        const bool need_act = need.dw2 || need.dh();
        if (s.present) {
          xn = in_dtype(slice(s.xn), gd);
          h = in_dtype(slice(s.h), gd);
          g = in_dtype(slice(s.g), gd);
          stats = s.stats.narrow(1, m0, rows).contiguous();
        } else if (need_act) {
          xn = at::empty({rows, d.K}, gopt);
          stats = at::empty({2, rows}, aopt);
          acc_t* mean = stats.data_ptr<acc_t>();
          ln_forward<x_t>(gd, x, geo, d.C, m0, rows, p, eps, xn, mean, mean + rows);
          h = at::empty({rows, d.D1}, gopt);
          linear_out(h, xn, p.w1, p.b1);
          g = need.dw2 ? at::gelu(h) : at::Tensor();
        }
        const at::Tensor dy = in_dtype(slice(gy), gd);
        if (need.dw2) dw2.add_mm(dy.t(), g);
        if (need.db2) db2.add_colsum(dy);
        if (!need.dh()) continue;
        const at::Tensor dh = at::gelu_backward(at::mm(dy, p.w2), h);
        if (need.dw1) dw1.add_mm(dh.t(), xn);
        if (need.db1) db1.add_colsum(dh);
        if (!need.dxn()) continue;
        const at::Tensor dxn = at::mm(dh, p.w1);
        const acc_t* mean = stats.data_ptr<acc_t>();
        const acc_t* rstd = mean + stats.stride(0);
        ln_backward<x_t>(gd, x, geo, d.C, m0, rows, dxn, p, mean, rstd, need.dx ? &dx : nullptr, dgeo, dlnw,
                         dlnb);
      }
    });
  }
  auto out = [&](bool want, const at::Tensor& proto, const GradSum& a) {
    return want ? a.result(proto) : psp_not_asked(proto);
  };
  auto out_ln = [&](bool want, const at::Tensor& proto, const at::Tensor& a) {
    return want ? at::empty_like(proto).copy_(a) : psp_not_asked(proto);
  };
  const at::Tensor b1_proto = at::empty({d.D1}, w1.options()), b2_proto = at::empty({d.D2}, w2.options());
  return {dx,
          out_ln(need.dlnw, ln_weight, dlnw),
          out_ln(need.dlnb, ln_bias, dlnb),
          out(need.dw1, w1, dw1),
          out(need.db1, b1_proto, db1),
          out(need.dw2, w2, dw2),
          out(need.db2, b2_proto, db2)};
}

}  // namespace
}  // namespace vita_ext

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) {
  m.impl("pixel_shuffle_projector", &vita_ext::forward_cpu);
  m.impl("pixel_shuffle_projector_backward", &vita_ext::backward_cpu);
}
