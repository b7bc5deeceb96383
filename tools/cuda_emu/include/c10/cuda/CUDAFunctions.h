// Stand-in for c10/cuda/CUDAFunctions.h (tools/cuda_emu): one emulated device.
#pragma once

#include <c10/core/Device.h>

#include "cuda_runtime.h"

namespace c10 {
namespace cuda {
inline c10::DeviceIndex device_count() noexcept { return 1; }
inline c10::DeviceIndex current_device() { return 0; }
inline void set_device(c10::DeviceIndex) {}
inline void device_synchronize() {}
}  // namespace cuda
}  // namespace c10
