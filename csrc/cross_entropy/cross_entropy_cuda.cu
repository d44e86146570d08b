// CUDA kernels of llmfast::cross_entropy_fwd / cross_entropy_fwd_inplace /
// cross_entropy_scale_grad_ (contract in cross_entropy_ops.cpp, math in
// llmfast/reference/cross_entropy.py).
//
// Algorithm. A row of V logits is cut into 16-byte "slots" (VEC = 16 / sizeof(T) elements)
// counted from the 16-byte boundary at or below the row's first element, so every load is one
// aligned 16-byte vector even when V * sizeof(T) is not a multiple of 16 (V = 50257); elements
// of a slot that lie outside the row are masked (a slot never crosses a 16-byte boundary, so it
// stays inside the allocation). Each thread keeps the state (max m, sum exp(x - m), and for
// label smoothing sum w (m - x) and sum w) of its elements; states merge pairwise with the
// online-softmax rule through warp shuffles, shared memory and -- when a row is split over a
// thread-block cluster (Hopper) -- distributed shared memory, merged in rank order so that every
// block of the row ends with bit-identical row statistics. Then each thread writes the gradient
// of its elements. All arithmetic is fp32; the loss uses (m - x[t]) + log S and the gradient
// exp(x - m) / S (never x - lse), so logits of magnitude 1e4 keep their digits.
//
// Kernels and memory traffic (T = element size):
//   ce_row_kernel       register-resident rows. The slots of a row are spread over a cluster of
//                       C blocks x `threads` threads, kSlots 16-byte vectors per thread (8 for
//                       16-bit logits, 4 for fp32: 32 / 16 registers), all loaded before the
//                       first use and kept in registers in the logits dtype until the gradient
//                       is written: reads the row once, writes the gradient once (2*M*V*T bytes
//                       fwd+bwd, the floor). 512-thread blocks are preferred (two per SM at 64
//                       registers a thread, so one row's loads overlap another's reductions),
//                       1024 when 8 x 512 is too small. Capacity: one block on any GPU (64K
//                       bf16 / 16K fp32 elements), clusters of up to 8 blocks on sm_90+ (512K
//                       bf16 / 128K fp32 elements). Examples (bf16): V=32000 -> 1 x 512 threads,
//                       50304 -> 2 x 416, 128256 -> 4 x 512, 256000 -> 8 x 512; fp32 128256 ->
//                       8 x 1024.
//   ce_looped_kernel    anything longer (or sm_80 rows past one block): one 1024-thread block
//                       per row, an online pass over the row and a gradient pass that reads it
//                       again (mostly from L2): 3*M*V*T bytes. Correct for any V.
//   ce_prepare_kernel   'mean' only: one block sums w[t] over the rows with a valid target
//                       (reads the M targets) and stores 1 / that sum, the gradient factor.
//   ce_reduce_kernel    'mean'/'sum': one block sums the per-row losses in a fixed order
//                       (deterministic) and divides by the target-weight sum for 'mean'.
//   ce_scale_grad_kernel  backward: rows whose upstream factor is exactly 1 return at once;
//                       others are read and written once.
// Ignored rows (target == ignore_index, and targets outside [0, V), which are never used as an
// index: the documented GPU behaviour) are not read; their gradient is written as zeros. Row
// offsets are 64-bit (M * V may exceed 2^31); V itself must be below 2^31 - 16.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace llmfast {
namespace {

namespace cg = cooperative_groups;

constexpr const char* kFwd = "llmfast::cross_entropy_fwd";
constexpr const char* kFwdInplace = "llmfast::cross_entropy_fwd_inplace";
constexpr const char* kScale = "llmfast::cross_entropy_scale_grad_";

constexpr int kRowThreads = 512;         // block size ce_row_kernel aims for
constexpr int kMaxThreads = 1024;        // largest block
constexpr int kMaxCluster = 8;           // portable cluster size limit
constexpr int kLoopedThreads = 1024;
constexpr int kReduceThreads = 1024;
constexpr int kScaleThreads = 256;
constexpr int kScaleElemsPerThread = 8;

template <typename T>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(T));
}

// 16-byte vectors per thread in ce_row_kernel: 8 for 16-bit logits (64 elements, 32 registers),
// 4 for fp32 (16 elements, 16 registers), so that a 512-thread block fits 2 per SM (64
// registers a thread) without spills.
constexpr int slots_for(int elt_size) {
  return elt_size == 4 ? 4 : 8;
}

template <typename T>
constexpr int slots_of() {
  return slots_for(static_cast<int>(sizeof(T)));
}

// ---------------------------------------------------------------------------------------------
// Row statistics and their merge.
// ---------------------------------------------------------------------------------------------
// m: max of the elements seen; s: sum exp(x - m); with label smoothing also
// sw: sum w_c (m - x_c) and w: sum w_c (w_c = 1 without class weights). Empty: {-inf, 0, 0, 0}.
struct RowState {
  float m, s, sw, w;
};

__device__ __forceinline__ RowState empty_state() {
  return {-INFINITY, 0.0f, 0.0f, 0.0f};
}

template <bool kSmooth>
__device__ __forceinline__ RowState merge(const RowState& a, const RowState& b) {
  RowState r;
  r.m = fmaxf(a.m, b.m);
  const float ea = a.m == -INFINITY ? 0.0f : __expf(a.m - r.m);
  const float eb = b.m == -INFINITY ? 0.0f : __expf(b.m - r.m);
  r.s = a.s * ea + b.s * eb;
  if constexpr (kSmooth) {
    // sum w (M - x) = sum w (m_a - x) + (M - m_a) sum w, every term >= 0: no cancellation.
    r.sw = a.sw + b.sw;
    if (a.w != 0.0f) r.sw += (r.m - a.m) * a.w;
    if (b.w != 0.0f) r.sw += (r.m - b.m) * b.w;
    r.w = a.w + b.w;
  } else {
    r.sw = 0.0f;
    r.w = 0.0f;
  }
  return r;
}

template <bool kSmooth>
__device__ __forceinline__ RowState warp_merge(RowState st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    RowState o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    if constexpr (kSmooth) {
      o.sw = __shfl_xor_sync(0xffffffffu, st.sw, off);
      o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
    }
    st = merge<kSmooth>(st, o);
  }
  return st;
}

// Merges the states of the block's threads into *out (shared memory), visible to the whole
// block on return. warp_states: shared scratch of 32 states.
template <bool kSmooth>
__device__ __forceinline__ void block_merge(RowState st, RowState* warp_states, RowState* out) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  st = warp_merge<kSmooth>(st);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    RowState w = lane < n_warps ? warp_states[lane] : empty_state();
    w = warp_merge<kSmooth>(w);
    if (lane == 0) *out = w;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Per-row parameters and the element math.
// ---------------------------------------------------------------------------------------------
struct CeArgs {
  const void* logits;   // (M, V) row-major
  const int64_t* target;  // (M,)
  const float* w;       // (V,) fp32 class weights, or null
  const float* grad_scale;  // device scalar (1 / sum w[t] for 'mean'), or null for 1
  void* grad;           // (M, V) gradient (may equal logits), or null
  float* loss;          // (M,) per-row loss
  float* lse;           // (M,)
  int64_t M;
  int V;
  int64_t ignore_index;
  float smoothing;
  float z_loss;
  float cap;            // 0 = no softcap
};

// Element k of a 16-byte vector, and its update. Written with selects and shifts on the four
// 32-bit words rather than a cast pointer, so that with k known at compile time (unrolled loops)
// the vector stays in registers (indexing a register array through a pointer demotes it to local
// memory).
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void set_word(uint4& v, int i, uint32_t w) {
  if (i == 0) v.x = w;
  else if (i == 1) v.y = w;
  else if (i == 2) v.z = w;
  else v.w = w;
}

template <typename T>
__device__ __forceinline__ float elem(const uint4& v, int k) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(word_of(v, k));
  } else {
    const uint32_t w = word_of(v, k >> 1);
    const unsigned short bits = static_cast<unsigned short>((k & 1) ? (w >> 16) : (w & 0xffffu));
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return __uint_as_float(static_cast<uint32_t>(bits) << 16);
    } else {
      return __half2float(__ushort_as_half(bits));
    }
  }
}

template <typename T>
__device__ __forceinline__ void set_elem(uint4& v, int k, float x) {
  if constexpr (sizeof(T) == 4) {
    set_word(v, k, __float_as_uint(x));
  } else {
    uint32_t bits;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      bits = __bfloat16_as_ushort(__float2bfloat16_rn(x));
    } else {
      bits = __half_as_ushort(__float2half_rn(x));
    }
    const uint32_t w = word_of(v, k >> 1);
    set_word(v, k >> 1, (k & 1) ? ((w & 0xffffu) | (bits << 16)) : ((w & 0xffff0000u) | bits));
  }
}

// cap * tanh(z / cap) as cap - 2 cap / (1 + e^{2z/cap}): one exp and one fast division, exact
// to ~1e-7 * cap, and -cap / cap at -inf / +inf. A compile-time switch: a per-element runtime
// branch, or tanhf's long inline expansion, makes the register-resident kernel spill.
template <bool kCap>
__device__ __forceinline__ float softcapped(float z, float cap, float inv_cap) {
  if constexpr (kCap) {
    return cap - __fdividef(2.0f * cap, 1.0f + __expf(2.0f * z * inv_cap));
  } else {
    return z;
  }
}

// Loss and gradient coefficients of a row from its merged statistics.
struct RowCoef {
  float m, inv_s, coef_p, coef_t, coef_w;
};

__device__ __forceinline__ RowCoef row_coefficients(const CeArgs& a, const RowState& st, float w_t,
                                                    float x_t, int64_t row, bool write_loss) {
  const float log_s = __logf(st.s);
  const float lse = st.m + log_s;
  const float eps_c = a.smoothing / static_cast<float>(a.V);
  if (write_loss) {
    float loss = w_t * ((st.m - x_t) + log_s);
    if (a.smoothing > 0.0f) {
      loss = (1.0f - a.smoothing) * loss + eps_c * (st.sw + st.w * log_s);
    }
    if (a.z_loss != 0.0f) loss += a.z_loss * w_t * lse * lse;
    a.loss[row] = loss;
    a.lse[row] = lse;
  }
  RowCoef c;
  const float scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  float coef = w_t * (1.0f - a.smoothing);
  if (a.smoothing > 0.0f) coef += eps_c * st.w;
  if (a.z_loss != 0.0f) coef += 2.0f * a.z_loss * w_t * lse;
  c.m = st.m;
  c.inv_s = 1.0f / st.s;
  c.coef_p = scale * coef * c.inv_s;
  c.coef_t = scale * w_t * (1.0f - a.smoothing);
  c.coef_w = scale * eps_c;
  return c;
}

// d loss / d z_j of element j (row index) whose raw logit is z.
template <bool kCap>
__device__ __forceinline__ float grad_of(const CeArgs& a, const RowCoef& c, float z, float inv_cap,
                                         int j, int64_t t) {
  const float x = softcapped<kCap>(z, a.cap, inv_cap);
  float g = __expf(x - c.m) * c.coef_p;
  if (a.smoothing > 0.0f) g -= c.coef_w * (a.w != nullptr ? __ldg(a.w + j) : 1.0f);
  if (j == t) g -= c.coef_t;
  if constexpr (kCap) {
    const float th = x * inv_cap;
    g *= 1.0f - th * th;
  }
  return g;
}

// Adds element x (row index j) to a thread state whose max is already m (first pass: max).
template <bool kSmooth>
__device__ __forceinline__ void accumulate(const CeArgs& a, RowState& st, float x, int j) {
  if (x != -INFINITY) st.s += __expf(x - st.m);
  if constexpr (kSmooth) {
    const float wj = a.w != nullptr ? __ldg(a.w + j) : 1.0f;
    if (x != -INFINITY) {
      st.sw += wj * (st.m - x);
    } else if (wj != 0.0f) {
      st.sw = INFINITY;  // as torch: a -inf logit makes the smoothing term infinite
    }
    st.w += wj;
  }
}

// Row geometry in 16-byte slots: the row's first element sits `head` elements past a 16-byte
// boundary; slot s covers row elements [s * VEC - head, s * VEC - head + VEC).
template <typename T>
struct RowSlots {
  const T* base;   // 16-byte aligned address of slot 0 of the logits row
  T* gbase;        // same for the gradient row (same misalignment, checked on the host)
  int head;
  int n_slots;
};

template <typename T>
__device__ __forceinline__ RowSlots<T> row_slots(const CeArgs& a, int64_t row) {
  constexpr int VEC = vec_of<T>();
  const T* p = static_cast<const T*>(a.logits) + row * static_cast<int64_t>(a.V);
  RowSlots<T> r;
  r.head = static_cast<int>((reinterpret_cast<uintptr_t>(p) & 15) / sizeof(T));
  r.base = p - r.head;
  r.gbase = a.grad != nullptr ? static_cast<T*>(a.grad) + row * static_cast<int64_t>(a.V) - r.head
                              : nullptr;
  r.n_slots = (r.head + a.V + VEC - 1) / VEC;
  return r;
}

// Stores slot `s` of the gradient row from the vector `out`: one 16-byte store for a full slot,
// element stores at the two ends of the row (neighbouring rows own the rest of those slots).
template <typename T>
__device__ __forceinline__ void store_slot(const RowSlots<T>& r, int V, int s, const uint4& out) {
  constexpr int VEC = vec_of<T>();
  const int j0 = s * VEC - r.head;
  T* dst = r.gbase + static_cast<int64_t>(s) * VEC;
  if (j0 >= 0 && j0 + VEC <= V) {
    *reinterpret_cast<uint4*>(dst) = out;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = j0 + k;
      if (j >= 0 && j < V) dst[k] = static_cast<T>(elem<T>(out, k));
    }
  }
}

// The gradient of the VEC elements of slot `s` (raw logits `v`), packed like `v`. Elements
// outside the row get some finite value that store_slot never writes.
template <typename T, bool kCap>
__device__ __forceinline__ uint4 grad_slot(const CeArgs& a, const RowCoef& c, const RowSlots<T>& r, int s,
                                           const uint4& v, float inv_cap, int64_t t) {
  constexpr int VEC = vec_of<T>();
  const int j0 = s * VEC - r.head;
  uint4 out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int j = min(max(j0 + k, 0), a.V - 1);  // in range for the weight load
    set_elem<T>(out, k, grad_of<kCap>(a, c, elem<T>(v, k), inv_cap, j, t));
  }
  return out;
}

// Makes v opaque to the compiler (no instruction is emitted), so that values derived from it in
// one pass over the registers (its elements widened to fp32, soft-capped) are recomputed in the
// next pass instead of being kept alive across it: 64 widened floats next to the 32 registers of
// packed bf16 would spill.
__device__ __forceinline__ void launder(uint4& v) {
  asm volatile("" : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w));
}

__device__ __forceinline__ bool target_valid(const CeArgs& a, int64_t t) {
  return t != a.ignore_index && t >= 0 && t < a.V;
}

// Cluster barrier halves (sm_90): arrive after the last read of another block's shared memory,
// wait before exiting, so no block leaves while a peer may still read its state.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Register-resident rows: one row per cluster of `cluster` blocks (1-D grid of M * cluster
// blocks; cluster == 1 needs no cluster launch). Block `rank` of the row owns the slots
// rank * blockDim * kSlots + i * blockDim + threadIdx.x, i < kSlots (coalesced 16-byte loads).
// Traffic: reads each non-ignored row once, writes its gradient once.
// ---------------------------------------------------------------------------------------------
template <typename T, bool kCluster, bool kSmooth, bool kCap>
__global__ void __launch_bounds__(kMaxThreads) ce_row_kernel(CeArgs a, int cluster) {
  constexpr int VEC = vec_of<T>();
  constexpr int kSlots = slots_of<T>();
  __shared__ RowState warp_states[32];
  __shared__ RowState block_state;
  __shared__ RowState row_state;
  __shared__ float x_target;

  int rank = 0;
  int64_t row = blockIdx.x;
  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    rank = static_cast<int>(cg::this_cluster().block_rank());
    row = blockIdx.x / cluster;
#else
    __trap();
#endif
  }
  const int64_t t = a.target[row];
  const bool valid = target_valid(a, t);
  const RowSlots<T> r = row_slots<T>(a, row);
  const int slot0 = rank * blockDim.x * kSlots + threadIdx.x;

  if (!valid) {
    // Same branch in every block of the cluster (one target per row): no cluster barrier.
    if (rank == 0 && threadIdx.x == 0) {
      a.loss[row] = 0.0f;
      a.lse[row] = 0.0f;
    }
    if (r.gbase != nullptr) {
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        const int s = slot0 + i * blockDim.x;
        if (s < r.n_slots) store_slot<T>(r, a.V, s, make_uint4(0u, 0u, 0u, 0u));
      }
    }
    return;
  }

  const float inv_cap = a.cap > 0.0f ? 1.0f / a.cap : 0.0f;
  if (rank == 0 && threadIdx.x == 0) {
    x_target = softcapped<kCap>(static_cast<float>(static_cast<const T*>(a.logits)[row * a.V + t]), a.cap,
                          inv_cap);
  }

  // All loads first: kSlots independent 16-byte loads in flight per thread.
  uint4 data[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int s = slot0 + i * blockDim.x;
    if (s < r.n_slots) {
      data[i] = *reinterpret_cast<const uint4*>(r.base + static_cast<int64_t>(s) * VEC);
    } else {
      data[i] = make_uint4(0u, 0u, 0u, 0u);
    }
  }

  // This thread's statistics: max, then the sums relative to it.
  RowState st = empty_state();
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int j0 = (slot0 + i * static_cast<int>(blockDim.x)) * VEC - r.head;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = j0 + k;
      if (j >= 0 && j < a.V) st.m = fmaxf(st.m, softcapped<kCap>(elem<T>(data[i], k), a.cap, inv_cap));
    }
  }
#pragma unroll
  for (int i = 0; i < kSlots; ++i) launder(data[i]);
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int j0 = (slot0 + i * static_cast<int>(blockDim.x)) * VEC - r.head;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = j0 + k;
      if (j >= 0 && j < a.V) {
        accumulate<kSmooth>(a, st, softcapped<kCap>(elem<T>(data[i], k), a.cap, inv_cap), j);
      }
    }
  }
  block_merge<kSmooth>(st, warp_states, &block_state);

  if constexpr (kCluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cl = cg::this_cluster();
    cl.sync();  // every block's block_state is written
    if (threadIdx.x == 0) {
      RowState acc = empty_state();
      for (int q = 0; q < cluster; ++q) acc = merge<kSmooth>(acc, *cl.map_shared_rank(&block_state, q));
      row_state = acc;
    }
#endif
    cluster_arrive();
    __syncthreads();
  } else {
    if (threadIdx.x == 0) row_state = block_state;
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kSlots; ++i) launder(data[i]);
  const RowState rs = row_state;
  const float w_t = a.w != nullptr ? __ldg(a.w + t) : 1.0f;
  const RowCoef c = row_coefficients(a, rs, w_t, x_target, row, rank == 0 && threadIdx.x == 0);

  if (r.gbase != nullptr) {
#pragma unroll
    for (int i = 0; i < kSlots; ++i) {
      const int s = slot0 + i * blockDim.x;
      if (s < r.n_slots) store_slot<T>(r, a.V, s, grad_slot<T, kCap>(a, c, r, s, data[i], inv_cap, t));
    }
  }
  if constexpr (kCluster) cluster_wait();
}

// ---------------------------------------------------------------------------------------------
// Any row length: one block per row, an online pass and a gradient pass (which re-reads the
// row, mostly from L2). Traffic: reads each non-ignored row twice, writes its gradient once.
// ---------------------------------------------------------------------------------------------
template <typename T, bool kSmooth, bool kCap>
__global__ void __launch_bounds__(kLoopedThreads) ce_looped_kernel(CeArgs a) {
  constexpr int VEC = vec_of<T>();
  __shared__ RowState warp_states[32];
  __shared__ RowState row_state;
  const int64_t row = blockIdx.x;
  const int64_t t = a.target[row];
  const RowSlots<T> r = row_slots<T>(a, row);

  if (!target_valid(a, t)) {
    if (threadIdx.x == 0) {
      a.loss[row] = 0.0f;
      a.lse[row] = 0.0f;
    }
    if (r.gbase != nullptr) {
      for (int s = threadIdx.x; s < r.n_slots; s += blockDim.x) {
        store_slot<T>(r, a.V, s, make_uint4(0u, 0u, 0u, 0u));
      }
    }
    return;
  }

  const float inv_cap = a.cap > 0.0f ? 1.0f / a.cap : 0.0f;
  RowState st = empty_state();
  for (int s = threadIdx.x; s < r.n_slots; s += blockDim.x) {
    const uint4 v = *reinterpret_cast<const uint4*>(r.base + static_cast<int64_t>(s) * VEC);
    const int j0 = s * VEC - r.head;
    // The slot's own state, merged into the thread's (one rescale per slot, not per element).
    RowState sv = empty_state();
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = j0 + k;
      if (j >= 0 && j < a.V) sv.m = fmaxf(sv.m, softcapped<kCap>(elem<T>(v, k), a.cap, inv_cap));
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = j0 + k;
      if (j >= 0 && j < a.V) accumulate<kSmooth>(a, sv, softcapped<kCap>(elem<T>(v, k), a.cap, inv_cap), j);
    }
    st = merge<kSmooth>(st, sv);
  }
  block_merge<kSmooth>(st, warp_states, &row_state);

  const float w_t = a.w != nullptr ? __ldg(a.w + t) : 1.0f;
  const float x_t = softcapped<kCap>(static_cast<float>(static_cast<const T*>(a.logits)[row * a.V + t]), a.cap,
                               inv_cap);
  const RowCoef c = row_coefficients(a, row_state, w_t, x_t, row, threadIdx.x == 0);
  if (r.gbase != nullptr) {
    // In place (grad == logits) is safe: each element is read by the thread that overwrites it.
    for (int s = threadIdx.x; s < r.n_slots; s += blockDim.x) {
      const uint4 v = *reinterpret_cast<const uint4*>(r.base + static_cast<int64_t>(s) * VEC);
      store_slot<T>(r, a.V, s, grad_slot<T, kCap>(a, c, r, s, v, inv_cap, t));
    }
  }
}

// 'mean' denominator: scalars[0] = sum over valid rows of w[t], scalars[1] = 1 / scalars[0].
// One block. Traffic: reads the M targets.
__global__ void __launch_bounds__(kReduceThreads) ce_prepare_kernel(const int64_t* target, const float* w,
                                                                    int64_t M, int V, int64_t ignore_index,
                                                                    float* scalars) {
  __shared__ double partial[kReduceThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const int64_t t = target[i];
    if (t != ignore_index && t >= 0 && t < V) acc += w != nullptr ? static_cast<double>(w[t]) : 1.0;
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    scalars[0] = static_cast<float>(partial[0]);
    scalars[1] = static_cast<float>(1.0 / partial[0]);  // inf when all ignored; unused then
  }
}

// out = sum(loss_rows) (/ total_weight for 'mean'), in a fixed order. One block.
__global__ void __launch_bounds__(kReduceThreads) ce_reduce_kernel(const float* loss_rows, int64_t M,
                                                                   const float* total_weight, float* out) {
  __shared__ double partial[kReduceThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) acc += loss_rows[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double total = partial[0];
    if (total_weight != nullptr) total /= static_cast<double>(*total_weight);  // 0/0 = NaN
    *out = static_cast<float>(total);
  }
}

// grad[row, cols of this block] *= factor (go[0] or go[row]); nothing when factor == 1.
// Grid (M, column blocks). Traffic: reads and writes the scaled rows once.
template <typename T>
__global__ void __launch_bounds__(kScaleThreads) ce_scale_grad_kernel(T* grad, const float* go, int V,
                                                                      bool per_row) {
  const int64_t row = blockIdx.x;
  const float f = go[per_row ? row : 0];
  if (f == 1.0f) return;
  T* g = grad + row * static_cast<int64_t>(V);
  const int begin = blockIdx.y * kScaleThreads * kScaleElemsPerThread;
  const int end = min(V, begin + kScaleThreads * kScaleElemsPerThread);
  for (int j = begin + threadIdx.x; j < end; j += kScaleThreads) {
    g[j] = static_cast<T>(static_cast<float>(g[j]) * f);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};

// float32 / float16 / bfloat16 only (check_floating has rejected the rest): no float64 kernels.
template <typename F>
void dispatch_logits_type(at::ScalarType st, F f) {
  switch (st) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<at::Half>{});
      break;
    case at::kBFloat16:
      f(TypeTag<at::BFloat16>{});
      break;
    default:
      TORCH_CHECK(false, "llmfast cross_entropy: unsupported dtype ", st);
  }
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  LLMFAST_CHECK(t.device().is_cuda(), op, name, " must be a CUDA tensor, got ", t.device());
}

struct LaunchPlan {
  bool looped;
  int threads;
  int cluster;
};

// Smallest cluster (then block) holding the row's slots in registers; looped otherwise.
LaunchPlan plan_for(int64_t V, int elt_size, bool clusters_ok) {
  const int64_t vec = 16 / elt_size;
  const int64_t kSlots = slots_for(elt_size);
  const int64_t n_slots = (V + 2 * vec - 2) / vec;  // worst-case head of vec - 1 elements
  const int64_t threads_needed = (n_slots + kSlots - 1) / kSlots;
  auto round32 = [](int64_t n) { return static_cast<int>((n + 31) / 32 * 32); };
  if (threads_needed <= kRowThreads) return {false, round32(threads_needed), 1};
  if (clusters_ok) {
    for (int threads : {kRowThreads, kMaxThreads}) {
      for (int c = 2; c <= kMaxCluster; c *= 2) {
        if (threads_needed <= static_cast<int64_t>(c) * threads) {
          return {false, round32((threads_needed + c - 1) / c), c};
        }
      }
    }
  } else if (threads_needed <= kMaxThreads) {
    return {false, round32(threads_needed), 1};
  }
  return {true, kLoopedThreads, 1};
}

struct Prepared {
  at::Tensor w;        // (V,) fp32 or undefined
  at::Tensor scalars;  // (2,) fp32 for 'mean': total weight, 1 / total weight
};

Prepared prepare(const char* op, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                 double label_smoothing, double z_loss, std::optional<double> softcap) {
  check_cuda(logits, op, "logits");
  LLMFAST_CHECK(logits.dim() == 2, op, "logits must be 2-D (M, V), got shape ", logits.sizes());
  check_floating(logits, op, "logits");
  check_contiguous(logits, op, "logits");
  const int64_t M = logits.size(0);
  const int64_t V = logits.size(1);
  LLMFAST_CHECK(V >= 1, op, "logits must have at least one class (V >= 1), got V = ", V);
  LLMFAST_CHECK(V < std::numeric_limits<int>::max() - 16, op, "logits rows must be shorter than 2^31 - 16, got V = ", V);
  check_same_device(target, logits, op, "target");
  LLMFAST_CHECK(target.scalar_type() == at::kLong, op, "target must be int64, got ", target.scalar_type());
  LLMFAST_CHECK(target.dim() == 1 && target.size(0) == M, op, "target must have shape (", M, ",), got ",
                target.sizes());
  check_contiguous(target, op, "target");
  LLMFAST_CHECK(reduction >= 0 && reduction <= 2, op, "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                reduction);
  LLMFAST_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, "label_smoothing must be in [0, 1], got ",
                label_smoothing);
  LLMFAST_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, op, "z_loss must be a finite number >= 0, got ", z_loss);
  LLMFAST_CHECK(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0.0), op,
                "softcap must be None or a finite number > 0, got ", softcap.value_or(0.0));
  Prepared p;
  if (weight.has_value()) {
    check_same_device(*weight, logits, op, "weight");
    LLMFAST_CHECK(weight->dim() == 1 && weight->size(0) == V, op, "weight must have shape (", V, ",), got ",
                  weight->sizes());
    LLMFAST_CHECK(at::isFloatingType(weight->scalar_type()), op, "weight must be a floating-point tensor, got ",
                  weight->scalar_type());
    p.w = weight->to(at::kFloat).contiguous();
  }
  if (reduction == 1) {
    p.scalars = at::empty({2}, logits.options().dtype(at::kFloat));
    ce_prepare_kernel<<<1, kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        target.const_data_ptr<int64_t>(), p.w.defined() ? p.w.const_data_ptr<float>() : nullptr, M,
        static_cast<int>(V), ignore_index, p.scalars.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return p;
}

// Calls f(std::bool_constant<b>{}) for a runtime bool b.
template <typename F>
void bool_switch(bool b, F f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T>
void launch_fwd(const CeArgs& a, const LaunchPlan& plan, bool smooth, bool cap, cudaStream_t stream) {
  bool_switch(smooth, [&](auto smooth_c) {
    bool_switch(cap, [&](auto cap_c) {
      constexpr bool kSmooth = decltype(smooth_c)::value;
      constexpr bool kCap = decltype(cap_c)::value;
      if (plan.looped) {
        ce_looped_kernel<T, kSmooth, kCap><<<a.M, plan.threads, 0, stream>>>(a);
      } else if (plan.cluster > 1) {
        cuda::launch_kernel(ce_row_kernel<T, true, kSmooth, kCap>, static_cast<unsigned>(a.M * plan.cluster),
                      plan.threads, 0, plan.cluster, stream, a, plan.cluster);
      } else {
        cuda::launch_kernel(ce_row_kernel<T, false, kSmooth, kCap>, static_cast<unsigned>(a.M), plan.threads, 0, 1,
                      stream, a, 1);
      }
    });
  });
}

// Runs the row kernel (gradient into `grad` when defined) and reduces; returns (loss, lse).
std::tuple<at::Tensor, at::Tensor> run_fwd(const at::Tensor& logits, const at::Tensor& target, const Prepared& p,
                                           const at::Tensor& grad, int64_t reduction, int64_t ignore_index,
                                           double label_smoothing, double z_loss, std::optional<double> softcap) {
  const int64_t M = logits.size(0);
  const int64_t V = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::empty({M}, f32);
  at::Tensor lse = at::empty({M}, f32);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (M > 0) {
    CeArgs a;
    a.logits = logits.const_data_ptr();
    a.target = target.const_data_ptr<int64_t>();
    a.w = p.w.defined() ? p.w.const_data_ptr<float>() : nullptr;
    a.grad_scale = p.scalars.defined() ? p.scalars.const_data_ptr<float>() + 1 : nullptr;
    a.grad = grad.defined() ? grad.data_ptr() : nullptr;
    a.loss = loss_rows.mutable_data_ptr<float>();
    a.lse = lse.mutable_data_ptr<float>();
    a.M = M;
    a.V = static_cast<int>(V);
    a.ignore_index = ignore_index;
    a.smoothing = static_cast<float>(label_smoothing);
    a.z_loss = static_cast<float>(z_loss);
    a.cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
    const bool clusters_ok = at::cuda::getCurrentDeviceProperties()->major >= 9;
    const LaunchPlan plan = plan_for(V, static_cast<int>(logits.element_size()), clusters_ok);
    const bool smooth = label_smoothing > 0.0;
    dispatch_logits_type(logits.scalar_type(), [&](auto tag) {
      launch_fwd<typename decltype(tag)::type>(a, plan, smooth, softcap.has_value(), stream);
    });
  }
  if (reduction == 0) return {loss_rows, lse};
  at::Tensor loss = at::empty({}, f32);
  ce_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(
      loss_rows.const_data_ptr<float>(), M, reduction == 1 ? p.scalars.const_data_ptr<float>() : nullptr,
      loss.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

// The kernels address the gradient row through the logits row's 16-byte misalignment, so the
// two buffers must share it; a logits view at an odd offset is copied once (rare).
at::Tensor aligned_like(const at::Tensor& logits, const at::Tensor& grad) {
  const auto a = reinterpret_cast<uintptr_t>(logits.const_data_ptr()) & 15;
  const auto b = reinterpret_cast<uintptr_t>(grad.const_data_ptr()) & 15;
  return a == b ? logits : logits.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(kFwd, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                             softcap);
  at::Tensor grad = compute_grad ? at::empty(logits.sizes(), logits.options()) : at::Tensor();
  const at::Tensor x = compute_grad ? aligned_like(logits, grad) : logits;
  auto [loss, lse] = run_fwd(x, target, p, grad, reduction, ignore_index, label_smoothing, z_loss, softcap);
  return {loss, lse, compute_grad ? grad : at::empty({0}, logits.options())};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cuda(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(kFwdInplace, logits, target, weight, reduction, ignore_index, label_smoothing,
                             z_loss, softcap);
  return run_fwd(logits, target, p, logits, reduction, ignore_index, label_smoothing, z_loss, softcap);
}

void cross_entropy_scale_grad_cuda(at::Tensor& grad_logits, const at::Tensor& grad_output) {
  check_cuda(grad_logits, kScale, "grad_logits");
  LLMFAST_CHECK(grad_logits.dim() == 2, kScale, "grad_logits must be 2-D (M, V), got shape ", grad_logits.sizes());
  check_floating(grad_logits, kScale, "grad_logits");
  check_contiguous(grad_logits, kScale, "grad_logits");
  const int64_t M = grad_logits.size(0);
  const int64_t V = grad_logits.size(1);
  check_same_device(grad_output, grad_logits, kScale, "grad_output");
  LLMFAST_CHECK(grad_output.scalar_type() == at::kFloat, kScale, "grad_output must be float32, got ",
                grad_output.scalar_type());
  LLMFAST_CHECK(grad_output.numel() == 1 || grad_output.numel() == M, kScale, "grad_output must have 1 or ", M,
                " elements, got ", grad_output.numel());
  check_contiguous(grad_output, kScale, "grad_output");
  if (M == 0 || V == 0) return;
  const c10::cuda::CUDAGuard guard(grad_logits.device());
  constexpr int64_t kCols = kScaleThreads * kScaleElemsPerThread;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>((V + kCols - 1) / kCols));
  const bool per_row = grad_output.numel() == M && M != 1;
  dispatch_logits_type(grad_logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    ce_scale_grad_kernel<T><<<grid, kScaleThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_logits.mutable_data_ptr<T>(), grad_output.const_data_ptr<float>(), static_cast<int>(V), per_row);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(llmfast, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_cuda);
  m.impl("cross_entropy_scale_grad_", &cross_entropy_scale_grad_cuda);
}

}  // namespace llmfast
