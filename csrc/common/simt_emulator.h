// A CPU emulator of CUDA thread blocks, so that the logic of a CUDA kernel (indexing, warp
// fragments, shuffles, barriers, masking) can be tested on a machine without a GPU.
//
// Used only when a kernel header is compiled as plain C++ with LLMFAST_SIMT_EMULATION defined
// (tests/emulation/): device_compat.cuh then maps the CUDA keywords and intrinsics the kernels
// use onto the functions below. Every thread of a block is a fiber (ucontext) on one OS thread;
// a cooperative scheduler runs them round-robin, so a run is deterministic. Blocks run one after
// another. What is emulated:
//   threadIdx / blockIdx / blockDim / gridDim     globals the scheduler sets on every switch
//   __syncthreads, __syncwarp                     barriers (a barrier some threads never reach
//                                                 is reported as a deadlock, as it would hang)
//   __shfl_sync / __shfl_xor_sync                 warp exchange through a per-warp buffer
//   warp-level mma.m16n8k16 (f16 / bf16 -> f32)   computed from every lane's fragment registers
//                                                 with PTX's documented fragment layout
//   dynamic shared memory                         one buffer per block, filled with 0xFF bytes
//                                                 (NaN) first so unwritten reads show
// Not emulated: timing, memory ordering between blocks, asynchronous copies (done at once).
#pragma once
#ifndef LLMFAST_SIMT_EMULATION
#error "simt_emulator.h is for LLMFAST_SIMT_EMULATION builds only"
#endif

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

// The built-in variables of a kernel (globals here: one OS thread runs every fiber).
inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace llmfast {
namespace simt {

constexpr int kWarpSize = 32;
constexpr int kExchangeSlots = 8;  // 32-bit words each lane can publish to its warp at once
constexpr size_t kStackBytes = 512 * 1024;

struct Runtime {
  int nthreads = 0;
  int current = 0;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  ucontext_t scheduler;
  uint64_t progress = 0;  // bumped by every barrier arrival and finished thread
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_generation;
  std::vector<uint32_t> exchange;  // [warp][lane][slot]
  std::vector<unsigned char> shared;
  std::function<void()> body;
};

inline Runtime*& runtime() {
  static Runtime* rt = nullptr;
  return rt;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "llmfast simt emulator: %s\n", what);
  std::abort();
}

inline int thread_rank() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
inline int lane() { return thread_rank() % kWarpSize; }
inline int warp() { return thread_rank() / kWarpSize; }

inline void yield() {
  Runtime& rt = *runtime();
  swapcontext(&rt.ctx[rt.current], &rt.scheduler);
}

inline void block_barrier() {
  Runtime& rt = *runtime();
  const uint64_t gen = rt.block_generation;
  ++rt.progress;
  if (++rt.block_arrived == rt.nthreads) {
    rt.block_arrived = 0;
    ++rt.block_generation;
    return;
  }
  while (rt.block_generation == gen) yield();
}

inline int warp_threads(int w) {
  const int n = runtime()->nthreads - w * kWarpSize;
  return n < kWarpSize ? n : kWarpSize;
}

inline void warp_barrier() {
  Runtime& rt = *runtime();
  const int w = warp();
  const uint64_t gen = rt.warp_generation[w];
  ++rt.progress;
  if (++rt.warp_arrived[w] == warp_threads(w)) {
    rt.warp_arrived[w] = 0;
    ++rt.warp_generation[w];
    return;
  }
  while (rt.warp_generation[w] == gen) yield();
}

inline uint32_t* exchange_slot(int w, int l, int slot) {
  return &runtime()->exchange[(static_cast<size_t>(w) * kWarpSize + l) * kExchangeSlots + slot];
}

// Every lane publishes `v` and receives the value of lane `src`.
template <typename V>
V shuffle(V v, int src) {
  static_assert(sizeof(V) <= 4 * kExchangeSlots, "shuffle of a value over 32 bytes");
  const int w = warp(), l = lane();
  if (src < 0 || src >= warp_threads(w)) fail("shuffle from a lane outside the warp");
  std::memcpy(exchange_slot(w, l, 0), &v, sizeof(V));
  warp_barrier();
  V out;
  std::memcpy(&out, exchange_slot(w, src, 0), sizeof(V));
  warp_barrier();
  return out;
}

template <typename T>
inline float half_to_float(uint16_t bits) {
  T h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
}

// D = A B + C for one warp, A 16x16 (row), B 16x8 (col), f16 or bf16 in, f32 accumulate, with
// the fragment layout of PTX's mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// (each 32-bit register holds the lower-indexed element in its low half).
template <typename T>
void mma_m16n8k16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  const int w = warp(), l = lane();
  if (warp_threads(w) != kWarpSize) fail("mma in a partial warp");
  for (int i = 0; i < 4; ++i) *exchange_slot(w, l, i) = a[i];
  for (int i = 0; i < 2; ++i) *exchange_slot(w, l, 4 + i) = b[i];
  warp_barrier();
  auto element = [&](int src, int slot, int high) {
    const uint32_t word = *exchange_slot(w, src, slot);
    return half_to_float<T>(static_cast<uint16_t>(high ? word >> 16 : word & 0xFFFFu));
  };
  auto A = [&](int row, int col) {
    return element((row % 8) * 4 + (col % 8) / 2, (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0),
                   col % 2);
  };
  auto B = [&](int k, int n) { return element(n * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k % 2); };
  const int g = l / 4, t = l % 4;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  warp_barrier();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

inline void fiber_entry() {
  Runtime& rt = *runtime();
  const int me = rt.current;
  rt.body();
  rt.done[me] = 1;
  ++rt.progress;
  // returning resumes uc_link, the scheduler
}

// Runs `body` (the kernel call) once per thread of every block of the grid.
inline void launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) fail("block size must be in 1..1024");
  Runtime rt;
  rt.nthreads = n;
  rt.body = body;
  const int warps = (n + kWarpSize - 1) / kWarpSize;
  rt.warp_arrived.assign(warps, 0);
  rt.warp_generation.assign(warps, 0);
  rt.exchange.assign(static_cast<size_t>(warps) * kWarpSize * kExchangeSlots, 0u);
  rt.ctx.resize(n);
  rt.stacks.resize(n);
  for (auto& s : rt.stacks) s.resize(kStackBytes);
  Runtime* saved = runtime();
  runtime() = &rt;
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        rt.shared.assign(shared_bytes, 0xFF);
        rt.done.assign(n, 0);
        rt.block_arrived = 0;
        for (int i = 0; i < n; ++i) {
          getcontext(&rt.ctx[i]);
          rt.ctx[i].uc_stack.ss_sp = rt.stacks[i].data();
          rt.ctx[i].uc_stack.ss_size = rt.stacks[i].size();
          rt.ctx[i].uc_link = &rt.scheduler;
          makecontext(&rt.ctx[i], fiber_entry, 0);
        }
        int alive = n, idle_rounds = 0;
        while (alive > 0) {
          const uint64_t before = rt.progress;
          for (int i = 0; i < n; ++i) {
            if (rt.done[i]) continue;
            rt.current = i;
            threadIdx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
            swapcontext(&rt.scheduler, &rt.ctx[i]);
            if (rt.done[i]) --alive;
          }
          if (rt.progress == before && alive > 0 && ++idle_rounds > 1) {
            runtime() = saved;
            throw std::runtime_error(
                "llmfast simt emulator: deadlock: " + std::to_string(alive) +
                " threads wait at a barrier that the others never reach (block " +
                std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + ")");
          }
          if (rt.progress != before) idle_rounds = 0;
        }
      }
    }
  }
  runtime() = saved;
}

inline unsigned char* dynamic_shared_memory() { return runtime()->shared.data(); }

}  // namespace simt
}  // namespace llmfast

// The CUDA names the kernels use.
#undef __global__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
inline void __syncthreads() { llmfast::simt::block_barrier(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { llmfast::simt::warp_barrier(); }
template <typename V>
V __shfl_sync(unsigned, V v, int src, int width = 32) {
  const int l = llmfast::simt::lane();
  return llmfast::simt::shuffle(v, (l & ~(width - 1)) + (src & (width - 1)));
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int mask, int width = 32) {
  (void)width;
  return llmfast::simt::shuffle(v, llmfast::simt::lane() ^ mask);
}
