// Internals of the fiber scheduler shared by scheduler.cpp (fibers, rendezvous, shared memory) and
// launch.cpp (validation, the grid loop).
#pragma once

#include <cstdint>
#include <exception>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_emu/runtime.h"

namespace cuda_emu {
namespace detail {

enum class St : uint8_t { Ready, Blocked, Done };
enum class Wait : uint8_t { None, Sync, Warp };

struct Fault : std::exception {
  explicit Fault(std::string m) : msg(std::move(m)) {}
  const char* what() const noexcept override { return msg.c_str(); }
  std::string msg;
};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;  // lowest usable byte (a PROT_NONE guard page lies below)
  size_t size = 0;
  void* fake = nullptr;   // ASan's fake stack of this fiber
  St st = St::Ready;
  Wait wait = Wait::None;
  Site site{};
  Coll coll{};
  unsigned coll_mask = 0;
  uint64_t result = 0;
  ThreadCtx ctx{};
};

struct Pending {  // a warp collective some lanes of the mask have reached
  unsigned mask = 0, arrived = 0;
  Coll kind{};
  Site site{};
  int width = 32;
  uint64_t vals[32]{};
  int params[32]{};
};

struct WarpState {
  unsigned present = 0, exited = 0, at_sync = 0;  // lanes that exist / have exited / wait at __syncthreads
  std::vector<Pending> pend;
};

struct Block {
  BlockCtx ctx{};
  const LaunchDesc* launch = nullptr;
  void (*thread_main)(void*) = nullptr;
  void* arg = nullptr;
  unsigned n = 0, live = 0, done = 0;
  std::vector<WarpState> warps;
  unsigned sync_arrived = 0;
  Site sync_site{};
  int sync_kind = 0, sync_count = 0, sync_and = 1, sync_or = 0;
  std::string error;
  int error_thread = -1;
  std::vector<std::pair<const void*, void*>> shared;
  size_t static_bytes = 0;
  void* dyn = nullptr;
  size_t dyn_bytes = 0;
  bool entered = false;
};

extern std::vector<Fiber> g_pool;  // fibers (and their stacks) reused by every block
extern Block* g_blk;                // the running block
extern Fiber* g_cur;                // the running fiber, null on the host
extern const char* g_kernel_name;   // __PRETTY_FUNCTION__ of the running launch's kernel

std::string where(Site s);
void ensure_pool(unsigned n);
void init_fiber(Fiber& f);
Fiber* current(const char* what);
void record_error(Block& b, const std::string& msg, int thread);
// Resumes the block's ready fibers in `order` until all exit, one faults, or none can run (deadlock).
void run_fibers(Block& b, const std::vector<unsigned>& order);

}  // namespace detail
}  // namespace cuda_emu
