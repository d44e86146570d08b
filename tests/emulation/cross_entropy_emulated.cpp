// The CUDA cross-entropy launchers and kernels (csrc/cross_entropy/cross_entropy_cuda_launch.h),
// compiled as plain C++ for the SIMT emulator (csrc/common/simt_emulator.h) and run on CPU
// tensors, so that tests/test_cuda_emulation_ops.py can check their logic against the reference
// without a GPU.
#include <torch/extension.h>

#include "cross_entropy/cross_entropy_cuda_launch.h"
#include "launch_log.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launches", &llmfast::simt::launches);
  m.def("cross_entropy_fwd", &llmfast::cross_entropy::cross_entropy_fwd_kernels);
  m.def("cross_entropy_fwd_inplace", &llmfast::cross_entropy::cross_entropy_fwd_inplace_kernels);
  m.def("cross_entropy_scale_grad_", &llmfast::cross_entropy::cross_entropy_scale_grad_kernels);
}
