// Stand-in for c10/cuda/CUDAException.h (tools/cuda_emu): the error-check macros over the emulated
// runtime's error state.
#pragma once

#include <c10/util/Exception.h>

#include "cuda_runtime.h"

#define C10_CUDA_CHECK(EXPR) ::cuda_emu::check_cuda((EXPR), #EXPR, __FILE__, __LINE__)
#define C10_CUDA_CHECK_WARN(EXPR)                                                      \
  do {                                                                                 \
    const cudaError_t cuda_emu_err = (EXPR);                                           \
    if (cuda_emu_err != cudaSuccess) TORCH_WARN("CUDA warning: ", cudaGetErrorString(cuda_emu_err)); \
  } while (0)
#define C10_CUDA_ERROR_HANDLED(EXPR) EXPR
#define C10_CUDA_IGNORE_ERROR(EXPR) \
  do {                              \
    (void)(EXPR);                   \
    (void)cudaGetLastError();       \
  } while (0)
#define C10_CUDA_CLEAR_ERROR() (void)cudaGetLastError()
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
