// Internals shared by the runtime's sources (not seen by the rewritten kernels).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>

#include "cuda_emu/runtime.h"

namespace cuda_emu {

enum class Order { Forward, Reverse, Random };

struct Options {
  Order order = Order::Forward;  // of the threads in a block and of the blocks in a grid
  uint64_t seed = 0;             // of Order::Random
  bool nan_fill = true;          // shared memory and allocations made during an op start as 0xFF bytes
  size_t stack_bytes = 256 * 1024;
};
Options& options();
const char* order_name(Order o);

struct KernelStats {
  uint64_t launches = 0, blocks = 0, threads = 0;
};

struct Stats {
  uint64_t launches = 0, launch_errors = 0, blocks = 0, threads = 0, switches = 0, gemms = 0;
  std::map<std::string, KernelStats> kernels;  // by __PRETTY_FUNCTION__ of the kernel
  std::map<std::string, uint64_t> ops;         // emulated op calls, by name
};
Stats& stats();

// H100 (sm_90) limits the launches are validated against.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimXY = 1024, kMaxBlockDimZ = 64;
constexpr unsigned kMaxGridDimX = 2147483647u, kMaxGridDimYZ = 65535;
constexpr size_t kDefaultSmem = 48 * 1024;     // static shared memory, and dynamic without opt-in
constexpr size_t kMaxSmemOptin = 227 * 1024;   // cudaDevAttrMaxSharedMemoryPerBlockOptin = 232448

size_t max_dynamic_smem(const void* fn);  // what cudaFuncSetAttribute allowed (48 KB by default)
void reset_error_state();
bool error_pending(std::string* detail);

[[noreturn]] void throw_error(const std::string& msg);  // a c10::Error (RuntimeError in Python)

}  // namespace cuda_emu
