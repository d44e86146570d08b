// The CUDA attention launchers and kernels (csrc/attention/attention_cuda_launch.h), compiled
// as plain C++ for the SIMT emulator (csrc/common/simt_emulator.h) and run on CPU tensors, so
// that tests/test_cuda_emulation.py can check their logic against the reference without a GPU.
#include <torch/extension.h>

#include "attention/attention_cuda_launch.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_fwd", &llmfast::attention::attention_fwd_kernels);
  m.def("attention_bwd", &llmfast::attention::attention_bwd_kernels);
}
