// Shared by the CPU and CUDA kernels of attention_lse, attention_lse_backward and merge_attention_:
// the argument checks (identical on both devices, so both raise the same messages) and the mask rule.
//
// The mask rule in one place: query row i sees exactly the keys of a half-open interval [lo, hi).
// cu_seqlens gives the segment [cu[s], cu[s+1]) holding i; causal (bottom-right aligned) caps hi at
// i + Sk - Sq + 1. Both bounds are non-decreasing in i, so a tile of rows [i0, i1) sees keys inside
// [lo(i0), hi(i1 - 1)), and a tile of keys is seen by rows inside a range found by bisection. That is
// how the kernels skip whole tiles without ever building an [Sq, Sk] mask.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "checks.h"

#if defined(__CUDACC__)
#define VITA_HD __host__ __device__ __forceinline__
#else
#define VITA_HD inline
#endif

namespace vita_ext {
namespace attn {

constexpr int64_t kMaxHeadDim = 256;

// The visible-key rule of one attention call. cu (nseg + 1 int64 offsets, on the kernel's device) is
// null without packing; with packing sq == sk.
struct MaskSpec {
  int64_t sq = 0;
  int64_t sk = 0;
  bool causal = false;
  const int64_t* cu = nullptr;
  int64_t nseg = 0;
};

// Keys [lo, hi) seen by query row i (hi == lo when it sees none).
VITA_HD void row_range(const MaskSpec& m, int64_t i, int64_t& lo, int64_t& hi) {
  lo = 0;
  hi = m.sk;
  if (m.cu != nullptr) {
    // The last segment s with cu[s] <= i; empty segments before it are skipped by taking the last.
    int64_t a = 0, b = m.nseg - 1;
    while (a < b) {
      const int64_t mid = (a + b + 1) / 2;
      if (m.cu[mid] <= i) a = mid; else b = mid - 1;
    }
    // Clamped: offsets trusted without a host check (max_seqlen given) can never index outside [0, sk).
    lo = m.cu[a] < 0 ? 0 : (m.cu[a] > m.sk ? m.sk : m.cu[a]);
    hi = m.cu[a + 1] > m.sk ? m.sk : m.cu[a + 1];
  }
  if (m.causal) {
    const int64_t cap = i + m.sk - m.sq + 1;
    if (cap < hi) hi = cap;
  }
  if (hi < lo) hi = lo;
}

// Rows [first, end) of [0, sq) that see at least one key of [j0, j1) (j0 < j1). Both are bisections
// on the monotone bounds: first = min{i : hi(i) > j0}, end = min{i : lo(i) >= j1}.
VITA_HD void rows_seeing(const MaskSpec& m, int64_t j0, int64_t j1, int64_t& first, int64_t& end) {
  int64_t a = 0, b = m.sq, lo, hi;
  while (a < b) {
    const int64_t mid = (a + b) / 2;
    row_range(m, mid, lo, hi);
    if (hi > j0) b = mid; else a = mid + 1;
  }
  first = a;
  a = first;
  b = m.sq;
  while (a < b) {
    const int64_t mid = (a + b) / 2;
    row_range(m, mid, lo, hi);
    if (lo >= j1) b = mid; else a = mid + 1;
  }
  end = a;
  // A row in [first, end) may still see none of [j0, j1) when its interval is empty; the kernels mask
  // per element, so the range only has to be a superset.
}

// dtype of the lse: fp32, except fp64 for fp64 inputs (CPU only; gradcheck needs it).
inline at::ScalarType lse_dtype(at::ScalarType q) { return q == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cuda_dtype(const char* op, const at::Tensor& t, const char* name) {
  if (t.is_cuda()) {
    TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": argument '", name,
                "' must have dtype torch.float32, torch.bfloat16 or torch.float16 on CUDA (torch.float64 is "
                "CPU-only), got torch.float64");
  }
}

inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_float(op, q, "q");
  check_cuda_dtype(op, q, "q");
  check_same_dtype(op, k, "k", q, "q");
  check_same_dtype(op, v, "v", q, "q");
  check_same_device(op, k, "k", q, "q");
  check_same_device(op, v, "v", q, "q");
  check_dim(op, q, "q", 4, "[B, Sq, Hq, D]");
  check_dim(op, k, "k", 4, "[B, Sk, Hkv, D]");
  check_dim(op, v, "v", 4, "[B, Sk, Hkv, D]");
  const int64_t d = q.size(3);
  TORCH_CHECK(d >= 1 && d <= kMaxHeadDim, op, ": argument 'q' must have a head dim (dim 3) in [1, ",
              kMaxHeadDim, "], got shape ", shape_str(q));
  check_size(op, k, "k", 0, q.size(0), "the batch size of 'q'");
  check_size(op, k, "k", 3, d, "the head dim of 'q'");
  check_shape(op, v, "v", k.sizes(), "the shape of 'k'");
  const int64_t hq = q.size(2), hkv = k.size(2);
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, op, ": argument 'k' must have a number of heads (dim 2) that divides the ",
              hq, " heads of 'q', got shape ", shape_str(k));
}

// True when cu_seqlens stays on the device unchecked: a CUDA tensor with the caller's max_seqlen (the
// caller validated the offsets once per batch, e.g. the packer; the kernels clamp them to [0, Sk)).
inline bool trusted_device_cu(const c10::optional<at::Tensor>& cu_opt, c10::optional<int64_t> max_seqlen) {
  return cu_opt.has_value() && cu_opt->defined() && cu_opt->is_cuda() && max_seqlen.has_value();
}
// (A CPU cu_seqlens, or one without max_seqlen, is always copied to the host and checked.)

// Validates cu_seqlens and returns it as host int64 offsets (empty without packing, or when the offsets
// are trusted on the device: then only what needs no values is checked). The copy to the host is one
// small transfer (a sync on CUDA); it lets every later check and every tile bound be exact.
inline std::vector<int64_t> check_cu_seqlens(const char* op, const c10::optional<at::Tensor>& cu_opt,
                                             const at::Tensor& q, const at::Tensor& k,
                                             c10::optional<int64_t> max_seqlen = c10::nullopt) {
  std::vector<int64_t> host;
  if (max_seqlen.has_value()) {
    TORCH_CHECK(*max_seqlen >= 0 && *max_seqlen <= q.size(1), op, ": argument 'max_seqlen' must be in [0, ",
                q.size(1), "] (the sequence length of 'q'), got ", *max_seqlen);
  }
  if (!cu_opt.has_value() || !cu_opt->defined()) return host;
  const at::Tensor& cu = *cu_opt;
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
              ": argument 'cu_seqlens' must have dtype torch.int32 or torch.int64, got ", dtype_name(cu.scalar_type()));
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, op,
              ": argument 'cu_seqlens' must be 1-D [n + 1] with n >= 1, got shape ", shape_str(cu));
  TORCH_CHECK(q.size(0) == 1, op, ": argument 'cu_seqlens' requires batch size 1 (packed sequences), got 'q' of shape ",
              shape_str(q));
  TORCH_CHECK(q.size(1) == k.size(1), op, ": argument 'cu_seqlens' requires Sq == Sk, got 'q' of shape ",
              shape_str(q), " and 'k' of shape ", shape_str(k));
  if (trusted_device_cu(cu_opt, max_seqlen) && q.is_cuda()) return host;
  const at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  host.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  TORCH_CHECK(host.front() == 0, op, ": argument 'cu_seqlens' must start at 0, got ", host.front());
  TORCH_CHECK(host.back() == q.size(1), op, ": argument 'cu_seqlens' must end at the sequence length ", q.size(1),
              ", got ", host.back());
  for (size_t s = 1; s < host.size(); ++s) {
    TORCH_CHECK(host[s] >= host[s - 1], op, ": argument 'cu_seqlens' must be non-decreasing, got ", host[s - 1],
                " then ", host[s], " at index ", s);
  }
  return host;
}

inline std::vector<int64_t> check_attention_lse_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, const c10::optional<at::Tensor>& cu,
                                                     c10::optional<int64_t> max_seqlen = c10::nullopt) {
  check_qkv(op, q, k, v);
  return check_cu_seqlens(op, cu, q, k, max_seqlen);
}

inline std::vector<int64_t> check_attention_lse_backward_args(
    const char* op, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& cu, c10::optional<int64_t> max_seqlen = c10::nullopt) {
  check_qkv(op, q, k, v);
  const at::ScalarType ld = lse_dtype(q.scalar_type());
  const std::vector<int64_t> lse_shape = {q.size(0), q.size(2), q.size(1)};
  check_same_dtype(op, grad_out, "grad_out", q, "q");
  check_same_device(op, grad_out, "grad_out", q, "q");
  check_shape(op, grad_out, "grad_out", q.sizes(), "the shape of 'q'");
  // out may be kept in fp32 by a ring that merges in fp32, so it is either q's dtype or fp32.
  TORCH_CHECK(out.scalar_type() == q.scalar_type() || out.scalar_type() == at::kFloat, op,
              ": argument 'out' must have dtype ", dtype_name(q.scalar_type()), " (the dtype of 'q') or torch.float32, got ",
              dtype_name(out.scalar_type()));
  check_same_device(op, out, "out", q, "q");
  check_shape(op, out, "out", q.sizes(), "the shape of 'q'");
  check_dtype(op, lse, "lse", ld);
  check_same_device(op, lse, "lse", q, "q");
  check_shape(op, lse, "lse", lse_shape, "[B, Hq, Sq] of 'q'");
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_dtype(op, *grad_lse, "grad_lse", ld);
    check_same_device(op, *grad_lse, "grad_lse", q, "q");
    check_shape(op, *grad_lse, "grad_lse", lse_shape, "[B, Hq, Sq] of 'q'");
  }
  return check_cu_seqlens(op, cu, q, k, max_seqlen);
}

// Offsets -> the MaskSpec the kernels read: the checked host offsets (uploaded), or the trusted device
// tensor itself (converted to int64 on the device, no sync). `cu_dev` keeps the device copy alive.
inline MaskSpec make_mask(const at::Tensor& q, const at::Tensor& k, bool causal, const std::vector<int64_t>& cu_host,
                          at::Tensor& cu_dev, const c10::optional<at::Tensor>& cu_opt = c10::nullopt,
                          c10::optional<int64_t> max_seqlen = c10::nullopt) {
  MaskSpec m;
  m.sq = q.size(1);
  m.sk = k.size(1);
  m.causal = causal;
  if (!cu_host.empty()) {
    cu_dev = at::tensor(cu_host, at::TensorOptions().dtype(at::kLong)).to(q.device());
  } else if (trusted_device_cu(cu_opt, max_seqlen)) {
    cu_dev = cu_opt->to(at::kLong).contiguous();
  }
  if (cu_dev.defined()) {
    m.cu = cu_dev.data_ptr<int64_t>();
    m.nseg = cu_dev.numel() - 1;
  }
  return m;
}

// The kernels read [.., D] rows through (b, s, h) strides; a last dim with stride != 1 is copied.
inline at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.size(-1) == 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// merge_attention_: out [B, S, H, D] (fp32/bf16/fp16; fp64 on CPU), lse [B, H, S] fp32, both updated in
// place and possibly strided views; block_out [B, S, H, D] any float dtype; block_lse [B, H, S] fp32.
inline void check_merge_attention_args(const char* op, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& block_out, const at::Tensor& block_lse) {
  check_float(op, out, "out");
  check_cuda_dtype(op, out, "out");
  check_float(op, block_out, "block_out");
  check_cuda_dtype(op, block_out, "block_out");
  check_dtype(op, lse, "lse", at::kFloat);
  check_dtype(op, block_lse, "block_lse", at::kFloat);
  check_same_device(op, lse, "lse", out, "out");
  check_same_device(op, block_out, "block_out", out, "out");
  check_same_device(op, block_lse, "block_lse", out, "out");
  check_dim(op, out, "out", 4, "[B, S, H, D]");
  check_shape(op, block_out, "block_out", out.sizes(), "the shape of 'out'");
  const std::vector<int64_t> lse_shape = {out.size(0), out.size(2), out.size(1)};
  check_shape(op, lse, "lse", lse_shape, "[B, H, S] of 'out'");
  check_shape(op, block_lse, "block_lse", lse_shape, "[B, H, S] of 'out'");
  check_inner_contiguous(op, out, "out");
}

}  // namespace attn
}  // namespace vita_ext
