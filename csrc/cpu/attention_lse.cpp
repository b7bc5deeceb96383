// attention_lse / attention_lse_backward on the CPU: FlashAttention-2 tiling with BLAS on small tiles.
//
// Forward: one task per (b, q head, tile of 64 query rows). The tile is copied to a buffer in the math
// type (below) and walks the key tiles of 128 keys its rows can see (the range comes from the
// per-row interval [lo, hi) of attention_lse.h, so fully masked tiles of causal or packed inputs are
// never touched). Per key tile: S = Q K^T (BLAS), scale + mask + running max, exp (ATen's vectorised
// exp), O = O * alpha + P V (BLAS). out = O / l, lse = m + log l.
// Cost: 4 * Sq * Sk_visible * D * Hq * B FLOPs (half of the full product when causal); bytes: q, out
// once, K/V once per query tile (Sq / 64 passes, from cache for the model's sizes).
//
// Backward (FlashAttention-2): Delta_i = dO_i . O_i - dlse_i; per (query tile, key tile):
// P = exp(scale * Q K^T - lse), dV += P^T dO, dP = dO V^T, dS = P * (dP - Delta), dK += scale dS^T Q,
// dQ += scale dS K. lse and out are taken as given (they may be the global result of a merged ring).
//
// Precision: bf16/fp16 inputs use fp32 math; fp32 (and fp64) inputs use fp64 math, forward and backward.
// The backward's P = exp(s - lse) is not renormalised like a softmax, so an lse that carries the fp32
// rounding of the scores, or per-element fp32 rounding of s, P and dS, reaches the gradients
// unattenuated: measured, fp32 math gives gradients ~1.3-1.5x less accurate than PyTorch's fp32
// autograd and breaks the 2x rule in a few % of random draws; fp64 math leaves only the final fp32
// rounding of lse and out (~0.3x). The price is fp64 GEMMs (~2x) for fp32 inputs on the CPU.
// Cost: 10 (or 14) * Sq * Sk_visible * D * Hq * B FLOPs.
//
// NOTE: at::parallel_for is a header template; it runs serially unless this file is compiled with
// -fopenmp (ATen/Parallel-inl.h falls back to one thread when _OPENMP is undefined), so setup.py must
// pass -fopenmp for these kernels to use more than one core. Inside the parallel region the tile GEMMs
// and exp run single-threaded (MKL and ATen see the OpenMP region).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "attention_lse.h"

namespace vita_ext {
namespace {

using attn::MaskSpec;

constexpr int64_t kFwdRows = 64;
constexpr int64_t kFwdKeys = 128;
constexpr int64_t kBwdRows = 64;
constexpr int64_t kBwdKeys = 64;

// Math type: fp32 for bf16/fp16 inputs, fp64 for fp32 and fp64 inputs (see the file comment).
template <typename T>
using MathT = std::conditional_t<std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>, float, double>;

inline at::ScalarType math_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : at::kDouble;
}

// A [B, S, H, D] tensor addressed row by row through its (b, s, h) strides; rows are contiguous.
template <typename T>
struct Rows {
  T* p = nullptr;
  int64_t sb = 0, ss = 0, sh = 0;
  T* row(int64_t b, int64_t s, int64_t h) const { return p + b * sb + s * ss + h * sh; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T, typename A>
void gather(const Rows<const T>& src, int64_t b, int64_t s0, int64_t n, int64_t h, int64_t d, A* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* x = src.row(b, s0 + r, h);
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = static_cast<A>(x[c]);
  }
}

template <typename A>
at::Tensor wrap(A* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
}

// Scratch of one thread: tiles of at most R rows, K keys, D dims.
template <typename A>
struct Work {
  std::vector<A> q, dout, k, v, s, ds, o, dk, dv, m, l, alpha;
  std::vector<int64_t> lo, hi;
  Work(int64_t R, int64_t K, int64_t D)
      : q(R * D), dout(R * D), k(K * D), v(K * D), s(R * K), ds(R * K), o(R * D), dk(K * D), dv(K * D), m(R),
        l(R), alpha(R), lo(R), hi(R) {}
  void ranges(const MaskSpec& mask, int64_t i0, int64_t n) {
    for (int64_t r = 0; r < n; ++r) attn::row_range(mask, i0 + r, lo[r], hi[r]);
  }
  // Every row of the tile sees every key of [j0, j1): no per-element mask needed.
  bool full(int64_t n, int64_t j0, int64_t j1) const { return lo[n - 1] <= j0 && hi[0] >= j1; }
};

// Tiles of a causal schedule differ in cost; alternating ends keeps the contiguous chunks that
// at::parallel_for hands to each thread balanced.
inline int64_t zigzag(int64_t u, int64_t n) { return (u % 2 == 0) ? u / 2 : n - 1 - u / 2; }

// ----------------------------------------------------------------------------------------------------
// Forward

template <typename T, typename A>
struct Fwd {
  Rows<const T> q, k, v;
  Rows<T> out;
  A* lse;  // [B, Hq, Sq] contiguous
  int64_t B, Sq, Sk, Hq, Hkv, D;
  A scale;
  MaskSpec mask;
};

// Scales and masks the score tile, updates the running max, and leaves S - m in place for exp.
template <typename T, typename A>
void softmax_prepare(const Fwd<T, A>& a, Work<A>& w, int64_t nq, int64_t j0, int64_t nk, bool full) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < nq; ++r) {
    A* s = w.s.data() + r * nk;
    const int64_t lo = w.lo[r] - j0, hi = w.hi[r] - j0;
    A mx = kNegInf;
    for (int64_t c = 0; c < nk; ++c) {
      A x = s[c] * a.scale;
      if (!full && (c < lo || c >= hi)) x = kNegInf;
      s[c] = x;
      mx = std::max(mx, x);
    }
    const A m_new = std::max(w.m[r], mx);
    const A sub = (m_new == kNegInf) ? A(0) : m_new;  // an all-masked row stays -inf -> exp 0
    w.alpha[r] = (w.m[r] == kNegInf) ? A(0) : std::exp(w.m[r] - m_new);
    for (int64_t c = 0; c < nk; ++c) s[c] -= sub;
    w.m[r] = m_new;
  }
}

template <typename T, typename A>
void forward_tile(const Fwd<T, A>& a, int64_t b, int64_t h, int64_t i0, Work<A>& w) {
  const int64_t nq = std::min(kFwdRows, a.Sq - i0), D = a.D, hk = h / (a.Hq / a.Hkv);
  w.ranges(a.mask, i0, nq);
  gather(a.q, b, i0, nq, h, D, w.q.data());
  std::fill(w.m.begin(), w.m.begin() + nq, -std::numeric_limits<A>::infinity());
  std::fill(w.l.begin(), w.l.begin() + nq, A(0));
  std::fill(w.o.begin(), w.o.begin() + nq * D, A(0));
  at::Tensor Q = wrap(w.q.data(), nq, D), O = wrap(w.o.data(), nq, D);
  const int64_t kend = w.hi[nq - 1];
  for (int64_t j0 = w.lo[0]; j0 < kend; j0 += kFwdKeys) {
    const int64_t nk = std::min(kFwdKeys, kend - j0);
    gather(a.k, b, j0, nk, hk, D, w.k.data());
    gather(a.v, b, j0, nk, hk, D, w.v.data());
    at::Tensor S = wrap(w.s.data(), nq, nk);
    at::mm_out(S, Q, wrap(w.k.data(), nk, D).t());
    softmax_prepare(a, w, nq, j0, nk, w.full(nq, j0, j0 + nk));
    S.exp_();
    for (int64_t r = 0; r < nq; ++r) {
      const A* p = w.s.data() + r * nk;
      A sum = 0;
      for (int64_t c = 0; c < nk; ++c) sum += p[c];
      w.l[r] = w.l[r] * w.alpha[r] + sum;
      if (w.alpha[r] != A(1)) {
        A* o = w.o.data() + r * D;
        for (int64_t c = 0; c < D; ++c) o[c] *= w.alpha[r];
      }
    }
    O.addmm_(S, wrap(w.v.data(), nk, D));
  }
  for (int64_t r = 0; r < nq; ++r) {
    T* dst = a.out.row(b, i0 + r, h);
    const A* o = w.o.data() + r * D;
    const A l = w.l[r];
    const bool seen = l > A(0);
    for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<T>(seen ? o[c] / l : A(0));
    a.lse[(b * a.Hq + h) * a.Sq + i0 + r] = seen ? w.m[r] + std::log(l) : -std::numeric_limits<A>::infinity();
  }
}

template <typename T, typename A>
void forward(const Fwd<T, A>& a) {
  const int64_t tiles = (a.Sq + kFwdRows - 1) / kFwdRows;
  at::parallel_for(0, a.B * a.Hq * tiles, 1, [&](int64_t begin, int64_t end) {
    Work<A> w(kFwdRows, kFwdKeys, a.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / tiles, qt = zigzag(t % tiles, tiles);
      forward_tile(a, bh / a.Hq, bh % a.Hq, qt * kFwdRows, w);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_lse_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal, double softmax_scale,
                                                     const c10::optional<at::Tensor>& cu_seqlens,
                                                     c10::optional<int64_t> max_seqlen) {
  const char* op = "vita_ext::attention_lse";
  // On the CPU the offsets are always checked on the host (free here); max_seqlen is only range-checked.
  const std::vector<int64_t> cu = attn::check_attention_lse_args(op, q_in, k_in, v_in, cu_seqlens, max_seqlen);
  const at::Tensor q = attn::inner_contiguous(q_in), k = attn::inner_contiguous(k_in),
                   v = attn::inner_contiguous(v_in);
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(attn::lse_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  at::Tensor cu_keep;
  const MaskSpec mask = attn::make_mask(q, k, causal, cu, cu_keep, cu_seqlens, max_seqlen);
  at::Tensor lse_acc = at::empty({B, Hq, Sq}, q.options().dtype(math_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_lse_cpu", [&] {
    using A = MathT<scalar_t>;
    Fwd<scalar_t, A> a{rows_of<const scalar_t>(q), rows_of<const scalar_t>(k), rows_of<const scalar_t>(v),
                       rows_of<scalar_t>(out), lse_acc.data_ptr<A>(), B, Sq, k.size(1), Hq, k.size(2), D,
                       static_cast<A>(softmax_scale), mask};
    forward(a);
  });
  lse.copy_(lse_acc);
  return {out, lse};
}

// ----------------------------------------------------------------------------------------------------
// Backward

template <typename T, typename A>
struct Bwd {
  Rows<const T> q, k, v, dout;
  const A* lse;    // [B, Hq, Sq] contiguous
  const A* delta;  // [B, Hq, Sq]
  A* dq;           // [B, Hq, Sq, D] accumulator, unscaled
  Rows<T> dk, dv;
  int64_t B, Sq, Sk, Hq, Hkv, D;
  A scale;
  MaskSpec mask;
};

// Delta = rowsum(dO * O) - dlse, with O in q's dtype or fp32.
template <typename T, typename O, typename A>
void compute_delta(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& dlse, at::Tensor& delta) {
  const Rows<const T> g = rows_of<const T>(dout);
  const Rows<const O> o = rows_of<const O>(out);
  const int64_t B = dout.size(0), Sq = dout.size(1), Hq = dout.size(2), D = dout.size(3);
  const A* dl = dlse.defined() ? dlse.data_ptr<A>() : nullptr;
  A* dst = delta.data_ptr<A>();
  at::parallel_for(0, B * Hq * Sq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % Sq, h = (t / Sq) % Hq, b = t / (Sq * Hq);
      const T* gr = g.row(b, i, h);
      const O* orow = o.row(b, i, h);
      A acc = 0;
      for (int64_t c = 0; c < D; ++c) acc += static_cast<A>(gr[c]) * static_cast<A>(orow[c]);
      dst[t] = acc - (dl ? dl[t] : A(0));
    }
  });
}

// P = exp(scale * Q K^T - lse) into w.s and dS = P * (dO V^T - Delta) into w.ds, for the rows
// [i0, i0 + nq) of head h (gathered in w.q / w.dout, ranges in w.lo / w.hi) and keys [j0, j0 + nk).
template <typename T, typename A>
void tile_grads(const Bwd<T, A>& a, Work<A>& w, int64_t b, int64_t h, int64_t i0, int64_t nq, int64_t j0,
                int64_t nk) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t D = a.D;
  at::Tensor P = wrap(w.s.data(), nq, nk);
  at::mm_out(P, wrap(w.q.data(), nq, D), wrap(w.k.data(), nk, D).t());
  const bool full = w.full(nq, j0, j0 + nk);
  const A* lse = a.lse + (b * a.Hq + h) * a.Sq + i0;
  for (int64_t r = 0; r < nq; ++r) {
    A* s = w.s.data() + r * nk;
    const int64_t lo = w.lo[r] - j0, hi = w.hi[r] - j0;
    const bool dead = lse[r] == kNegInf;  // saw no key anywhere: zero gradient, not exp(+inf)
    for (int64_t c = 0; c < nk; ++c) {
      const bool masked = dead || (!full && (c < lo || c >= hi));
      s[c] = masked ? kNegInf : s[c] * a.scale - lse[r];
    }
  }
  P.exp_();
  at::Tensor dS = wrap(w.ds.data(), nq, nk);
  at::mm_out(dS, wrap(w.dout.data(), nq, D), wrap(w.v.data(), nk, D).t());
  const A* delta = a.delta + (b * a.Hq + h) * a.Sq + i0;
  for (int64_t r = 0; r < nq; ++r) {
    const A* p = w.s.data() + r * nk;
    A* ds = w.ds.data() + r * nk;
    for (int64_t c = 0; c < nk; ++c) ds[c] = p[c] * (ds[c] - delta[r]);
  }
}

template <typename T, typename A>
void load_rows(const Bwd<T, A>& a, Work<A>& w, int64_t b, int64_t h, int64_t i0, int64_t nq) {
  w.ranges(a.mask, i0, nq);
  gather(a.q, b, i0, nq, h, a.D, w.q.data());
  gather(a.dout, b, i0, nq, h, a.D, w.dout.data());
}

template <typename T, typename A>
void load_keys(const Bwd<T, A>& a, Work<A>& w, int64_t b, int64_t hk, int64_t j0, int64_t nk) {
  gather(a.k, b, j0, nk, hk, a.D, w.k.data());
  gather(a.v, b, j0, nk, hk, a.D, w.v.data());
}

// dK, dV of keys [j0, j0 + kBwdKeys) of kv head hk, summed over the group's q heads; with_dq also adds
// this key tile's share of dQ (the caller must own the group's dQ rows).
template <typename T, typename A>
void dkdv_tile(const Bwd<T, A>& a, Work<A>& w, int64_t b, int64_t hk, int64_t j0, bool with_dq) {
  const int64_t D = a.D, nk = std::min(kBwdKeys, a.Sk - j0), group = a.Hq / a.Hkv;
  at::Tensor K = wrap(w.k.data(), nk, D), dK = wrap(w.dk.data(), nk, D), dV = wrap(w.dv.data(), nk, D);
  load_keys(a, w, b, hk, j0, nk);
  dK.zero_();
  dV.zero_();
  int64_t first, end;
  attn::rows_seeing(a.mask, j0, j0 + nk, first, end);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t i0 = first; i0 < end; i0 += kBwdRows) {
      const int64_t nq = std::min(kBwdRows, end - i0);
      load_rows(a, w, b, h, i0, nq);
      tile_grads(a, w, b, h, i0, nq, j0, nk);
      at::Tensor P = wrap(w.s.data(), nq, nk), dS = wrap(w.ds.data(), nq, nk);
      dV.addmm_(P.t(), wrap(w.dout.data(), nq, D));
      dK.addmm_(dS.t(), wrap(w.q.data(), nq, D));
      if (with_dq) wrap(a.dq + ((b * a.Hq + h) * a.Sq + i0) * D, nq, D).addmm_(dS, K);
    }
  }
  for (int64_t r = 0; r < nk; ++r) {
    T* gk = a.dk.row(b, j0 + r, hk);
    T* gv = a.dv.row(b, j0 + r, hk);
    for (int64_t c = 0; c < D; ++c) {
      gk[c] = static_cast<T>(w.dk[r * D + c] * a.scale);
      gv[c] = static_cast<T>(w.dv[r * D + c]);
    }
  }
}

// dQ of rows [i0, i0 + kBwdRows) of q head h over every key tile they see.
template <typename T, typename A>
void dq_tile(const Bwd<T, A>& a, Work<A>& w, int64_t b, int64_t h, int64_t i0) {
  const int64_t D = a.D, nq = std::min(kBwdRows, a.Sq - i0), hk = h / (a.Hq / a.Hkv);
  load_rows(a, w, b, h, i0, nq);
  at::Tensor dQ = wrap(a.dq + ((b * a.Hq + h) * a.Sq + i0) * D, nq, D);
  const int64_t kend = w.hi[nq - 1];
  for (int64_t j0 = w.lo[0]; j0 < kend; j0 += kBwdKeys) {
    const int64_t nk = std::min(kBwdKeys, kend - j0);
    load_keys(a, w, b, hk, j0, nk);
    tile_grads(a, w, b, h, i0, nq, j0, nk);
    dQ.addmm_(wrap(w.ds.data(), nq, nk), wrap(w.k.data(), nk, D));
  }
}

template <typename T, typename A>
void backward(const Bwd<T, A>& a) {
  const int64_t ktiles = (a.Sk + kBwdKeys - 1) / kBwdKeys, qtiles = (a.Sq + kBwdRows - 1) / kBwdRows;
  if (a.B * a.Hkv >= at::get_num_threads()) {
    at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t begin, int64_t end) {
      Work<A> w(kBwdRows, kBwdKeys, a.D);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t kt = 0; kt < ktiles; ++kt) dkdv_tile(a, w, t / a.Hkv, t % a.Hkv, kt * kBwdKeys, true);
      }
    });
    return;
  }
  at::parallel_for(0, a.B * a.Hq * qtiles, 1, [&](int64_t begin, int64_t end) {
    Work<A> w(kBwdRows, kBwdKeys, a.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / qtiles;
      dq_tile(a, w, bh / a.Hq, bh % a.Hq, zigzag(t % qtiles, qtiles) * kBwdRows);
    }
  });
  at::parallel_for(0, a.B * a.Hkv * ktiles, 1, [&](int64_t begin, int64_t end) {
    Work<A> w(kBwdRows, kBwdKeys, a.D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / ktiles;
      dkdv_tile(a, w, bh / a.Hkv, bh % a.Hkv, zigzag(t % ktiles, ktiles) * kBwdKeys, false);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_lse_backward_cpu(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, bool causal,
    double softmax_scale, const c10::optional<at::Tensor>& cu_seqlens, c10::optional<int64_t> max_seqlen) {
  const char* op = "vita_ext::attention_lse_backward";
  const std::vector<int64_t> cu = attn::check_attention_lse_backward_args(op, grad_out_in, grad_lse, q_in, k_in,
                                                                          v_in, out_in, lse_in, cu_seqlens,
                                                                          max_seqlen);
  const at::Tensor q = attn::inner_contiguous(q_in), k = attn::inner_contiguous(k_in),
                   v = attn::inner_contiguous(v_in), dout = attn::inner_contiguous(grad_out_in),
                   out = attn::inner_contiguous(out_in), lse = lse_in.contiguous();
  const auto fmt = at::MemoryFormat::Contiguous;
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(fmt));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(fmt));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(fmt));
  if (dk.numel() == 0 || dq.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const auto acc = lse.options().dtype(math_dtype(q.scalar_type()));
  const at::Tensor lse_acc = lse.to(acc.dtype());
  const at::Tensor dlse =
      (grad_lse.has_value() && grad_lse->defined()) ? grad_lse->to(acc.dtype()).contiguous() : at::Tensor();
  at::Tensor delta = at::empty({B, Hq, Sq}, acc);
  at::Tensor dq_acc = at::zeros({B, Hq, Sq, D}, acc);
  at::Tensor cu_keep;
  const MaskSpec mask = attn::make_mask(q, k, causal, cu, cu_keep, cu_seqlens, max_seqlen);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_lse_backward_cpu", [&] {
    using A = MathT<scalar_t>;
    if (out.scalar_type() == q.scalar_type()) {
      compute_delta<scalar_t, scalar_t, A>(dout, out, dlse, delta);
    } else {
      compute_delta<scalar_t, float, A>(dout, out, dlse, delta);
    }
    Bwd<scalar_t, A> a{rows_of<const scalar_t>(q), rows_of<const scalar_t>(k), rows_of<const scalar_t>(v),
                       rows_of<const scalar_t>(dout), lse_acc.data_ptr<A>(), delta.data_ptr<A>(), dq_acc.data_ptr<A>(),
                       rows_of<scalar_t>(dk), rows_of<scalar_t>(dv), B, Sq, k.size(1), Hq, k.size(2), D,
                       static_cast<A>(softmax_scale), mask};
    backward(a);
  });
  dq.copy_(dq_acc.permute({0, 2, 1, 3}).mul_(softmax_scale));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) {
  m.impl("attention_lse", &attention_lse_cpu);
  m.impl("attention_lse_backward", &attention_lse_backward_cpu);
}

}  // namespace vita_ext
