// The CUDA runtime calls of the stand-in headers: error state, memset/memcpy on host memory, the
// emulated device's properties (an H100) and the per-kernel dynamic shared memory opt-in.
#include <c10/util/Exception.h>

#include <cstring>
#include <unordered_map>

#include "ATen/cuda/CUDAContext.h"
#include "cuda_runtime.h"
#include "internal.h"

namespace cuda_emu {

namespace {
cudaError_t g_error = cudaSuccess;
std::string g_error_detail;
std::unordered_map<const void*, size_t> g_smem_optin;
}  // namespace

Options& options() {
  static Options o;
  return o;
}

Stats& stats() {
  static Stats s;
  return s;
}

const char* order_name(Order o) {
  switch (o) {
    case Order::Forward: return "forward";
    case Order::Reverse: return "reverse";
    case Order::Random: return "random";
  }
  return "?";
}

void throw_error(const std::string& msg) { TORCH_CHECK(false, msg); }

const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}

void set_error(cudaError_t e, const std::string& detail) {
  if (g_error != cudaSuccess) return;  // the first unchecked error is the one that explains the rest
  g_error = e;
  g_error_detail = detail;
}

cudaError_t take_last_error() {
  const cudaError_t e = g_error;
  g_error = cudaSuccess;
  return e;
}

cudaError_t peek_last_error() { return g_error; }

void reset_error_state() {
  g_error = cudaSuccess;
  g_error_detail.clear();
}

bool error_pending(std::string* detail) {
  if (g_error == cudaSuccess) return false;
  if (detail) *detail = std::string(error_string(g_error)) + ": " + g_error_detail;
  return true;
}

void check_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  if (e == cudaSuccess) return;
  std::string detail = g_error_detail;
  g_error_detail.clear();
  const char* slash = std::strrchr(file, '/');
  TORCH_CHECK(false, "CUDA error: ", error_string(e), " (emulated; ", detail.empty() ? "no detail" : detail,
              ") when calling `", expr, "` at ", slash ? slash + 1 : file, ":", line);
}

cudaError_t set_max_dynamic_smem(const void* fn, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kMaxSmemOptin) {
    set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " + std::to_string(bytes) +
                                         ") is outside [0, 227 KB]");
    return cudaErrorInvalidValue;
  }
  g_smem_optin[fn] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

size_t max_dynamic_smem(const void* fn) {
  const auto it = g_smem_optin.find(fn);
  return it == g_smem_optin.end() ? kDefaultSmem : std::max(it->second, kDefaultSmem);
}

}  // namespace cuda_emu

using cuda_emu::set_error;

cudaError_t cudaGetLastError() { return cuda_emu::take_last_error(); }
cudaError_t cudaPeekAtLastError() { return cuda_emu::peek_last_error(); }
const char* cudaGetErrorString(cudaError_t error) { return cuda_emu::error_string(error); }
const char* cudaGetErrorName(cudaError_t error) { return cuda_emu::error_name(error); }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *prop = *at::cuda::getCurrentDeviceProperties();
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  const cudaDeviceProp& p = *at::cuda::getCurrentDeviceProperties();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
    case cudaDevAttrMaxGridDimY: *value = p.maxGridSize[1]; break;
    case cudaDevAttrMaxGridDimZ: *value = p.maxGridSize[2]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(p.sharedMemPerBlock); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(p.sharedMemPerBlockOptin); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  if (count == 0) return cudaSuccess;
  if (ptr == nullptr) {
    set_error(cudaErrorInvalidValue, "cudaMemsetAsync on a null pointer");
    return cudaErrorInvalidValue;
  }
  std::memset(ptr, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* ptr, int value, size_t count) { return cudaMemsetAsync(ptr, value, count, nullptr); }

cudaError_t cudaMemset2DAsync(void* ptr, size_t pitch, int value, size_t width, size_t height, cudaStream_t) {
  if (width == 0 || height == 0) return cudaSuccess;
  if (ptr == nullptr || pitch < width) {
    set_error(cudaErrorInvalidValue, "cudaMemset2DAsync with pitch " + std::to_string(pitch) + " < width " +
                                         std::to_string(width) + " or a null pointer");
    return cudaErrorInvalidValue;
  }
  for (size_t r = 0; r < height; ++r) std::memset(static_cast<char*>(ptr) + r * pitch, value, width);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind, cudaStream_t) {
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) {
    set_error(cudaErrorInvalidValue, "cudaMemcpyAsync with a null pointer");
    return cudaErrorInvalidValue;
  }
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, count, kind, nullptr);
}

namespace at {
namespace cuda {

cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp prop = [] {
    cudaDeviceProp p{};
    std::strncpy(p.name, "NVIDIA H100 80GB HBM3 (cuda_emu)", sizeof p.name - 1);
    p.sharedMemPerBlock = cuda_emu::kDefaultSmem;
    p.sharedMemPerBlockOptin = cuda_emu::kMaxSmemOptin;
    p.warpSize = 32;
    p.maxThreadsPerBlock = 1024;
    p.maxThreadsDim[0] = 1024;
    p.maxThreadsDim[1] = 1024;
    p.maxThreadsDim[2] = 64;
    p.maxGridSize[0] = 2147483647;
    p.maxGridSize[1] = 65535;
    p.maxGridSize[2] = 65535;
    p.multiProcessorCount = 132;
    p.maxThreadsPerMultiProcessor = 2048;
    p.major = 9;
    p.minor = 0;
    return p;
  }();
  return &prop;
}

cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device) {
  TORCH_CHECK(device <= 0, "cuda_emu: one emulated device, got device index ", static_cast<int>(device));
  return getCurrentDeviceProperties();
}

}  // namespace cuda
}  // namespace at
