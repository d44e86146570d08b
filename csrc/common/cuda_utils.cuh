// Small device helpers shared by the CUDA kernels: integer helpers, 16-byte register packs of
// float32 / float16 / bfloat16 elements, and a launcher that adds a thread-block cluster only
// when one is asked for.
#pragma once
#include <cstdint>
#include <utility>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace llmfast {
namespace cuda {

template <typename I>
__host__ __device__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

template <typename I>
__host__ __device__ constexpr I round_up(I a, I b) {
  return ceil_div(a, b) * b;
}

inline bool is_aligned_16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0;
}

// VEC elements of T held in registers as 16-byte chunks, so that a load or store of the pack is
// one (or, for 8 floats, two) 16-byte memory instruction(s). Element access with a compile-time
// index (unrolled loops) stays in registers. Addresses must be 16-byte aligned.
template <typename T, int VEC>
struct alignas(16) Packed {
  static_assert((VEC * sizeof(T)) % 16 == 0, "a pack is a whole number of 16-byte chunks");
  static constexpr int kChunks = static_cast<int>(VEC * sizeof(T) / 16);
  uint4 chunk[kChunks];

  __device__ __forceinline__ float get(int i) const {
    return static_cast<float>(reinterpret_cast<const T*>(chunk)[i]);
  }
  __device__ __forceinline__ void set(int i, float v) {
    reinterpret_cast<T*>(chunk)[i] = static_cast<T>(v);
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) chunk[c] = make_uint4(0u, 0u, 0u, 0u);
  }
  // XORs every word with `zero`, a value that is 0 at run time but unknown to the compiler
  // (a kernel argument). Values derived from the pack before the call, such as its elements
  // widened to fp32, then cannot be reused after it: each pass over the row re-widens the packed
  // words instead of keeping the widened copy alive across, say, a row reduction. For 16-bit
  // types that halves the registers holding the row. Costs one LOP3 per word.
  __device__ __forceinline__ void launder(unsigned zero) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      chunk[c].x ^= zero;
      chunk[c].y ^= zero;
      chunk[c].z ^= zero;
      chunk[c].w ^= zero;
    }
  }
  // Plain global load (data read once).
  __device__ __forceinline__ void load(const T* p) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) chunk[c] = reinterpret_cast<const uint4*>(p)[c];
  }
  // Read-only-cache load (parameters that every row reads again).
  __device__ __forceinline__ void load_ldg(const T* p) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) chunk[c] = __ldg(reinterpret_cast<const uint4*>(p) + c);
  }
  // Read-only-cache load / plain store that the compiler keeps in program order with the other
  // *_ordered accesses: a loop of "load a parameter pack, compute, store" then holds one pack at
  // a time in registers instead of hoisting every iteration's load to the top.
  __device__ __forceinline__ void load_ldg_ordered(const T* p) {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(chunk[c].x), "=r"(chunk[c].y), "=r"(chunk[c].z), "=r"(chunk[c].w)
                   : "l"(reinterpret_cast<const uint4*>(p) + c));
    }
  }
  __device__ __forceinline__ void store_ordered(T* p) const {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                   :
                   : "l"(reinterpret_cast<uint4*>(p) + c), "r"(chunk[c].x), "r"(chunk[c].y),
                     "r"(chunk[c].z), "r"(chunk[c].w)
                   : "memory");
    }
  }
  __device__ __forceinline__ void store(T* p) const {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(p)[c] = chunk[c];
  }
};

// Launches `kernel(args...)` on `stream`; with cluster > 1 the 1-D grid is split into clusters
// of `cluster` consecutive blocks (Hopper and newer; grid must be a multiple of cluster).
template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), unsigned grid, unsigned block, size_t smem,
                   unsigned cluster, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(block, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
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

}  // namespace cuda
}  // namespace llmfast
