// The CUDA norm and cross-entropy launchers and kernels (csrc/norm/norm_cuda_launch.h,
// csrc/cross_entropy/cross_entropy_cuda_launch.h), compiled as plain C++ for the SIMT emulator
// (csrc/common/simt_emulator.h) and run on CPU tensors, so that tests/test_cuda_emulation_ops.py
// can check their logic against the reference without a GPU. One extension for both: one
// compilation of the torch headers, of which only ATen and the pybind11 bindings of tensors
// (torch/extension.h would take twice as long to compile).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "cross_entropy/cross_entropy_cuda_launch.h"
#include "emulation_tools.h"
#include "norm/norm_cuda_launch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("launches", &llmfast::simt::launches);
  m.def("guarded_copy", &llmfast::simt::guarded_copy);
  m.def("guard_probe", &llmfast::simt::guard_probe);
  m.def("norm_fwd", &llmfast::norm::norm_fwd_kernels);
  m.def("norm_bwd", &llmfast::norm::norm_bwd_kernels);
  m.def("cross_entropy_fwd", &llmfast::cross_entropy::cross_entropy_fwd_kernels);
  m.def("cross_entropy_fwd_inplace", &llmfast::cross_entropy::cross_entropy_fwd_inplace_kernels);
  m.def("cross_entropy_scale_grad_", &llmfast::cross_entropy::cross_entropy_scale_grad_kernels);
}
