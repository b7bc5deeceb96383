// Stand-in for c10/cuda/CUDAStream.h (tools/cuda_emu): one stream object per device index; work is
// done when it is issued, so every stream is always synchronised.
#pragma once

#include <c10/core/Device.h>

#include "cuda_runtime.h"

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  explicit CUDAStream(c10::DeviceIndex index = 0) : index_(index) {}
  cudaStream_t stream() const { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(0x5700 + index_)); }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return index_; }
  c10::Device device() const { return c10::Device(c10::DeviceType::CPU); }
  bool query() const { return true; }
  void synchronize() const {}
  int64_t id() const { return 0; }

 private:
  c10::DeviceIndex index_;
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex index = -1) { return CUDAStream(index < 0 ? 0 : index); }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex index = -1) { return CUDAStream(index < 0 ? 0 : index); }

}  // namespace cuda
}  // namespace c10

namespace at {
namespace cuda {
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
}  // namespace cuda
}  // namespace at
