// Kernel launches: validation as an H100 (sm_90) would do it, then every block of the grid in forward,
// reverse or random order, each on fresh fibers and NaN-filled shared memory (scheduler.cpp).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fibers.h"
#include "internal.h"

namespace cuda_emu {

using namespace detail;

namespace {

uint64_t g_launch_counter = 0;

std::vector<unsigned> make_order(unsigned n, std::mt19937_64& rng) {
  std::vector<unsigned> v(n);
  std::iota(v.begin(), v.end(), 0u);
  if (options().order == Order::Reverse) std::reverse(v.begin(), v.end());
  if (options().order == Order::Random) std::shuffle(v.begin(), v.end(), rng);
  return v;
}

std::string dim_str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

std::string launch_str(const LaunchDesc& d) {
  std::string s = "kernel ";
  s += g_kernel_name ? g_kernel_name : d.callee;
  s += "\n  launched at " + where(Site{d.file, d.line}) + " as " + d.callee + "<<<" + dim_str(d.grid) + ", " +
       dim_str(d.block) + ", " + std::to_string(d.smem) + ">>>";
  return s;
}

void free_block_memory(Block& b) {
  for (auto& e : b.shared) std::free(e.second);
  b.shared.clear();
  std::free(b.dyn);
  b.dyn = nullptr;
}

// Runs block `lin` (linear index in the grid) to completion; returns the error text, empty if none.
std::string run_block(const LaunchDesc& d, uint64_t lin, void (*thread_main)(void*), void* arg,
                      std::mt19937_64& rng) {
  Block b;
  b.launch = &d;
  b.thread_main = thread_main;
  b.arg = arg;
  b.ctx.dim = d.block;
  b.ctx.grid = d.grid;
  b.ctx.idx = uint3{static_cast<unsigned>(lin % d.grid.x), static_cast<unsigned>(lin / d.grid.x % d.grid.y),
                    static_cast<unsigned>(lin / (static_cast<uint64_t>(d.grid.x) * d.grid.y))};
  b.n = d.block.x * d.block.y * d.block.z;
  b.live = b.n;
  b.warps.resize((b.n + 31) / 32);
  for (unsigned i = 0; i < b.n; ++i) b.warps[i / 32].present |= 1u << (i % 32);
  b.dyn_bytes = d.smem;
  if (posix_memalign(&b.dyn, 16, d.smem ? d.smem : 1) != 0) throw_error("cuda_emu: out of memory");
  if (options().nan_fill) std::memset(b.dyn, 0xFF, d.smem);
  for (unsigned i = 0; i < b.n; ++i) {
    Fiber& f = g_pool[i];
    init_fiber(f);
    f.ctx.linear = i;
    f.ctx.idx = uint3{i % d.block.x, i / d.block.x % d.block.y, i / (d.block.x * d.block.y)};
    f.ctx.lane = i % 32;
    f.ctx.warp = i / 32;
  }
  g_blk = &b;
  g_block = &b.ctx;
  run_fibers(b, make_order(b.n, rng));
  g_blk = nullptr;
  g_block = nullptr;
  free_block_memory(b);
  if (b.error.empty()) return {};
  std::string s = b.error + "\n  in " + launch_str(d) + "\n  block " +
                  dim_str(dim3(b.ctx.idx.x, b.ctx.idx.y, b.ctx.idx.z));
  if (b.error_thread >= 0) {
    const Fiber& f = g_pool[b.error_thread];
    s += ", thread " + dim_str(dim3(f.ctx.idx.x, f.ctx.idx.y, f.ctx.idx.z)) + " (warp " + std::to_string(f.ctx.warp) +
         ", lane " + std::to_string(f.ctx.lane) + ")";
  }
  s += "\n  thread and block order: " + std::string(order_name(options().order));
  if (options().order == Order::Random) s += " (seed " + std::to_string(options().seed) + ")";
  return s;
}

}  // namespace

void kernel_entry(const char* pretty, long long launch_bounds) {
  Fiber* f = current("kernel entry");
  Block& b = *g_blk;
  (void)f;
  if (b.entered) return;
  b.entered = true;
  if (g_kernel_name == nullptr) {
    g_kernel_name = pretty;
    KernelStats& k = stats().kernels[pretty];
    ++k.launches;
  }
  KernelStats& k = stats().kernels[pretty];
  ++k.blocks;
  k.threads += b.n;
  if (launch_bounds > 0 && b.n > static_cast<unsigned long long>(launch_bounds))
    kernel_fault("too many resources requested for launch: " + std::to_string(b.n) +
                 " threads per block exceed the kernel's __launch_bounds__(" + std::to_string(launch_bounds) + ")");
}

void run_launch(const LaunchDesc& d, void (*thread_main)(void*), void* arg) {
  if (g_cur != nullptr) kernel_fault("a kernel launch from device code (dynamic parallelism) is not emulated");
  ++stats().launches;
  const auto fail = [&](cudaError_t e, const std::string& why) {
    ++stats().launch_errors;
    set_error(e, why + " (" + d.callee + " launched at " + where(Site{d.file, d.line}) + ")");
  };
  const dim3 g = d.grid, t = d.block;
  if (g.x == 0 || g.y == 0 || g.z == 0) return fail(cudaErrorInvalidConfiguration, "empty grid " + dim_str(g));
  if (g.x > kMaxGridDimX || g.y > kMaxGridDimYZ || g.z > kMaxGridDimYZ)
    return fail(cudaErrorInvalidConfiguration, "grid " + dim_str(g) + " exceeds (2^31 - 1, 65535, 65535)");
  if (t.x == 0 || t.y == 0 || t.z == 0) return fail(cudaErrorInvalidConfiguration, "empty block " + dim_str(t));
  if (t.x > kMaxBlockDimXY || t.y > kMaxBlockDimXY || t.z > kMaxBlockDimZ)
    return fail(cudaErrorInvalidConfiguration, "block " + dim_str(t) + " exceeds (1024, 1024, 64)");
  const uint64_t threads = static_cast<uint64_t>(t.x) * t.y * t.z;
  if (threads > kMaxThreadsPerBlock)
    return fail(cudaErrorInvalidConfiguration, "block " + dim_str(t) + " has " + std::to_string(threads) +
                                                   " threads, more than 1024");
  if (d.smem > kMaxSmemOptin)
    return fail(cudaErrorInvalidValue, std::to_string(d.smem) + " bytes of dynamic shared memory exceed 227 KB");
  const size_t allowed = max_dynamic_smem(d.fn);
  if (d.smem > allowed)
    return fail(cudaErrorInvalidValue,
                std::to_string(d.smem) + " bytes of dynamic shared memory exceed the kernel's limit of " +
                    std::to_string(allowed) +
                    (allowed == kDefaultSmem ? " (48 KB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize))"
                                             : " set by cudaFuncSetAttribute"));
  const uint64_t blocks = static_cast<uint64_t>(g.x) * g.y * g.z;
  ensure_pool(static_cast<unsigned>(threads));
  std::mt19937_64 rng(options().seed * 0x9E3779B97F4A7C15ull + (++g_launch_counter));
  stats().blocks += blocks;
  stats().threads += blocks * threads;
  g_kernel_name = nullptr;
  const Order order = options().order;
  std::vector<uint64_t> perm;
  if (order == Order::Random) {
    if (blocks > (1u << 24)) throw_error("cuda_emu: random block order over more than 2^24 blocks is not supported");
    perm.resize(blocks);
    std::iota(perm.begin(), perm.end(), uint64_t{0});
    std::shuffle(perm.begin(), perm.end(), rng);
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t lin = order == Order::Forward ? i : order == Order::Reverse ? blocks - 1 - i : perm[i];
    const std::string err = run_block(d, lin, thread_main, arg, rng);
    if (!err.empty()) {
      g_kernel_name = nullptr;
      throw_error("CUDA emulation: " + err);
    }
  }
  g_kernel_name = nullptr;
}

}  // namespace cuda_emu
