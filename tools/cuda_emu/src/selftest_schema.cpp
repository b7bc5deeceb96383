// Schemas of the emulator's self-test ops (kernels in tests/selftest/selftest.cu). They are served
// only while cuda_emu.enable() is in force, like every emulated op.
#include <torch/library.h>

int64_t cuda_emu_selftest_gemm_status(c10::string_view which);

TORCH_LIBRARY(cuda_emu_selftest, m) {
  m.def("run(str case, Tensor x) -> Tensor");
  m.def("gemm(Tensor a, Tensor b, bool ta, bool tb, Tensor c, bool accumulate) -> Tensor");
  m.def("gemm_status(str case) -> int", &cuda_emu_selftest_gemm_status);
}
