// Small device helpers shared by the CUDA kernels: integer helpers and 16-byte register packs of
// float32 / float16 / bfloat16 elements. Device-agnostic (device_compat.cuh): also compiled for
// the SIMT emulator.
#pragma once
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/device_compat.cuh"

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
    LLMFAST_CHECK_ALIGNED(p, 16, "16-byte load");
#pragma unroll
    for (int c = 0; c < kChunks; ++c) chunk[c] = reinterpret_cast<const uint4*>(p)[c];
  }
  // Read-only-cache load (parameters that every row reads again).
  __device__ __forceinline__ void load_ldg(const T* p) {
    LLMFAST_CHECK_ALIGNED(p, 16, "16-byte load");
#pragma unroll
    for (int c = 0; c < kChunks; ++c) chunk[c] = __ldg(reinterpret_cast<const uint4*>(p) + c);
  }
  // Read-only-cache load / plain store that the compiler keeps in program order with the other
  // *_ordered accesses: a loop of "load a parameter pack, compute, store" then holds one pack at
  // a time in registers instead of hoisting every iteration's load to the top.
  // (The emulator has no compiler reordering to prevent: plain accesses there.)
  __device__ __forceinline__ void load_ldg_ordered(const T* p) {
#ifdef LLMFAST_SIMT_EMULATION
    load(p);
#else
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(chunk[c].x), "=r"(chunk[c].y), "=r"(chunk[c].z), "=r"(chunk[c].w)
                   : "l"(reinterpret_cast<const uint4*>(p) + c));
    }
#endif
  }
  __device__ __forceinline__ void store_ordered(T* p) const {
#ifdef LLMFAST_SIMT_EMULATION
    store(p);
#else
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                   :
                   : "l"(reinterpret_cast<uint4*>(p) + c), "r"(chunk[c].x), "r"(chunk[c].y),
                     "r"(chunk[c].z), "r"(chunk[c].w)
                   : "memory");
    }
#endif
  }
  __device__ __forceinline__ void store(T* p) const {
    LLMFAST_CHECK_ALIGNED(p, 16, "16-byte store");
#pragma unroll
    for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(p)[c] = chunk[c];
  }
};

}  // namespace cuda
}  // namespace llmfast
