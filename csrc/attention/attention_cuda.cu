// Registers the CUDA attention kernels (attention_cuda.cuh, launched by
// attention_cuda_launch.h) as the CUDA implementation of llmfast::attention_fwd / _bwd.
#include <torch/library.h>

#include "attention/attention_cuda_launch.h"

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("attention_fwd", &llmfast::attention::attention_fwd_kernels);
  m.impl("attention_bwd", &llmfast::attention::attention_bwd_kernels);
}
