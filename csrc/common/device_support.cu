// Whether this build's CUDA kernels can run on a device: the extension carries code for the
// architectures it was built for (LLMFAST_CUDA_ARCHS: SASS, and PTX where asked), and a GPU of
// another architecture (a T4's sm_75, a Blackwell's sm_100) has no image to run. The auto
// backend asks this once per device and takes the Triton kernels where the answer is no.
#include <cuda_runtime.h>

namespace llmfast {
namespace cuda {
namespace {
// Compiled for exactly the architectures of every other kernel of the extension.
__global__ void probe_kernel() {}
}  // namespace

bool kernels_run_on(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  bool ok = cudaSetDevice(device) == cudaSuccess;
  if (ok) {
    cudaFuncAttributes attributes;
    ok = cudaFuncGetAttributes(&attributes, probe_kernel) == cudaSuccess;
  }
  cudaGetLastError();  // clear the (non-sticky) error that a missing image leaves
  cudaSetDevice(previous);
  return ok;
}

}  // namespace cuda
}  // namespace llmfast
