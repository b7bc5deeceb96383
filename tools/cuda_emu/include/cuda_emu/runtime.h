// CUDA emulation runtime: what the rewritten .cu files call. Every CUDA thread of a launch is a fiber
// (own stack, cooperative); a block runs its fibers on the calling OS thread until each one exits or
// blocks at a rendezvous (__syncthreads, a warp collective). The rendezvous rules are stricter than the
// hardware's, so that code that works only by luck on a GPU fails here:
//   __syncthreads   releases when every live thread of the block has arrived at the same call site;
//   warp collectives (shuffles, votes, __syncwarp) release when every lane named in the mask has
//                   arrived at the same collective; a named lane that exited or does not exist, or that
//                   waits somewhere else, is an error;
//   nothing runnable while threads wait: deadlock, reported with the waiting sites.
// Launches are validated as an H100 (sm_90) would; shared memory is allocated per block at its exact
// size and filled with 0xFF bytes (NaN in every float format). See tools/cuda_emu/README.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;

#define CUDA_EMU_HIDDEN __attribute__((visibility("hidden")))

namespace cuda_emu {

struct Site {
  const char* file;
  int line;
};

struct ThreadCtx {
  uint3 idx;         // threadIdx
  unsigned linear;   // x + y * bx + z * bx * by
  unsigned lane;     // linear % 32
  unsigned warp;     // linear / 32
};

struct BlockCtx {
  uint3 idx;  // blockIdx
  dim3 dim;   // blockDim
  dim3 grid;  // gridDim
};

extern CUDA_EMU_HIDDEN ThreadCtx* g_thread;  // the running fiber's thread, null on the host
extern CUDA_EMU_HIDDEN BlockCtx* g_block;

// An error found while a kernel runs (raised inside the fiber, reported by the launch on the host).
[[noreturn]] void kernel_fault(const std::string& what);
// threadIdx & co. used outside a kernel.
[[noreturn]] void host_access(const char* what);

inline ThreadCtx& this_thread(const char* what) {
  if (__builtin_expect(g_thread == nullptr, 0)) host_access(what);
  return *g_thread;
}
inline BlockCtx& this_block(const char* what) {
  if (__builtin_expect(g_block == nullptr, 0)) host_access(what);
  return *g_block;
}

// ------------------------------------------------------------------------------------------ rendezvous
enum class Coll : int { SyncWarp, ShflIdx, ShflXor, ShflUp, ShflDown, Ballot, Any, All };

uint64_t warp_collective(Coll kind, unsigned mask, uint64_t value, int param, int width, Site site);
// kind: 0 plain, 1 count, 2 and, 3 or. Returns the count / and / or of the predicates.
int syncthreads(int kind, int pred, Site site);
unsigned activemask();

// ---------------------------------------------------------------------------------------- shared memory
void* static_shared_alloc(const void* key, size_t bytes, size_t align, const char* what);
void* dynamic_shared(size_t align);

template <class T, int Id, size_t Align>
T& static_shared() {
  static const char key = 0;  // one per declaration and instantiation
  constexpr size_t a = Align > alignof(T) ? Align : alignof(T);
  return *static_cast<T*>(static_shared_alloc(&key, sizeof(T), a, __PRETTY_FUNCTION__));
}

// ---------------------------------------------------------------------------------------------- launch
struct LaunchDesc {
  const void* fn;      // the kernel's address (the key of cudaFuncSetAttribute)
  const char* callee;  // the launch expression's callee, as written
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};

// Validates the configuration (recording a launch error, as CUDA does, when it is invalid) and runs
// every block; a fault found while running is thrown as a c10::Error naming kernel, block and thread.
void run_launch(const LaunchDesc& d, void (*thread_main)(void*), void* ctx);

// Called by every thread at the top of each __global__ function (inserted by the rewrite).
void kernel_entry(const char* pretty, long long launch_bounds);

template <class... P>
struct Launcher {
  void (*fn)(P...);
  LaunchDesc d;

  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Arguments are converted to the parameter types once, on the host, as a CUDA launch does.
    std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    struct Ctx {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...>* args;
    } ctx{fn, &args};
    run_launch(d, [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      std::apply(x->fn, *x->args);  // each thread gets its own by-value copies
    }, &ctx);
  }
};

template <class... P>
Launcher<P...> launch(void (*fn)(P...), const char* callee, const char* file, int line, dim3 grid, dim3 block,
                      size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launcher<P...>{fn, LaunchDesc{reinterpret_cast<const void*>(fn), callee, file, line, grid, block, smem,
                                       stream}};
}

// ----------------------------------------------------------------------------------------- error state
cudaError_t take_last_error();  // cudaGetLastError
cudaError_t peek_last_error();
const char* error_string(cudaError_t e);
const char* error_name(cudaError_t e);
void set_error(cudaError_t e, const std::string& detail);
// Throws a c10::Error in CUDA's wording ("CUDA error: ...") when e is not cudaSuccess.
void check_cuda(cudaError_t e, const char* expr, const char* file, int line);

// cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
cudaError_t set_max_dynamic_smem(const void* fn, int bytes);

}  // namespace cuda_emu
