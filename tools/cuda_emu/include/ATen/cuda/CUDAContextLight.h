// Stand-in for ATen/cuda/CUDAContextLight.h (tools/cuda_emu): the current stream, the cuBLAS handle and the
// properties of the emulated device (an H100: sm_90, 132 SMs, 227 KB opt-in shared memory per block).
#pragma once

#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "cublas_v2.h"
#include "cuda_runtime.h"

namespace at {
namespace cuda {
cublasHandle_t getCurrentCUDABlasHandle();
cudaDeviceProp* getCurrentDeviceProperties();
cudaDeviceProp* getDeviceProperties(c10::DeviceIndex device);
inline int warp_size() { return 32; }
inline bool is_available() { return true; }
inline int64_t getNumGPUs() { return 1; }
}  // namespace cuda
}  // namespace at
