// The few device facilities the CUDA kernels use, written once for both builds:
//   nvcc (the extension):           CUDA itself
//   C++ with LLMFAST_SIMT_EMULATION: simt_emulator.h, which runs the same kernels on the CPU
//                                    for tests/emulation/ (no GPU needed to test their logic)
// Kernels written against this header use: LLMFAST_DEVICE for device functions (or
// __device__, which the emulator defines away), LLMFAST_SHARED for static shared variables, the
// dynamic shared-memory macro, __syncthreads / __shfl_*_sync / __ldg, the cluster functions
// below, the mma helpers in mma.cuh, and LLMFAST_LAUNCH or device::launch to launch. Their
// launchers query the device (clusters, SM count, occupancy) through device:: only, so that the
// emulated build can pretend to be either kind of GPU (see "emulated device" below).
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#ifdef LLMFAST_SIMT_EMULATION
#include <cstdlib>
#include <string>

#include <c10/core/Device.h>

#include "common/simt_emulator.h"

#define LLMFAST_DEVICE inline
#define LLMFAST_HOST_DEVICE inline
#define LLMFAST_DEVICE_NOINLINE
#define LLMFAST_GRID_CONSTANT
// unsigned char* NAME: the block's dynamic shared memory, 16-byte aligned.
#define LLMFAST_DYNAMIC_SHARED(NAME) unsigned char* NAME = ::llmfast::simt::dynamic_shared_memory()
// A static shared variable NAME of type TYPE (arrays too: LLMFAST_SHARED(float[32][33], tile)),
// one per block: a reference to the running block's instance, found by its declaration site (a
// function-local static, distinct per template instantiation). A TYPE with a comma needs an
// alias.
#define LLMFAST_SHARED(TYPE, NAME)                                                            \
  static const char NAME##_shared_site = 0;                                                   \
  ::llmfast::device::Type<TYPE>& NAME = *static_cast<::llmfast::device::Type<TYPE>*>(         \
      ::llmfast::simt::static_shared(&NAME##_shared_site, sizeof(::llmfast::device::Type<TYPE>)))
#define LLMFAST_LAUNCH(KERNEL, GRID, BLOCK, SHARED_BYTES, ...)                                    \
  ::llmfast::simt::launch(::llmfast::simt::kernel_id(KERNEL), GRID, BLOCK, SHARED_BYTES, \
                          [&] { KERNEL(__VA_ARGS__); })
// States that PTR is BYTES-aligned, as the access that follows needs on a GPU: checked by the
// emulator (a kernel error if not), nothing on the GPU.
#define LLMFAST_CHECK_ALIGNED(PTR, BYTES, WHAT) ::llmfast::simt::check_aligned(PTR, BYTES, WHAT)

#else  // nvcc
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <map>
#include <mutex>
#include <tuple>

#define LLMFAST_DEVICE __device__ __forceinline__
#define LLMFAST_HOST_DEVICE __host__ __device__ __forceinline__
// A device function kept out of line: rare paths called from heavily unrolled loops.
#define LLMFAST_DEVICE_NOINLINE __device__ __noinline__
// A kernel parameter whose address may be taken (passed by reference) without a local copy.
#define LLMFAST_GRID_CONSTANT __grid_constant__
#define LLMFAST_DYNAMIC_SHARED(NAME) extern __shared__ __align__(16) unsigned char NAME[]
#define LLMFAST_SHARED(TYPE, NAME) __shared__ ::llmfast::device::Type<TYPE> NAME
#define LLMFAST_LAUNCH(KERNEL, GRID, BLOCK, SHARED_BYTES, ...) \
  KERNEL<<<GRID, BLOCK, SHARED_BYTES, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__)
#define LLMFAST_CHECK_ALIGNED(PTR, BYTES, WHAT) ((void)0)
#endif

namespace llmfast {
namespace device {

// T itself: lets a macro argument that is an array type (float[32][33]) declare a variable.
template <typename T>
using Type = T;

// ----------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90+). Kernels call these only when launched with clusters of more
// than one block; built for an older architecture they trap. In the emulator every launch is a
// cluster (of one block for a plain launch).
// ----------------------------------------------------------------------------------------------
#ifdef LLMFAST_SIMT_EMULATION
inline int cluster_rank() { return simt::cluster_rank(); }
inline void cluster_sync() { simt::cluster_sync(); }
// barrier.cluster.arrive.release / wait.acquire: a thread that has arrived may go on (without
// touching another block's shared memory) until it waits.
inline void cluster_arrive() { simt::cluster_arrive(); }
inline void cluster_wait() { simt::cluster_wait(); }
// p's address in the shared memory of block `rank` of the cluster (distributed shared memory).
template <typename T>
T* map_shared_rank(T* p, int rank) {
  return simt::map_shared_rank(p, rank);
}
#else
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LLMFAST_CLUSTER_ONLY(...) __VA_ARGS__
#else
#define LLMFAST_CLUSTER_ONLY(...) __trap()
#endif
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  __trap();
  return 0;
#endif
}
__device__ __forceinline__ void cluster_sync() {
  LLMFAST_CLUSTER_ONLY(cooperative_groups::this_cluster().sync());
}
__device__ __forceinline__ void cluster_arrive() {
  LLMFAST_CLUSTER_ONLY(asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory"));
}
__device__ __forceinline__ void cluster_wait() {
  LLMFAST_CLUSTER_ONLY(asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"));
}
template <typename T>
__device__ __forceinline__ T* map_shared_rank(T* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  __trap();
  return p;
#endif
}
#undef LLMFAST_CLUSTER_ONLY
#endif

// ----------------------------------------------------------------------------------------------
// Host side: the current device, launches.
// ----------------------------------------------------------------------------------------------
#ifdef LLMFAST_SIMT_EMULATION
// The tensors the launchers take.
constexpr c10::DeviceType kTensorDevice = c10::DeviceType::CPU;

// The emulated device, read from the environment at every launch so that tests can switch it:
//   LLMFAST_EMULATED_SM        compute capability as major * 10 + minor (default 90: clusters)
//   LLMFAST_EMULATED_SM_COUNT  multiprocessors (default 1: persistent grids stay small, so
//                              their blocks loop over several row groups)
inline bool clusters_supported() { return simt::emulated_sm() >= 90; }
inline int sm_count() { return std::max(1, simt::emulated_setting("LLMFAST_EMULATED_SM_COUNT", 1)); }
// How many clusters of `cluster` blocks fit on the device at once: 2 blocks per SM.
template <typename Kernel>
int64_t resident_clusters(Kernel, int /*block*/, size_t /*smem*/, int cluster) {
  return std::max<int64_t>(1, 2 * static_cast<int64_t>(sm_count()) / cluster);
}

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

template <typename Kernel>
inline void allow_shared_bytes(Kernel kernel, int bytes) {
  if (static_cast<size_t>(bytes) > simt::kDefaultDynamicSharedBytes) {
    simt::allow_shared_bytes(simt::kernel_id(kernel), static_cast<size_t>(bytes));
  }
}
inline void check_launch() {}

// Launches kernel(args...) on a 1-D grid; with cluster > 1 the grid is split into clusters of
// `cluster` consecutive blocks (grid a multiple of cluster).
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), unsigned grid, unsigned block, size_t smem,
            unsigned cluster, Args&&... args) {
  simt::launch(simt::kernel_id(kernel), dim3(grid), dim3(block), smem, cluster, [&] { kernel(args...); });
}

#else  // nvcc
constexpr c10::DeviceType kTensorDevice = c10::DeviceType::CUDA;

inline bool clusters_supported() { return at::cuda::getCurrentDeviceProperties()->major >= 9; }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// How many clusters of `cluster` blocks of `kernel` fit on the device at once (the size of a
// persistent grid). Cached per (device, kernel, shape): the occupancy queries cost microseconds.
template <typename Kernel>
int64_t resident_clusters(Kernel kernel, int block, size_t smem, int cluster) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t, int>, int64_t> cache;
  const int dev = c10::cuda::current_device();
  const auto key = std::make_tuple(dev, reinterpret_cast<const void*>(kernel), block, smem, cluster);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  const int n_sm = sm_count();
  int64_t resident = 0;
  if (cluster == 1) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, smem));
    resident = static_cast<int64_t>(per_sm) * n_sm;
  } else {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(cluster * n_sm), 1, 1);
    cfg.blockDim = dim3(static_cast<unsigned>(block), 1, 1);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    resident = clusters;
  }
  // Never zero: a grid too large to be resident at once is still correct, only not persistent.
  resident = std::max<int64_t>(resident, std::max(1, n_sm / cluster));
  const std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, resident);
  return resident;
}

using DeviceGuard = c10::cuda::CUDAGuard;

// Lets `kernel` use more than the default 48 KB of dynamic shared memory.
template <typename Kernel>
inline void allow_shared_bytes(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}
inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

// Launches kernel(args...) on the current stream, on a 1-D grid; with cluster > 1 the grid is
// split into clusters of `cluster` consecutive blocks (sm_90+; grid a multiple of cluster).
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), unsigned grid, unsigned block, size_t smem,
            unsigned cluster, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(block, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace device
}  // namespace llmfast
