// Registration and control of the emulation tier.
//
// The rewritten TORCH_LIBRARY_IMPL(ns, CUDA, m) blocks only record themselves here. The op
// cuda_emu::enable registers every recorded block under the CPU dispatch key of its namespace (or of a
// namespace given instead), so CPU tensors are served by the real CUDA launchers and kernels:
// the project's op tests run unchanged against them. cuda_emu::disable destroys those registrations,
// which restores the CPU twins (the dispatcher keeps them underneath), so one process can compare the
// two. Why the CPU key of the real namespace rather than a namespace of its own: the op schemas, the
// Python wrappers, the autograd and fake kernels and every test then apply to the emulated code as they
// are, with nothing kept in sync by hand; enable(namespace=...) remains for side-by-side use.
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <memory>
#include <sstream>
#include <vector>

// cuda_emu/prelude.h is force-included (-include) like in every unit of the library
#include "internal.h"

namespace cuda_emu {

namespace {

struct Recorded {
  std::string ns, key;
  void (*fn)(LibraryProxy&);
  const char* file;
  int line;
};

std::vector<Recorded>& recorded() {
  static std::vector<Recorded> r;
  return r;
}

std::vector<std::unique_ptr<torch::Library>>& active() {
  static std::vector<std::unique_ptr<torch::Library>> a;
  return a;
}

std::string g_active_ns;

// Allocations made while an emulated op runs start as 0xFF bytes (NaN in every float format), so an
// output element no kernel wrote shows up in the tests.
class NanFillAllocator final : public c10::Allocator {
 public:
  explicit NanFillAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base_->allocate(n);
    if (n > 0 && p.get() != nullptr) std::memset(p.get(), 0xFF, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { base_->copy_data(dest, src, count); }
  c10::Allocator* base() const { return base_; }

 private:
  c10::Allocator* base_;
};

std::recursive_mutex g_op_mutex;  // the fibers and the error state are global: one emulated op at a time
int g_depth = 0;
c10::Allocator* g_saved_allocator = nullptr;

// One instance for the life of the process: a tensor's storage keeps a pointer to the allocator that
// made it (for resizing), so it must never dangle.
NanFillAllocator* nan_allocator() {
  static NanFillAllocator* a = new NanFillAllocator(c10::GetDefaultCPUAllocator());
  return a;
}

// Drops the dispatcher's "Overriding a previously registered kernel" warning, which enable() causes by
// design; every other warning goes to the handler that was in place.
class QuietOverride final : public c10::WarningHandler {
 public:
  explicit QuietOverride(c10::WarningHandler* prev) : prev_(prev) {}
  void process(const c10::Warning& w) override {
    if (w.msg().find("Overriding a previously registered kernel") != std::string::npos) return;
    if (w.msg().find("registered kernel") != std::string::npos && w.msg().find("CPU") != std::string::npos) return;
    prev_->process(w);
  }

 private:
  c10::WarningHandler* prev_;
};

void do_disable() {
  c10::WarningHandler* prev = c10::WarningUtils::get_warning_handler();
  QuietOverride quiet(prev);
  c10::WarningUtils::WarningHandlerGuard guard(&quiet);
  active().clear();
  g_active_ns.clear();
}

Order parse_order(c10::string_view s) {
  if (s == "forward") return Order::Forward;
  if (s == "reverse") return Order::Reverse;
  if (s == "random") return Order::Random;
  TORCH_CHECK(false, "cuda_emu.enable: argument 'order' must be 'forward', 'reverse' or 'random', got '",
              std::string(s), "'");
}

void enable(c10::string_view ns, c10::string_view order, int64_t seed, bool nan_fill, int64_t stack_kb) {
  TORCH_CHECK(stack_kb >= 16 && stack_kb <= 65536, "cuda_emu.enable: argument 'stack_kb' must be in [16, 65536], got ",
              stack_kb);
  options().order = parse_order(order);
  options().seed = static_cast<uint64_t>(seed);
  options().nan_fill = nan_fill;
  options().stack_bytes = static_cast<size_t>(stack_kb) * 1024;
  const std::string target(ns);
  if (!active().empty() && g_active_ns == target) return;  // options updated, registrations kept
  do_disable();
  c10::WarningHandler* prev = c10::WarningUtils::get_warning_handler();
  QuietOverride quiet(prev);
  c10::WarningUtils::WarningHandlerGuard guard(&quiet);
  for (const Recorded& r : recorded()) {
    const std::string lib_ns = target.empty() ? r.ns : target;
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, lib_ns, c10::DispatchKey::CPU, r.file,
                                                static_cast<uint32_t>(r.line));
    LibraryProxy proxy(*lib);
    r.fn(proxy);
    active().push_back(std::move(lib));
  }
  g_active_ns = target;
}

void disable() { do_disable(); }

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    o += c;
  }
  return o;
}

std::string stats_json() {
  const Stats& s = stats();
  std::ostringstream o;
  o << "{\"launches\": " << s.launches << ", \"launch_errors\": " << s.launch_errors << ", \"blocks\": " << s.blocks
    << ", \"threads\": " << s.threads << ", \"switches\": " << s.switches << ", \"gemms\": " << s.gemms
    << ", \"order\": \"" << order_name(options().order) << "\", \"seed\": " << options().seed
    << ", \"enabled\": " << (active().empty() ? "false" : "true") << ", \"kernels\": {";
  bool first = true;
  for (const auto& [name, k] : s.kernels) {
    o << (first ? "" : ", ") << "\"" << json_escape(name) << "\": {\"launches\": " << k.launches
      << ", \"blocks\": " << k.blocks << ", \"threads\": " << k.threads << "}";
    first = false;
  }
  o << "}, \"ops\": {";
  first = true;
  for (const auto& [name, n] : s.ops) {
    o << (first ? "" : ", ") << "\"" << json_escape(name) << "\": " << n;
    first = false;
  }
  o << "}, \"registered\": [";
  first = true;
  for (const Recorded& r : recorded()) {
    o << (first ? "" : ", ") << "\"" << json_escape(r.ns) << " @ " << json_escape(r.file) << ":" << r.line << "\"";
    first = false;
  }
  o << "]}";
  return o.str();
}

}  // namespace

LibraryInit::LibraryInit(const char* ns, const char* key, void (*fn)(LibraryProxy&), const char* file, int line) {
  // The rewrite accepts only CUDA blocks; anything else would be a rewrite bug.
  if (std::string(key) != "CUDA") std::abort();
  recorded().push_back(Recorded{ns, key, fn, file, line});
}

LibraryProxy::OpScope::OpScope(const char* op) {
  g_op_mutex.lock();
  if (g_depth++ == 0) {
    reset_error_state();
    if (options().nan_fill) {
      g_saved_allocator = c10::GetCPUAllocator();
      c10::SetCPUAllocator(nan_allocator(), /*priority=*/0);
      if (c10::GetCPUAllocator() != nan_allocator()) g_saved_allocator = nullptr;  // a higher-priority one rules
    }
  }
  ++stats().ops[op];
}

LibraryProxy::OpScope::~OpScope() {
  if (--g_depth == 0 && g_saved_allocator != nullptr) {
    c10::SetCPUAllocator(g_saved_allocator, /*priority=*/0);
    g_saved_allocator = nullptr;
  }
  g_op_mutex.unlock();
}

void LibraryProxy::OpScope::finish() {
  std::string detail;
  if (error_pending(&detail)) {
    reset_error_state();
    TORCH_CHECK(false, "CUDA emulation: a kernel launch failed and nothing checked it (no "
                       "C10_CUDA_KERNEL_LAUNCH_CHECK or cudaGetLastError after it): ", detail);
  }
}

}  // namespace cuda_emu

TORCH_LIBRARY(cuda_emu, m) {
  m.def("enable(str namespace='', str order='forward', int seed=0, bool nan_fill=True, int stack_kb=256) -> ()",
        &cuda_emu::enable);
  m.def("disable() -> ()", &cuda_emu::disable);
  m.def("stats() -> str", &cuda_emu::stats_json);
  m.def("reset_stats() -> ()", [] { cuda_emu::stats() = cuda_emu::Stats(); });
}
