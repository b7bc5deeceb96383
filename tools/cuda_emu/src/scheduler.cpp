// Fibers, blocks and rendezvous: the heart of the CUDA emulation.
//
// A launch runs its blocks one after another (forward, reverse or random order). A block gives each of
// its threads a fiber (an x86-64 context on its own mmap'd stack with a guard page) and resumes them in
// the chosen order; a fiber runs until it exits or blocks at a rendezvous, so a missing barrier lets one
// thread run as far ahead of the others as it can -- the most hostile schedule, deterministic per order.
// Cost: one context switch per thread per rendezvous, ~50-100 ns.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#include "fibers.h"
#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#else
#define CUDA_EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#error "cuda_emu: the fiber switch is written for x86-64"
#endif

extern "C" {
CUDA_EMU_HIDDEN void cuda_emu_switch(void** save_sp, void* new_sp);
CUDA_EMU_HIDDEN void cuda_emu_fiber_start();
[[noreturn]] CUDA_EMU_HIDDEN void cuda_emu_fiber_main();
}

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *save_sp, switches to new_sp and restores the same set from there.
asm(R"(
  .text
  .globl cuda_emu_switch
  .hidden cuda_emu_switch
  .type cuda_emu_switch, @function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch

  .globl cuda_emu_fiber_start
  .hidden cuda_emu_fiber_start
  .type cuda_emu_fiber_start, @function
cuda_emu_fiber_start:
  call cuda_emu_fiber_main
  ud2
  .size cuda_emu_fiber_start, .-cuda_emu_fiber_start
)");

namespace cuda_emu {

ThreadCtx* g_thread = nullptr;
BlockCtx* g_block = nullptr;

namespace detail {

std::vector<Fiber> g_pool;  // fibers (and their stacks) reused by every block
size_t g_pool_stack = 0;
Block* g_blk = nullptr;
Fiber* g_cur = nullptr;
void* g_sched_sp = nullptr;
const char* g_kernel_name = nullptr;  // __PRETTY_FUNCTION__ of the running launch's kernel
#if CUDA_EMU_ASAN
const void* g_sched_bottom = nullptr;
size_t g_sched_size = 0;
void* g_sched_fake = nullptr;
#endif

const char* coll_name(Coll c) {
  switch (c) {
    case Coll::SyncWarp: return "__syncwarp";
    case Coll::ShflIdx: return "__shfl_sync";
    case Coll::ShflXor: return "__shfl_xor_sync";
    case Coll::ShflUp: return "__shfl_up_sync";
    case Coll::ShflDown: return "__shfl_down_sync";
    case Coll::Ballot: return "__ballot_sync";
    case Coll::Any: return "__any_sync";
    case Coll::All: return "__all_sync";
  }
  return "?";
}

const char* sync_name(int kind) {
  static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or"};
  return names[kind & 3];
}

std::string where(Site s) {
  const char* slash = std::strrchr(s.file, '/');
  return std::string(slash ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0); }

std::string lanes_str(unsigned m) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (m & (1u << l)) s += (s.empty() ? "" : ",") + std::to_string(l);
  return "{" + s + "}";
}

std::string hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

// ------------------------------------------------------------------------------------------ fibers

void ensure_pool(unsigned n) {
  const size_t want = options().stack_bytes;
  if (g_pool_stack != want) {  // stack size changed: drop the pool
    for (Fiber& f : g_pool) munmap(f.stack - sysconf(_SC_PAGESIZE), f.size + sysconf(_SC_PAGESIZE));
    g_pool.clear();
    g_pool_stack = want;
  }
  const size_t page = sysconf(_SC_PAGESIZE);
  const size_t size = (want + page - 1) / page * page;
  while (g_pool.size() < n) {
    void* base = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) throw_error("cuda_emu: cannot map a fiber stack");
    mprotect(base, page, PROT_NONE);  // overflow faults instead of corrupting the neighbour
    Fiber f;
    f.stack = static_cast<char*>(base) + page;
    f.size = size;
    g_pool.push_back(f);
  }
}

void init_fiber(Fiber& f) {
#if CUDA_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(f.stack, f.size);  // an abandoned fiber may have left redzones
#endif
  char* top = f.stack + f.size;
  auto* sp = reinterpret_cast<uint64_t*>(top - 128);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpucw) << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp (rbp = 0 ends frame-pointer walks)
  sp[7] = reinterpret_cast<uint64_t>(&cuda_emu_fiber_start);
  f.sp = sp;
  f.fake = nullptr;
  f.st = St::Ready;
  f.wait = Wait::None;
  f.result = 0;
}

void resume(Fiber* f) {
  g_cur = f;
  g_thread = &f->ctx;
  ++stats().switches;
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_sched_fake, f->stack, f->size);
#endif
  cuda_emu_switch(&g_sched_sp, f->sp);
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
  g_cur = nullptr;
  g_thread = nullptr;
}

void to_scheduler(Fiber* f) {
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&f->fake, g_sched_bottom, g_sched_size);
#endif
  cuda_emu_switch(&f->sp, g_sched_sp);
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake, &g_sched_bottom, &g_sched_size);
#endif
}

void block_here(Fiber* f) {
  f->st = St::Blocked;
  to_scheduler(f);
}

Fiber* current(const char* what) {
  if (g_cur == nullptr) host_access(what);
  return g_cur;
}

Fiber& fiber_of(const Block& b, unsigned warp, unsigned lane) {
  (void)b;
  return g_pool[warp * 32 + lane];
}

void record_error(Block& b, const std::string& msg, int thread) {
  if (!b.error.empty()) return;
  b.error = msg;
  b.error_thread = thread;
}

void release_sync(Block& b) {
  const int res = b.sync_kind == 1 ? b.sync_count : b.sync_kind == 2 ? b.sync_and : b.sync_or;
  for (WarpState& w : b.warps) w.at_sync = 0;
  for (unsigned i = 0; i < b.n; ++i) {
    Fiber& o = g_pool[i];
    if (o.st == St::Blocked && o.wait == Wait::Sync) {
      o.result = static_cast<uint64_t>(res);
      o.st = St::Ready;
    }
  }
  b.sync_arrived = 0;
}

void thread_exit(Fiber* f) {
  Block& b = *g_blk;
  f->st = St::Done;
  --b.live;
  ++b.done;
  WarpState& w = b.warps[f->ctx.warp];
  const unsigned bit = 1u << f->ctx.lane;
  w.exited |= bit;
  for (const Pending& p : w.pend) {
    if (p.mask & bit) {
      record_error(b, std::string("lane ") + std::to_string(f->ctx.lane) + " exited while lanes " +
                          lanes_str(p.arrived) + " of its warp wait for it at " + coll_name(p.kind) + " (" +
                          where(p.site) + ", mask " + hex(p.mask) + ")",
                   static_cast<int>(f->ctx.linear));
    }
  }
  if (b.sync_arrived > 0 && b.sync_arrived == b.live) release_sync(b);
}

std::string deadlock_report(const Block& b) {
  std::map<std::string, unsigned> groups;
  for (unsigned i = 0; i < b.n; ++i) {
    const Fiber& f = g_pool[i];
    if (f.st != St::Blocked) continue;
    std::string key = f.wait == Wait::Sync ? std::string(sync_name(b.sync_kind)) + " (" + where(f.site) + ")"
                                           : std::string(coll_name(f.coll)) + " (" + where(f.site) + ", mask " +
                                                 hex(f.coll_mask) + ")";
    ++groups[key];
  }
  std::string s = "deadlock: no thread can run;";
  for (const auto& [k, n] : groups) s += " " + std::to_string(n) + " thread(s) wait at " + k + ";";
  s += " " + std::to_string(b.done) + " of " + std::to_string(b.n) + " threads exited";
  return s;
}

void run_fibers(Block& b, const std::vector<unsigned>& order) {
  for (;;) {
    bool ran = false;
    for (unsigned i : order) {
      Fiber& f = g_pool[i];
      if (f.st != St::Ready) continue;
      resume(&f);
      ran = true;
      if (!b.error.empty()) return;
    }
    if (b.done == b.n) return;
    if (!ran) {
      record_error(b, deadlock_report(b), -1);
      return;
    }
  }
}

}  // namespace detail

using namespace detail;

// ------------------------------------------------------------------------------------------ public API

void kernel_fault(const std::string& what) {
  if (g_cur == nullptr) throw_error("cuda_emu: " + what);
  throw Fault(what);
}

void host_access(const char* what) {
  throw_error(std::string("cuda_emu: ") + what + " used outside a kernel (no emulated CUDA thread is running)");
}

unsigned activemask() {
  Fiber* f = current("__activemask");
  const WarpState& w = g_blk->warps[f->ctx.warp];
  return w.present & ~w.exited;
}

uint64_t warp_collective(Coll kind, unsigned mask, uint64_t value, int param, int width, Site site) {
  Fiber* f = current(coll_name(kind));
  Block& b = *g_blk;
  const unsigned lane = f->ctx.lane, bit = 1u << lane, warp = f->ctx.warp;
  WarpState& w = b.warps[warp];
  // Messages are built only on a fault: this path runs once per lane per collective.
  const auto me = [&] { return std::string(coll_name(kind)) + " (" + where(site) + ", mask " + hex(mask) + ")"; };
  if (!(mask & bit))
    kernel_fault("lane " + std::to_string(lane) + " calls " + me() + " without its own lane in the mask");
  if (mask & ~w.present)
    kernel_fault(me() + " names lanes " + lanes_str(mask & ~w.present) + " that do not exist (the block has " +
                 std::to_string(b.n) + " threads)");
  if (mask & w.exited) kernel_fault(me() + " waits for lanes " + lanes_str(mask & w.exited) + " that have exited");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    kernel_fault(me() + " with width " + std::to_string(width) + " (must be a power of 2 up to 32)");
  if (w.at_sync & mask & ~bit) {
    const unsigned l = static_cast<unsigned>(__builtin_ctz(w.at_sync & mask & ~bit));
    kernel_fault("lane " + std::to_string(l) + " waits at __syncthreads (" + where(fiber_of(b, warp, l).site) +
                 ") while lane " + std::to_string(lane) + " calls " + me());
  }
  // Join the collective these lanes are gathering at, if any. A different one that waits for this lane
  // while this one waits for its lanes is a mutual wait (divergent lanes at different collectives);
  // disjoint or one-sided overlaps (half-warps shuffling apart, then a full __syncwarp) are legal.
  Pending* p = nullptr;
  for (Pending& q : w.pend) {
    const bool same = q.mask == mask && q.kind == kind && q.width == width &&
                      (kind == Coll::SyncWarp || same_site(q.site, site));
    if (same) {
      p = &q;
    } else if ((q.mask & bit) && (mask & q.arrived)) {
      kernel_fault("lanes of one warp at different collectives: lanes " + lanes_str(q.arrived) + " wait at " +
                   coll_name(q.kind) + " (" + where(q.site) + ", mask " + hex(q.mask) + "), lane " +
                   std::to_string(lane) + " calls " + me());
    }
  }
  if (p == nullptr) {
    w.pend.emplace_back();
    p = &w.pend.back();
    p->mask = mask;
    p->kind = kind;
    p->site = site;
    p->width = width;
  }
  p->vals[lane] = value;
  p->params[lane] = param;
  p->arrived |= bit;
  if (p->arrived != mask) {
    f->wait = Wait::Warp;
    f->site = site;
    f->coll = kind;
    f->coll_mask = mask;
    block_here(f);
    f->wait = Wait::None;
    return f->result;
  }
  const Pending done = *p;
  w.pend.erase(w.pend.begin() + (p - w.pend.data()));
  uint64_t ballot = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((done.mask & (1u << l)) && done.vals[l] != 0) ballot |= 1u << l;
  uint64_t mine = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(done.mask & (1u << l))) continue;
    uint64_t r = 0;
    const int wd = done.width, seg = static_cast<int>(l) & ~(wd - 1), pl = done.params[l];
    int src = static_cast<int>(l);
    switch (done.kind) {
      case Coll::SyncWarp: break;
      case Coll::Ballot: r = ballot; break;
      case Coll::Any: r = ballot != 0; break;
      case Coll::All: r = ballot == done.mask; break;
      case Coll::ShflIdx: src = seg + (((pl % wd) + wd) % wd); break;
      case Coll::ShflXor: src = static_cast<int>(l) ^ (pl & 31); if (src >= seg + wd) src = static_cast<int>(l); break;
      case Coll::ShflUp: src = static_cast<int>(l) - pl; if (src < seg) src = static_cast<int>(l); break;
      case Coll::ShflDown: src = static_cast<int>(l) + pl; if (src >= seg + wd) src = static_cast<int>(l); break;
    }
    if (done.kind == Coll::ShflIdx || done.kind == Coll::ShflXor || done.kind == Coll::ShflUp ||
        done.kind == Coll::ShflDown) {
      if (!(done.mask & (1u << src)))
        kernel_fault("lane " + std::to_string(l) + " of " + me() + " reads lane " + std::to_string(src) +
                     ", which is not in the mask (its value is undefined)");
      r = done.vals[src];
    }
    if (l == lane) {
      mine = r;
    } else {
      Fiber& o = fiber_of(b, warp, l);
      o.result = r;
      o.st = St::Ready;
    }
  }
  return mine;
}

int syncthreads(int kind, int pred, Site site) {
  Fiber* f = current(sync_name(kind));
  Block& b = *g_blk;
  const unsigned bit = 1u << f->ctx.lane;
  for (const Pending& p : b.warps[f->ctx.warp].pend)
    if (p.mask & bit)
      kernel_fault("lane " + std::to_string(f->ctx.lane) + " reaches " + sync_name(kind) + " (" + where(site) +
                   ") while lanes " + lanes_str(p.arrived) + " of its warp wait for it at " + coll_name(p.kind) +
                   " (" + where(p.site) + ")");
  if (b.sync_arrived > 0 && (!same_site(b.sync_site, site) || b.sync_kind != kind))
    kernel_fault("__syncthreads reached at different lines: " + std::to_string(b.sync_arrived) +
                 " thread(s) wait at " + sync_name(b.sync_kind) + " (" + where(b.sync_site) + "), thread " +
                 std::to_string(f->ctx.linear) + " reaches " + sync_name(kind) + " (" + where(site) + ")");
  if (b.sync_arrived == 0) {
    b.sync_site = site;
    b.sync_kind = kind;
    b.sync_count = 0;
    b.sync_and = 1;
    b.sync_or = 0;
  }
  ++b.sync_arrived;
  b.sync_count += pred != 0;
  b.sync_and = b.sync_and && pred != 0;
  b.sync_or = b.sync_or || pred != 0;
  f->wait = Wait::Sync;
  f->site = site;
  if (b.sync_arrived == b.live) {
    f->st = St::Blocked;  // so that release_sync hands it the result like the others
    release_sync(b);
    f->st = St::Ready;
    f->wait = Wait::None;
    return static_cast<int>(f->result);
  }
  b.warps[f->ctx.warp].at_sync |= bit;
  block_here(f);
  f->wait = Wait::None;
  return static_cast<int>(f->result);
}

void* static_shared_alloc(const void* key, size_t bytes, size_t align, const char* what) {
  current("__shared__ memory");
  Block& b = *g_blk;
  for (const auto& e : b.shared)
    if (e.first == key) return e.second;
  b.static_bytes += bytes;
  if (b.static_bytes > kDefaultSmem)
    kernel_fault("static __shared__ memory of " + std::to_string(b.static_bytes) +
                 " bytes exceeds 48 KB (ptxas rejects such a kernel); declared in " + what);
  if (b.static_bytes + b.dyn_bytes > kMaxSmemOptin)
    kernel_fault("too many resources requested for launch: " + std::to_string(b.static_bytes) + " bytes static + " +
                 std::to_string(b.dyn_bytes) + " bytes dynamic shared memory exceed 227 KB");
  void* p = nullptr;
  if (posix_memalign(&p, std::max<size_t>(align, 16), bytes ? bytes : 1) != 0) throw_error("cuda_emu: out of memory");
  if (options().nan_fill) std::memset(p, 0xFF, bytes);
  b.shared.emplace_back(key, p);
  return p;
}

void* dynamic_shared(size_t align) {
  current("extern __shared__ memory");
  if (align > 16) kernel_fault("extern __shared__ alignment above 16 bytes is not emulated");
  return g_blk->dyn;
}

}  // namespace cuda_emu

using namespace cuda_emu;

extern "C" void cuda_emu_fiber_main() {
  Fiber* f = g_cur;
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  try {
    g_blk->thread_main(g_blk->arg);
  } catch (const Fault& e) {
    record_error(*g_blk, e.msg, static_cast<int>(f->ctx.linear));
  } catch (const std::exception& e) {
    record_error(*g_blk, std::string("exception thrown in the kernel: ") + e.what(), static_cast<int>(f->ctx.linear));
  } catch (...) {
    record_error(*g_blk, "unknown exception thrown in the kernel", static_cast<int>(f->ctx.linear));
  }
  thread_exit(f);
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_sched_bottom, g_sched_size);
#endif
  void* dead_sp = nullptr;
  cuda_emu_switch(&dead_sp, g_sched_sp);
  __builtin_unreachable();
}
