// Force-included (g++ -include) before every rewritten .cu/.cuh: the CUDA keywords, the built-in
// variables, the intrinsics the project uses and CUDA's device math overloads, as host C++.
// The torch headers come first so that none of the macros below reaches them.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emu/runtime.h"

// ------------------------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __inline__ inline
#define __launch_bounds__(...)  // checked at kernel entry (the rewrite inserts cuda_emu::kernel_entry)
#define __align__(n) alignas(n)
#define __grid_constant__

// ----------------------------------------------------------------------------------- built-in variables
#define threadIdx (::cuda_emu::this_thread("threadIdx").idx)
#define blockIdx (::cuda_emu::this_block("blockIdx").idx)
#define blockDim (::cuda_emu::this_block("blockDim").dim)
#define gridDim (::cuda_emu::this_block("gridDim").grid)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------- vector types
#define CUDA_EMU_VEC2(T, N, A)                             \
  struct alignas(A) N##2 { T x, y; };                     \
  inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define CUDA_EMU_VEC4(T, N, A)                                               \
  struct alignas(A) N##4 { T x, y, z, w; };                                 \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
CUDA_EMU_VEC2(float, float, 8)
CUDA_EMU_VEC4(float, float, 16)
CUDA_EMU_VEC2(int, int, 8)
CUDA_EMU_VEC4(int, int, 16)
CUDA_EMU_VEC2(unsigned int, uint, 8)
CUDA_EMU_VEC4(unsigned int, uint, 16)
CUDA_EMU_VEC2(double, double, 16)
#undef CUDA_EMU_VEC2
#undef CUDA_EMU_VEC4

// ------------------------------------------------------------------------------------------ rendezvous
// The call site of a rendezvous: __builtin_FILE/LINE give the caller's location only when each is a
// default argument by itself (inside an initializer they give this header's).
#define CUDA_EMU_SITE_PARAMS const char *cuda_emu_file = __builtin_FILE(), int cuda_emu_line = __builtin_LINE()
#define CUDA_EMU_SITE ::cuda_emu::Site{cuda_emu_file, cuda_emu_line}

inline void __syncthreads(CUDA_EMU_SITE_PARAMS) { ::cuda_emu::syncthreads(0, 0, CUDA_EMU_SITE); }
inline int __syncthreads_count(int p, CUDA_EMU_SITE_PARAMS) { return ::cuda_emu::syncthreads(1, p, CUDA_EMU_SITE); }
inline int __syncthreads_and(int p, CUDA_EMU_SITE_PARAMS) { return ::cuda_emu::syncthreads(2, p, CUDA_EMU_SITE); }
inline int __syncthreads_or(int p, CUDA_EMU_SITE_PARAMS) { return ::cuda_emu::syncthreads(3, p, CUDA_EMU_SITE); }

inline void __syncwarp(unsigned mask = 0xffffffffu, CUDA_EMU_SITE_PARAMS) {
  ::cuda_emu::warp_collective(::cuda_emu::Coll::SyncWarp, mask, 0, 0, 32, CUDA_EMU_SITE);
}

namespace cuda_emu {
template <class T>
T shfl(Coll kind, unsigned mask, T v, int param, int width, Site s) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_collective(kind, mask, bits, param, width, s);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace cuda_emu

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, CUDA_EMU_SITE_PARAMS) {
  return ::cuda_emu::shfl(::cuda_emu::Coll::ShflIdx, mask, v, src, width, CUDA_EMU_SITE);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, CUDA_EMU_SITE_PARAMS) {
  return ::cuda_emu::shfl(::cuda_emu::Coll::ShflXor, mask, v, lane_mask, width, CUDA_EMU_SITE);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, CUDA_EMU_SITE_PARAMS) {
  return ::cuda_emu::shfl(::cuda_emu::Coll::ShflUp, mask, v, static_cast<int>(delta), width, CUDA_EMU_SITE);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, CUDA_EMU_SITE_PARAMS) {
  return ::cuda_emu::shfl(::cuda_emu::Coll::ShflDown, mask, v, static_cast<int>(delta), width, CUDA_EMU_SITE);
}
inline unsigned __ballot_sync(unsigned mask, int pred, CUDA_EMU_SITE_PARAMS) {
  return static_cast<unsigned>(::cuda_emu::warp_collective(::cuda_emu::Coll::Ballot, mask, pred != 0, 0, 32, CUDA_EMU_SITE));
}
inline int __any_sync(unsigned mask, int pred, CUDA_EMU_SITE_PARAMS) {
  return static_cast<int>(::cuda_emu::warp_collective(::cuda_emu::Coll::Any, mask, pred != 0, 0, 32, CUDA_EMU_SITE));
}
inline int __all_sync(unsigned mask, int pred, CUDA_EMU_SITE_PARAMS) {
  return static_cast<int>(::cuda_emu::warp_collective(::cuda_emu::Coll::All, mask, pred != 0, 0, 32, CUDA_EMU_SITE));
}
inline unsigned __activemask() { return ::cuda_emu::activemask(); }

// Fences order memory between threads running at once; fibers never run at once, so they are no-ops
// here (the emulator cannot show memory-model bugs: see the README's limits).
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

// -------------------------------------------------------------------------------------------- atomics
// Fibers switch only at rendezvous points, so a read-modify-write is atomic as written.
#define CUDA_EMU_ATOMIC_ADD(T)                 \
  inline T atomicAdd(T* address, T val) {      \
    const T old = *address;                    \
    *address = static_cast<T>(old + val);      \
    return old;                                \
  }
CUDA_EMU_ATOMIC_ADD(int)
CUDA_EMU_ATOMIC_ADD(unsigned int)
CUDA_EMU_ATOMIC_ADD(unsigned long long)
CUDA_EMU_ATOMIC_ADD(float)
CUDA_EMU_ATOMIC_ADD(double)
CUDA_EMU_ATOMIC_ADD(c10::Half)
CUDA_EMU_ATOMIC_ADD(c10::BFloat16)
#undef CUDA_EMU_ATOMIC_ADD

#define CUDA_EMU_ATOMIC_INT(T)                                                               \
  inline T atomicSub(T* a, T v) { const T o = *a; *a = o - v; return o; }                    \
  inline T atomicExch(T* a, T v) { const T o = *a; *a = v; return o; }                       \
  inline T atomicMin(T* a, T v) { const T o = *a; *a = v < o ? v : o; return o; }            \
  inline T atomicMax(T* a, T v) { const T o = *a; *a = v > o ? v : o; return o; }            \
  inline T atomicAnd(T* a, T v) { const T o = *a; *a = o & v; return o; }                    \
  inline T atomicOr(T* a, T v) { const T o = *a; *a = o | v; return o; }                     \
  inline T atomicXor(T* a, T v) { const T o = *a; *a = o ^ v; return o; }                    \
  inline T atomicCAS(T* a, T cmp, T v) { const T o = *a; *a = o == cmp ? v : o; return o; }
CUDA_EMU_ATOMIC_INT(int)
CUDA_EMU_ATOMIC_INT(unsigned int)
CUDA_EMU_ATOMIC_INT(unsigned long long)
#undef CUDA_EMU_ATOMIC_INT
inline float atomicExch(float* a, float v) { const float o = *a; *a = v; return o; }

// ------------------------------------------------------------------------------------ math intrinsics
// Exact host functions stand in for the fast approximate ones (the emulator is not nvcc's numerics).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752440f); }
inline double normcdf(double x) { return 0.5 * std::erfc(-x * 0.70710678118654752440); }

inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
template <class T>
T __ldg(const T* p) { return *p; }

// CUDA's device max/min: fmax/fmin semantics for floating point (a NaN operand loses), the usual
// arithmetic conversions otherwise.
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(static_cast<C>(a), static_cast<C>(b));
  else return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
}

// ---------------------------------------------------------------------------------------- registration
// TORCH_LIBRARY_IMPL(ns, CUDA, m) is rewritten to this: the block is recorded, not registered; the
// control ops (cuda_emu::enable) register it later under the CPU key (see src/control.cpp).
namespace cuda_emu {
class LibraryProxy;
struct LibraryInit {
  LibraryInit(const char* ns, const char* key, void (*fn)(LibraryProxy&), const char* file, int line);
};

// The torch::Library subset a TORCH_LIBRARY_IMPL block uses: impl(name, function). Each kernel is
// wrapped so that an op call is one emulation scope (NaN-filled allocations, checked launch errors).
class LibraryProxy {
 public:
  explicit LibraryProxy(torch::Library& lib) : lib_(lib) {}

  template <class R, class... A>
  LibraryProxy& impl(const char* name, R (*f)(A...)) {
    lib_.impl(name, [f, name](A... a) -> R {
      OpScope scope(name);
      if constexpr (std::is_void_v<R>) {
        f(std::forward<A>(a)...);
        scope.finish();
      } else {
        R r = f(std::forward<A>(a)...);
        scope.finish();
        return r;
      }
    });
    return *this;
  }
  template <class FuncType, FuncType* f>
  LibraryProxy& impl(const char* name, c10::CompileTimeFunctionPointer<FuncType, f>) {
    return impl(name, f);
  }

  // One emulated op call: serialised (fibers share global state), allocations NaN-filled, and a launch
  // error nobody checked raised at the end (a GPU would silently drop the launch).
  struct OpScope {
    explicit OpScope(const char* op);
    ~OpScope();
    void finish();
    OpScope(const OpScope&) = delete;
    OpScope& operator=(const OpScope&) = delete;
  };

 private:
  torch::Library& lib_;
};
}  // namespace cuda_emu

#define CUDA_EMU_CAT2(a, b) a##b
#define CUDA_EMU_CAT(a, b) CUDA_EMU_CAT2(a, b)
#define CUDA_EMU_LIBRARY_IMPL(ns, key, m)                                                                      \
  static void CUDA_EMU_CAT(cuda_emu_library_init_, __LINE__)(::cuda_emu::LibraryProxy&);                      \
  static const ::cuda_emu::LibraryInit CUDA_EMU_CAT(cuda_emu_library_rec_, __LINE__)(                          \
      #ns, #key, &CUDA_EMU_CAT(cuda_emu_library_init_, __LINE__), __FILE__, __LINE__);                         \
  static void CUDA_EMU_CAT(cuda_emu_library_init_, __LINE__)(::cuda_emu::LibraryProxy & m)
