// Stand-in for c10/cuda/CUDAGuard.h (tools/cuda_emu): the emulated kernels serve CPU tensors, so a
// guard accepts the CPU device (and a CUDA one) and changes nothing.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <optional>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) : device_(device) {
    TORCH_CHECK(device.is_cpu() || device.is_cuda(), "CUDAGuard (emulated): expected a CPU or CUDA device, got ",
                device.str());
  }
  explicit CUDAGuard(c10::DeviceIndex index) : device_(c10::DeviceType::CPU) { (void)index; }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  c10::Device original_device() const { return device_; }
  c10::Device current_device() const { return device_; }
  void set_device(c10::Device device) { device_ = device; }

 private:
  c10::Device device_;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device> device) {
    if (device.has_value()) guard_.emplace(*device);
  }
  void set_device(c10::Device device) { guard_.emplace(device); }
  void reset() { guard_.reset(); }

 private:
  std::optional<CUDAGuard> guard_;
};

}  // namespace cuda
}  // namespace c10

namespace at {
namespace cuda {
using c10::cuda::CUDAGuard;
using c10::cuda::OptionalCUDAGuard;
}  // namespace cuda
}  // namespace at
