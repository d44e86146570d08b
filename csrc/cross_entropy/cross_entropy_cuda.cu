// Registers the CUDA cross-entropy kernels (cross_entropy_cuda.cuh, launched by
// cross_entropy_cuda_launch.h) as the CUDA implementation of the llmfast::cross_entropy_* ops.
#include <torch/library.h>

#include "cross_entropy/cross_entropy_cuda_launch.h"

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &llmfast::cross_entropy::cross_entropy_fwd_kernels);
  m.impl("cross_entropy_fwd_inplace", &llmfast::cross_entropy::cross_entropy_fwd_inplace_kernels);
  m.impl("cross_entropy_scale_grad_", &llmfast::cross_entropy::cross_entropy_scale_grad_kernels);
}
