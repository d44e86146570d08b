// Memory operations of the warp-level kernels: asynchronous global -> shared copies (sm_80's
// cp.async), so a kernel can load its next tile while it computes on the current one, and
// atomic accumulation into global memory.
//
//   copy_async_16(dst, src)   starts a 16-byte copy (both addresses 16-byte aligned)
//   async_commit()            closes the group of copies started since the last commit
//   async_wait<N>()           waits until at most N committed groups are still in flight
//   atomic_add(p, v)          *p += v for a float in global memory, atomically
//   atomic_add_pair(p, a, b)  the same for p[0], p[1] (one vector reduction on sm_90)
// A __syncthreads() after the wait makes the copies of every thread visible to the block.
// Under LLMFAST_SIMT_EMULATION a copy lands only at the wait that covers it, its destination
// NaN until then (simt_emulator.h: a missing wait or barrier shows), and an atomic add is a
// plain add (one OS thread runs every emulated thread).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/device_compat.cuh"

namespace llmfast {
namespace device {

LLMFAST_DEVICE void copy_async_16(void* dst_shared, const void* src_global) {
#if defined(LLMFAST_SIMT_EMULATION)
  LLMFAST_CHECK_ALIGNED(dst_shared, 16, "cp.async destination");
  LLMFAST_CHECK_ALIGNED(src_global, 16, "cp.async source");
  simt::async_copy_16(dst_shared, src_global);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(dst_shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src_global) : "memory");
#else
  *static_cast<uint4*>(dst_shared) = *static_cast<const uint4*>(src_global);
#endif
}

LLMFAST_DEVICE void async_commit() {
#if defined(LLMFAST_SIMT_EMULATION)
  simt::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
LLMFAST_DEVICE void async_wait() {
#if defined(LLMFAST_SIMT_EMULATION)
  simt::async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// *p += v, atomically with respect to other threads (the result is not read: one reduction).
LLMFAST_DEVICE void atomic_add(float* p, float v) {
#ifdef LLMFAST_SIMT_EMULATION
  *p += v;
#else
  atomicAdd(p, v);
#endif
}

// p[0] += a, p[1] += b atomically (each element on its own), p 8-byte aligned: one vector
// reduction on sm_90, two elsewhere.
LLMFAST_DEVICE void atomic_add_pair(float* p, float a, float b) {
#if defined(LLMFAST_SIMT_EMULATION)
  LLMFAST_CHECK_ALIGNED(p, 8, "float2 atomic");
  p[0] += a;
  p[1] += b;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

}  // namespace device
}  // namespace llmfast
