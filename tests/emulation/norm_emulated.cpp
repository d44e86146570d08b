// The CUDA norm launchers and kernels (csrc/norm/norm_cuda_launch.h), compiled as plain C++ for
// the SIMT emulator (csrc/common/simt_emulator.h) and run on CPU tensors, so that
// tests/test_cuda_emulation_ops.py can check their logic against the reference without a GPU.
#include <torch/extension.h>

#include "norm/norm_cuda_launch.h"
#include "launch_log.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launches", &llmfast::simt::launches);
  m.def("norm_fwd", &llmfast::norm::norm_fwd_kernels);
  m.def("norm_bwd", &llmfast::norm::norm_bwd_kernels);
}
