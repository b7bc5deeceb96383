// Stand-in for ATen/cuda/Exceptions.h (tools/cuda_emu): the cuBLAS and CUDA check macros.
#pragma once

#include <c10/util/Exception.h>
#include <c10/cuda/CUDAException.h>

#include "cublas_v2.h"

#define TORCH_CUDABLAS_CHECK(EXPR)                                                                    \
  do {                                                                                                \
    const cublasStatus_t cuda_emu_status = (EXPR);                                                    \
    TORCH_CHECK(cuda_emu_status == CUBLAS_STATUS_SUCCESS, "CUDA error: ",                             \
                cublasGetStatusString(cuda_emu_status), " when calling `" #EXPR "`");                 \
  } while (0)
#define AT_CUDA_CHECK(EXPR) C10_CUDA_CHECK(EXPR)
