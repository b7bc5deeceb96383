// Stand-in for ATen/cuda/CUDAContext.h (tools/cuda_emu): as in ATen, everything lives in CUDAContextLight.h.
#pragma once

#include <ATen/cuda/CUDAContextLight.h>
