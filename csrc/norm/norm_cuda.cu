// Registers the CUDA norm kernels (norm_cuda.cuh, launched by norm_cuda_launch.h) as the CUDA
// implementation of llmfast::norm_fwd / norm_bwd.
#include <torch/library.h>

#include "norm/norm_cuda_launch.h"

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("norm_fwd", &llmfast::norm::norm_fwd_kernels);
  m.impl("norm_bwd", &llmfast::norm::norm_bwd_kernels);
}
