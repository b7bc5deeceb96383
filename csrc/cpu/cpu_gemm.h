// The dtype the CPU kernels run their GEMMs in (through ATen: at::mm / at::addmm, i.e. oneDNN or MKL).
//
// fp32 and fp64 GEMMs run in their own dtype. For bf16 and fp16 operands the fast choice depends on the
// CPU: with native bf16 dot products (AVX512-BF16, AMX-BF16) a bf16 GEMM runs ~2-3x faster than fp32
// on the same core (oneDNN accumulates in fp32 and rounds the output once, as PyTorch's eager bf16
// matmul does); without them oneDNN emulates and fp32 is faster. Same for fp16 (AVX512-FP16, AMX-FP16).
// VITA_EXT_CPU_HALF_GEMM=native|fp32 overrides the choice (the tests use it to run both paths on one
// machine).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace vita_ext {
namespace cpu_gemm {

struct X86Features {
  bool avx512_bf16 = false, amx_bf16 = false, avx512_fp16 = false, amx_fp16 = false;
};

inline X86Features detect_x86() {
  X86Features f;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  // The OS must save the AVX-512 (opmask, ZMM) and AMX tile state: XCR0 bits 5-7 and 17-18.
  __cpuid(1, a, b, c, d);
  const bool osxsave = (c >> 27) & 1;
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool zmm_os = (xcr0 & 0xE6) == 0xE6;
  const bool amx_os = (xcr0 & 0x60000) == 0x60000;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx512f = (b >> 16) & 1;
  f.amx_bf16 = amx_os && ((d >> 22) & 1);
  f.avx512_fp16 = zmm_os && avx512f && ((d >> 23) & 1);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512_bf16 = zmm_os && avx512f && ((a >> 5) & 1);
  f.amx_fp16 = amx_os && ((a >> 21) & 1);
#endif
  return f;
}

inline const X86Features& features() {
  static const X86Features f = detect_x86();
  return f;
}

// The GEMM dtype for operands of dtype t (see the file comment). Read at every call: cheap.
inline at::ScalarType gemm_dtype(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return t;
  const char* env = std::getenv("VITA_EXT_CPU_HALF_GEMM");
  if (env != nullptr && *env != '\0') {
    if (std::strcmp(env, "native") == 0) return t;
    TORCH_CHECK(std::strcmp(env, "fp32") == 0, "vita_ext: environment variable VITA_EXT_CPU_HALF_GEMM must be "
                "'native' or 'fp32', got '", env, "'");
    return at::kFloat;
  }
  const auto& f = features();
  const bool native = t == at::kBFloat16 ? (f.avx512_bf16 || f.amx_bf16) : (f.avx512_fp16 || f.amx_fp16);
  return native ? t : at::kFloat;
}

}  // namespace cpu_gemm
}  // namespace vita_ext
