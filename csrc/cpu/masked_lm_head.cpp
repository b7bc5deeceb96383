// masked_lm_head, CPU: logits = hidden_states[positions] @ weight^T for K selected rows only.
//
// Algorithm: check and wrap the positions (read on the host where they live: no transfer), gather the
// K rows (any strides) into a contiguous [K, H] buffer, then:
//   - K <= kDotRows (decode, last-token prefill; fp32/bf16/fp16): rows::dot_rows, fp32 dot products
//     that read each weight row once for all K rows, in one parallel pass over the vocabulary. This is
//     a GEMV bound by reading the weight; oneDNN's bf16 GEMV path reads it many times slower on the CPU
//     we measured (RESULTS.md), and converting the weight to fp32 first costs a full extra pass.
//   - otherwise one GEMM through ATen in the GEMM dtype of cpu/cpu_gemm.h (at::mm: bf16 with fp32
//     accumulation on CPUs with native bf16 dot products, as PyTorch's eager F.linear), or, for half
//     types on CPUs without them, fp32 GEMMs on kVocabChunk-row weight chunks converted one at a time
//     (kVocabChunk x H x 4 bytes of scratch, never the whole weight).
// The result is rounded to the input dtype once.
// Cost: 2*K*H*V FLOPs; bytes ~ V*H*sizeof(dtype) (the weight, read once) + K*(H + V)*sizeof(dtype).
// At decode/prefill K = 1 the op is bound by reading the weight: Long-VITA's [152064, 5120] bf16
// head is 1.557 GB per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_gemm.h"
#include "cpu/row_kernels.h"
#include "masked_lm_head.h"

namespace vita_ext {
namespace {

constexpr int64_t kVocabChunk = 4096;
constexpr int64_t kDotRows = 4;
constexpr int64_t kSerialBytes = int64_t(32) << 20;

template <typename T>
void dot_head(const at::Tensor& rows, const at::Tensor& weight, at::Tensor& out) {
  const int64_t K = rows.size(0), H = rows.size(1), V = weight.size(0);
  const auto x32 = rows.to(at::kFloat).contiguous();
  auto out32 = out.scalar_type() == at::kFloat ? out : at::empty({K, V}, rows.options().dtype(at::kFloat));
  const T* w = weight.data_ptr<T>();
  const int64_t ldw = weight.stride(0);
  float* o = out32.data_ptr<float>();
  const float* x = x32.data_ptr<float>();
  // Threads only for a weight of more than kSerialBytes: below it one core streams the weight in about a
  // millisecond, and a parallel region on a busy machine can wait longer than that for its second thread.
  const int64_t grain = std::max<int64_t>(1, kSerialBytes / std::max<int64_t>(H * weight.element_size(), 1));
  at::parallel_for(0, V, grain, [&](int64_t begin, int64_t end) {
    rows::dot_rows(w + begin * ldw, ldw, end - begin, H, x, K, o + begin, V);
  });
  if (!out32.is_same(out)) out.copy_(out32);
}

at::Tensor masked_lm_head_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& positions) {
  lm_head::check_args(hidden, weight, positions);
  const int64_t T = hidden.size(0), V = weight.size(0);
  const auto pos = lm_head::normalize_positions_cpu(positions, T);
  const int64_t K = pos.size(0);
  auto out = at::empty({K, V}, hidden.options());
  if (K == 0 || V == 0) return out;
  const auto rows = hidden.index_select(0, pos);
  const auto dtype = hidden.scalar_type();
  if (dtype != at::kDouble && K <= kDotRows && (weight.stride(1) == 1 || weight.size(1) <= 1)) {
    if (dtype == at::kBFloat16) {
      dot_head<c10::BFloat16>(rows, weight, out);
    } else if (dtype == at::kHalf) {
      dot_head<c10::Half>(rows, weight, out);
    } else {
      dot_head<float>(rows, weight, out);
    }
    return out;
  }
  const auto gd = cpu_gemm::gemm_dtype(dtype);
  if (gd == dtype) {
    at::mm_out(out, rows, weight.t());
    return out;
  }
  const auto rows32 = rows.to(gd);
  for (int64_t c0 = 0; c0 < V; c0 += kVocabChunk) {
    const int64_t vc = std::min(kVocabChunk, V - c0);
    const auto w32 = weight.narrow(0, c0, vc).to(gd);
    out.narrow(1, c0, vc).copy_(at::mm(rows32, w32.t()));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vita_ext, CPU, m) { m.impl("masked_lm_head", &masked_lm_head_cpu); }

}  // namespace vita_ext
