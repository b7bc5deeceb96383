// vita_ext: every operator schema in one place, and the _C Python module with the build facts.
//
// Each op has a CPU kernel in csrc/cpu/<op>.cpp and a CUDA kernel in csrc/cuda/<op>.cu, registered
// with TORCH_LIBRARY_IMPL for its dispatch key. Autograd and fake (meta) kernels are registered from
// Python (vita_ext/ops/<op>.py). vita_ext/reference.py holds the pure-PyTorch specification of each.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef VITA_EXT_TORCH_VERSION
#define VITA_EXT_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(vita_ext, m) {
  // Pixel shuffle (scale 0.5, InternVL v2 order) + LayerNorm(4C) + Linear + exact GELU + Linear:
  // x [N, L, C] (L = g*g patches, g even) -> y [N, L/4, D2]; b1 and b2 are optional biases.
  // save_activations: also return what the backward needs, so it recomputes nothing (M = N*L/4 rows):
  // xn [M, 4C] (LayerNorm output), h [M, D1] (pre-activation, b1 included), g [M, D1] (GELU output),
  // all in x's dtype, and stats [2, M] (LayerNorm mean and rstd, fp32; fp64 for fp64); [0]-element
  // tensors otherwise.
  m.def("pixel_shuffle_projector(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor w1, Tensor? b1, "
        "Tensor w2, Tensor? b2, float eps, bool save_activations=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of pixel_shuffle_projector w.r.t. (x, ln_weight, ln_bias, w1, b1, w2, b2), from the saved
  // activations (xn, h, g, stats: all four or none) or recomputing the LayerNorm, the first GEMM and the
  // GELU. output_mask says which to compute: the others are [0]-element tensors, and no work is done
  // for them (no dx and no LayerNorm backward for a frozen ViT). db1/db2 are computed when asked for
  // even when the forward had no bias.
  m.def("pixel_shuffle_projector_backward(Tensor grad_y, Tensor x, Tensor ln_weight, Tensor ln_bias, "
        "Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, float eps, Tensor? xn=None, Tensor? h=None, "
        "Tensor? g=None, Tensor? stats=None, bool[7] output_mask=[True, True, True, True, True, True, True]) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Logits for selected rows only: hidden_states [T, H], weight [V, H], positions [K] int64 -> [K, V].
  m.def("masked_lm_head(Tensor hidden_states, Tensor weight, Tensor positions) -> Tensor");

  // Cross-entropy of (hidden_states @ weight^T) against labels without materialising [T, V] logits;
  // rows with label == ignore_index never reach the vocabulary GEMM. reduction: 'mean'|'sum'|'none'.
  // num_supervised: the count of labels != ignore_index when the caller knows it (then no value is read
  // back from the device; a wrong count or label gives NaN instead of an error). grad_in_forward =
  // [dH, dW]: also form those gradients of the loss (for a unit upstream gradient) in this pass
  // ('mean'/'sum' only); the backward then only scales them.
  // Returns (loss fp32: [] or [T], lse fp64 [T] with 0 at ignored rows, grad_hidden [T, H] or [0],
  // grad_weight [V, H] or [0]) -- lse is kept for the backward; fp64 because exp(logit - lse) in the
  // backward scales a whole row by lse's rounding error.
  m.def("masked_linear_cross_entropy(Tensor hidden_states, Tensor weight, Tensor labels, "
        "int ignore_index, str reduction, int? num_supervised=None, bool[2] grad_in_forward=[False, False]) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients w.r.t. (hidden_states, weight), recomputing the logits; grad_loss has the loss's shape.
  // output_mask says which to compute ([0]-element tensors for the others: no work, no allocation).
  m.def("masked_linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden_states, Tensor weight, "
        "Tensor labels, Tensor lse, int ignore_index, str reduction, int? num_supervised=None, "
        "bool[2] output_mask=[True, True]) -> (Tensor, Tensor)");

  // Flash-style attention returning the log-sum-exp: q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]
  // -> (out [B, Sq, Hq, D], lse [B, Hq, Sq] fp32). Causal masks are bottom-right aligned (query i
  // sees keys j <= i + Sk - Sq). cu_seqlens [n+1] (B == 1, Sq == Sk) makes it block-diagonal;
  // with max_seqlen (the longest segment, as FlashAttention's varlen API) a CUDA cu_seqlens is trusted
  // as validated by the caller and stays on the device (no host copy, no sync); without it, it is
  // copied to the host and checked.
  m.def("attention_lse(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale, "
        "Tensor? cu_seqlens, int? max_seqlen=None) -> (Tensor, Tensor)");
  // Gradients w.r.t. (q, k, v) given out and lse (which may come from a larger, merged attention,
  // as in ring attention). grad_lse is optional.
  m.def("attention_lse_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor lse, bool causal, float softmax_scale, Tensor? cu_seqlens, "
        "int? max_seqlen=None) -> (Tensor, Tensor, Tensor)");

  // In-place merge of a partial attention result (block_out, block_lse) into (out, lse), in fp32:
  // lse' = logaddexp(lse, block_lse); out' = out * exp(lse - lse') + block_out * exp(block_lse - lse').
  m.def("merge_attention_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, Tensor block_lse) -> ()");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef VITA_EXT_WITH_CUDA
  info["cuda"] = true;
  info["arch_list"] = std::string(VITA_EXT_ARCH_LIST);
  info["cuda_version"] = std::string(VITA_EXT_CUDA_VERSION);
  info["nvcc_version"] = std::string(VITA_EXT_NVCC_VERSION);
#else
  info["cuda"] = false;
  info["arch_list"] = std::string("");
  info["cuda_version"] = pybind11::none();
  info["nvcc_version"] = pybind11::none();
#endif
  info["torch_version"] = std::string(VITA_EXT_TORCH_VERSION);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "vita_ext compiled kernels; the ops live under torch.ops.vita_ext";
  module.def("build_info", &build_info,
             "Facts of this build: cuda (bool), arch_list, cuda_version, nvcc_version, torch_version");
}
