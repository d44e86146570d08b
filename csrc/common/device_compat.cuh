// The few device facilities the warp-level (mma) kernels use, written once for both builds:
//   nvcc (the extension):           CUDA itself
//   C++ with LLMFAST_SIMT_EMULATION: simt_emulator.h, which runs the same kernels on the CPU
//                                    for tests/emulation/ (no GPU needed to test their logic)
// Kernels written against this header use: LLMFAST_DEVICE for device functions, the dynamic
// shared-memory macro, LLMFAST_LAUNCH to launch, __syncthreads / __shfl_*_sync, and the mma
// helpers in mma.cuh.
#pragma once

#ifdef LLMFAST_SIMT_EMULATION
#include "common/simt_emulator.h"

#define LLMFAST_DEVICE inline
#define LLMFAST_HOST_DEVICE inline
// unsigned char* NAME: the block's dynamic shared memory, 16-byte aligned.
#define LLMFAST_DYNAMIC_SHARED(NAME) unsigned char* NAME = ::llmfast::simt::dynamic_shared_memory()
#define LLMFAST_LAUNCH(KERNEL, GRID, BLOCK, SHARED_BYTES, ...) \
  ::llmfast::simt::launch(GRID, BLOCK, SHARED_BYTES, [&] { KERNEL(__VA_ARGS__); })

namespace llmfast {
namespace device {
// No-ops without a GPU.
template <typename Kernel>
inline void allow_shared_bytes(Kernel, int) {}
inline void check_launch() {}
}  // namespace device
}  // namespace llmfast

#else  // nvcc
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#define LLMFAST_DEVICE __device__ __forceinline__
#define LLMFAST_HOST_DEVICE __host__ __device__ __forceinline__
#define LLMFAST_DYNAMIC_SHARED(NAME) extern __shared__ __align__(16) unsigned char NAME[]
#define LLMFAST_LAUNCH(KERNEL, GRID, BLOCK, SHARED_BYTES, ...) \
  KERNEL<<<GRID, BLOCK, SHARED_BYTES, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__)

namespace llmfast {
namespace device {
// Lets `kernel` use more than the default 48 KB of dynamic shared memory.
template <typename Kernel>
inline void allow_shared_bytes(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}
inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
}  // namespace device
}  // namespace llmfast
#endif
