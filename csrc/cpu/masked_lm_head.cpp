// masked_lm_head, CPU: logits = hidden_states[positions] @ weight^T for K selected rows only.
//
// Algorithm: gather the K rows (any strides) into a contiguous [K, H] buffer, then one GEMM per
// vocabulary chunk. fp32/fp64 inputs go straight to at::mm; bf16/fp16 are converted to fp32 one
// weight chunk at a time (kVocabChunk x H x 4 bytes of scratch, never the whole weight) so that the
// accumulation is fp32 whatever the BLAS does for half types; the result is rounded once.
// Cost: 2*K*H*V FLOPs; bytes ~ V*H*sizeof(dtype) (the weight, read once) + K*(H + V)*sizeof(dtype).
// At decode/prefill K = 1 the op is bound by reading the weight: Long-VITA's [152064, 5120] bf16
// head is 1.557 GB per call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "masked_lm_head.h"

namespace vita_ext {
namespace {

constexpr int64_t kVocabChunk = 4096;

at::Tensor masked_lm_head_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& positions) {
  lm_head::check_args(hidden, weight, positions);
  const int64_t T = hidden.size(0), V = weight.size(0);
  const auto pos = lm_head::normalize_positions(positions, T);
  const int64_t K = pos.size(0);
  auto out = at::empty({K, V}, hidden.options());
  if (K == 0 || V == 0) return out;
  const auto rows = hidden.index_select(0, pos);
  const auto dtype = hidden.scalar_type();
  if (dtype == at::kFloat || dtype == at::kDouble) {
    at::mm_out(out, rows, weight.t());
    return out;
  }
  const auto rows32 = rows.to(at::kFloat);
  for (int64_t c0 = 0; c0 < V; c0 += kVocabChunk) {
    const int64_t vc = std::min(kVocabChunk, V - c0);
    const auto w32 = weight.narrow(0, c0, vc).to(at::kFloat);
    out.narrow(1, c0, vc).copy_(at::mm(rows32, w32.t()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) { m.impl("masked_lm_head", &masked_lm_head_cpu); }

}  // namespace vita_ext
