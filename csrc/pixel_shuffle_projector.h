// pixel_shuffle_projector: argument checks and the shuffle geometry, shared by the CPU (.cpp) and
// CUDA (.cu) kernels so that both reject the same inputs with the same messages and read the same
// rows.
//
// Geometry. x is [N, L, C] with L = g*g patches of a g x g grid in row-major order, g even. The
// shuffled row m = n*T + t (T = L/4, t = a*(g/2) + b) is the concatenation of four C-long runs,
// run q = 2*dr + dc being x[n, (2a+dr)*g + 2b+dc, :]. x.stride(2) must be 1; stride(0) and
// stride(1) are arbitrary, so a CLS-dropping slice vit_out[:, 1:, :] is read in place.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

#include <array>
#include <cstdint>

#include "checks.h"

namespace vita_ext {

// Sizes of one call. M = N*T shuffled rows of width K = 4C.
struct PspDims {
  int64_t N, L, C, g, T, M, K, D1, D2;
};

// Where the runs of a shuffled row live in a [N, L, C] tensor with strides (s0, s1, 1).
struct PspGeom {
  int64_t T;       // shuffled rows per image: L / 4
  int64_t half_g;  // g / 2
  int64_t g;       // patches per grid row
  int64_t s0, s1;  // element strides of dims 0 and 1

  // Element offset of run q (0..3) of shuffled row m: patch (2a+dr, 2b+dc) of image n.
  C10_HOST_DEVICE inline int64_t run_offset(int64_t m, int q) const {
    const int64_t n = m / T, t = m - n * T;
    const int64_t a = t / half_g, b = t - a * half_g;
    const int64_t patch = (2 * a + (q >> 1)) * g + 2 * b + (q & 1);
    return n * s0 + patch * s1;
  }
};

inline PspGeom psp_geom(const PspDims& d, const at::Tensor& t) {
  return PspGeom{d.T, d.g / 2, d.g, t.stride(0), t.stride(1)};
}

inline int64_t psp_isqrt(int64_t v) {
  int64_t r = 0;
  while ((r + 1) * (r + 1) <= v) ++r;  // L is at most a few thousand patches in practice
  return r;
}

inline void psp_check_param(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_device(op, t, name, x, "x");
  check_same_dtype(op, t, name, x, "x");
}

// The checks both kernels start with. Returns the sizes of the call.
inline PspDims check_pixel_shuffle_projector_args(const char* op, const at::Tensor& x, const at::Tensor& ln_weight,
                                                  const at::Tensor& ln_bias, const at::Tensor& w1,
                                                  const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                  const c10::optional<at::Tensor>& b2) {
  check_float(op, x, "x");
  check_dim(op, x, "x", 3, "[N, L, C]");
  PspDims d{};
  d.N = x.size(0);
  d.L = x.size(1);
  d.C = x.size(2);
  d.g = psp_isqrt(d.L);
  TORCH_CHECK(d.L > 0 && d.g * d.g == d.L && d.g % 2 == 0, op,
              ": argument 'x' must be [N, L, C] with L = g*g patches of a g x g grid (L must be g*g with g even "
              "and g >= 2, e.g. 1024 = 32*32), got L = ", d.L, " (shape ", shape_str(x), ")");
  TORCH_CHECK(d.C > 0, op, ": argument 'x' must have at least one channel (C >= 1), got shape ", shape_str(x));
  d.T = d.L / 4;
  d.M = d.N * d.T;
  d.K = 4 * d.C;

  psp_check_param(op, ln_weight, "ln_weight", x);
  check_dim(op, ln_weight, "ln_weight", 1, "[4C]");
  check_size(op, ln_weight, "ln_weight", 0, d.K, "4C = 4 * x.size(2)");
  psp_check_param(op, ln_bias, "ln_bias", x);
  check_dim(op, ln_bias, "ln_bias", 1, "[4C]");
  check_size(op, ln_bias, "ln_bias", 0, d.K, "4C = 4 * x.size(2)");

  psp_check_param(op, w1, "w1", x);
  check_dim(op, w1, "w1", 2, "[D1, 4C]");
  check_size(op, w1, "w1", 1, d.K, "4C = 4 * x.size(2)");
  d.D1 = w1.size(0);
  TORCH_CHECK(d.D1 > 0, op, ": argument 'w1' must have at least one row (D1 >= 1), got shape ", shape_str(w1));
  if (b1.has_value()) {
    psp_check_param(op, *b1, "b1", x);
    check_dim(op, *b1, "b1", 1, "[D1]");
    check_size(op, *b1, "b1", 0, d.D1, "D1 = w1.size(0)");
  }

  psp_check_param(op, w2, "w2", x);
  check_dim(op, w2, "w2", 2, "[D2, D1]");
  check_size(op, w2, "w2", 1, d.D1, "D1 = w1.size(0)");
  d.D2 = w2.size(0);
  TORCH_CHECK(d.D2 > 0, op, ": argument 'w2' must have at least one row (D2 >= 1), got shape ", shape_str(w2));
  if (b2.has_value()) {
    psp_check_param(op, *b2, "b2", x);
    check_dim(op, *b2, "b2", 1, "[D2]");
    check_size(op, *b2, "b2", 0, d.D2, "D2 = w2.size(0)");
  }
  return d;
}

inline PspDims check_pixel_shuffle_projector_backward_args(const char* op, const at::Tensor& grad_y,
                                                           const at::Tensor& x, const at::Tensor& ln_weight,
                                                           const at::Tensor& ln_bias, const at::Tensor& w1,
                                                           const c10::optional<at::Tensor>& b1,
                                                           const at::Tensor& w2,
                                                           const c10::optional<at::Tensor>& b2) {
  PspDims d = check_pixel_shuffle_projector_args(op, x, ln_weight, ln_bias, w1, b1, w2, b2);
  psp_check_param(op, grad_y, "grad_y", x);
  check_shape(op, grad_y, "grad_y", {d.N, d.T, d.D2}, "[N, L/4, D2], the forward output's shape");
  return d;
}

// The accumulation dtype of the LayerNorm statistics and the parameter gradients: fp32, fp64 for fp64.
inline at::ScalarType psp_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Activations saved by the forward (save_activations) for the backward; see csrc/vita_ext.cpp.
struct PspSaved {
  at::Tensor xn, h, g, stats;  // [M, 4C], [M, D1], [M, D1] in x's dtype; [2, M] (mean, rstd) acc dtype
  bool present = false;
};

inline void psp_check_saved_one(const char* op, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                                at::ScalarType dtype, const at::Tensor& x, const char* what) {
  check_same_device(op, t, name, x, "x");
  check_dtype(op, t, name, dtype);
  check_shape(op, t, name, shape, what);
}

// All four saved tensors or none; each with the shape and dtype the forward returns. Returned contiguous.
inline PspSaved check_pixel_shuffle_projector_saved(const char* op, const PspDims& d, const at::Tensor& x,
                                                    const c10::optional<at::Tensor>& xn,
                                                    const c10::optional<at::Tensor>& h,
                                                    const c10::optional<at::Tensor>& g,
                                                    const c10::optional<at::Tensor>& stats) {
  const int given = xn.has_value() + h.has_value() + g.has_value() + stats.has_value();
  PspSaved s;
  if (given == 0) return s;
  TORCH_CHECK(given == 4, op, ": arguments 'xn', 'h', 'g' and 'stats' (the forward's saved activations) must be "
              "given all four or none, got ", given);
  const auto dt = x.scalar_type();
  psp_check_saved_one(op, *xn, "xn", {d.M, d.K}, dt, x, "[M, 4C], the LayerNorm output saved by the forward");
  psp_check_saved_one(op, *h, "h", {d.M, d.D1}, dt, x, "[M, D1], the pre-activation saved by the forward");
  psp_check_saved_one(op, *g, "g", {d.M, d.D1}, dt, x, "[M, D1], the GELU output saved by the forward");
  psp_check_saved_one(op, *stats, "stats", {2, d.M}, psp_acc_dtype(dt), x,
                      "[2, M], the LayerNorm mean and rstd saved by the forward");
  s.xn = xn->contiguous();
  s.h = h->contiguous();
  s.g = g->contiguous();
  s.stats = stats->contiguous();
  s.present = true;
  return s;
}

// Which gradients the backward computes (output_mask), and the intermediate gradients they need.
struct PspNeeds {
  bool dx, dlnw, dlnb, dw1, db1, dw2, db2;
  bool dxn() const { return dx || dlnw || dlnb; }         // dxn = dh @ w1
  bool dh() const { return dw1 || db1 || dxn(); }          // dh = (dy @ w2) * gelu'(h)
  bool any() const { return dh() || dw2 || db2; }
};

inline PspNeeds psp_needs(std::array<bool, 7> m) { return PspNeeds{m[0], m[1], m[2], m[3], m[4], m[5], m[6]}; }

// An output nobody asked for: empty, so nothing of its size is allocated.
inline at::Tensor psp_not_asked(const at::Tensor& like) { return at::empty({0}, like.options()); }

// x with a unit channel stride (the kernels' one layout requirement); copies only when needed.
inline at::Tensor psp_inner_contiguous(const at::Tensor& x) {
  return (x.stride(2) == 1 || x.size(2) == 1) ? x : x.contiguous();
}

// dx is laid out like the fake kernel's empty_like(x) (so opcheck sees equal strides), with the unit
// channel stride the kernels write through.
inline at::Tensor psp_empty_dx(const at::Tensor& x) {
  at::Tensor dx = at::empty_like(x);
  if (dx.stride(2) != 1 && dx.size(2) != 1) dx = at::empty(x.sizes(), x.options());
  return dx;
}

}  // namespace vita_ext
