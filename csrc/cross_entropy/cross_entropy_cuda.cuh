// The CUDA kernels of llmfast::cross_entropy_fwd / cross_entropy_fwd_inplace /
// cross_entropy_scale_grad_ (launched by cross_entropy_cuda_launch.h; contract in cross_entropy_ops.cpp, math in
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
//   ce_scale_grad_kernel  backward: rows whose upstream factor is exactly 1 are skipped;
//                       others are read and written once.
// Ignored rows (target == ignore_index, and targets outside [0, V), which are never used as an
// index: the documented GPU behaviour) are not read; their gradient is written as zeros. Row
// offsets are 64-bit (M * V may exceed 2^31); V itself must be below 2^31 - 16.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/device_compat.cuh"

namespace llmfast {
namespace cross_entropy {

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
    LLMFAST_CHECK_ALIGNED(dst, 16, "16-byte store");
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
#ifdef LLMFAST_SIMT_EMULATION
  (void)v;
#else
  asm volatile("" : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w));
#endif
}

__device__ __forceinline__ bool target_valid(const CeArgs& a, int64_t t) {
  return t != a.ignore_index && t >= 0 && t < a.V;
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
  LLMFAST_SHARED(RowState[32], warp_states);
  LLMFAST_SHARED(RowState, block_state);
  LLMFAST_SHARED(RowState, row_state);
  LLMFAST_SHARED(float, x_target);

  int rank = 0;
  int64_t row = blockIdx.x;
  if constexpr (kCluster) {
    rank = device::cluster_rank();
    row = blockIdx.x / cluster;
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
      LLMFAST_CHECK_ALIGNED(r.base + static_cast<int64_t>(s) * VEC, 16, "16-byte load");
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
    device::cluster_sync();  // every block's block_state is written
    if (threadIdx.x == 0) {
      RowState acc = empty_state();
      for (int q = 0; q < cluster; ++q) acc = merge<kSmooth>(acc, *device::map_shared_rank(&block_state, q));
      row_state = acc;
    }
    device::cluster_arrive();
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
  if constexpr (kCluster) device::cluster_wait();
}

// ---------------------------------------------------------------------------------------------
// Any row length: one block per row, an online pass and a gradient pass (which re-reads the
// row, mostly from L2). Traffic: reads each non-ignored row twice, writes its gradient once.
// ---------------------------------------------------------------------------------------------
template <typename T, bool kSmooth, bool kCap>
__global__ void __launch_bounds__(kLoopedThreads) ce_looped_kernel(CeArgs a) {
  constexpr int VEC = vec_of<T>();
  LLMFAST_SHARED(RowState[32], warp_states);
  LLMFAST_SHARED(RowState, row_state);
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
    LLMFAST_CHECK_ALIGNED(r.base + static_cast<int64_t>(s) * VEC, 16, "16-byte load");
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
  // The target's logit, for the loss (thread 0 writes it). Read before block_merge: in place
  // (grad == logits), the thread owning that element overwrites it with its gradient as soon as
  // it has passed the merge's last barrier, which thread 0 may not have left yet.
  const float x_t =
      threadIdx.x == 0
          ? softcapped<kCap>(static_cast<float>(static_cast<const T*>(a.logits)[row * a.V + t]), a.cap, inv_cap)
          : 0.0f;
  block_merge<kSmooth>(st, warp_states, &row_state);

  const float w_t = a.w != nullptr ? __ldg(a.w + t) : 1.0f;
  const RowCoef c = row_coefficients(a, row_state, w_t, x_t, row, threadIdx.x == 0);
  if (r.gbase != nullptr) {
    // In place (grad == logits) is safe: each element is read by the thread that overwrites it.
    for (int s = threadIdx.x; s < r.n_slots; s += blockDim.x) {
      LLMFAST_CHECK_ALIGNED(r.base + static_cast<int64_t>(s) * VEC, 16, "16-byte load");
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
  LLMFAST_SHARED(double[kReduceThreads], partial);
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
  LLMFAST_SHARED(double[kReduceThreads], partial);
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
    if (total_weight != nullptr) {
      // 'mean' over a zero weight sum is NaN, as torch's (its NLL term is 0 / 0), also where
      // label smoothing or z_loss leave a non-zero sum
      const double w = static_cast<double>(*total_weight);
      total = w == 0.0 ? std::numeric_limits<double>::quiet_NaN() : total / w;
    }
    *out = static_cast<float>(total);
  }
}

// grad[row, :] *= factor (go[0], or go[row] when per_row); rows whose factor is exactly 1 are left
// alone. A bounded grid walks the (row, column block) tiles: the usual call, a plain
// loss.backward() whose upstream factor is the scalar 1, then costs each block one load (a grid
// of one block per tile cost ~0.3 ms of empty blocks at 8192 x 128256 on the H100).
// Traffic: reads and writes the scaled rows once.
template <typename T>
__global__ void __launch_bounds__(kScaleThreads) ce_scale_grad_kernel(T* grad, const float* go, int64_t M, int V,
                                                                      int col_blocks, bool per_row) {
  if (!per_row && go[0] == 1.0f) return;
  const int64_t tiles = M * col_blocks;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / col_blocks;
    const float f = go[per_row ? row : 0];
    if (f == 1.0f) continue;
    T* g = grad + row * static_cast<int64_t>(V);
    // 64-bit column bounds: begin + one block's span passes INT_MAX for V within 2^31 of it.
    const int64_t begin = (tile % col_blocks) * kScaleThreads * kScaleElemsPerThread;
    const int64_t end = min(static_cast<int64_t>(V), begin + kScaleThreads * kScaleElemsPerThread);
    for (int64_t j = begin + threadIdx.x; j < end; j += kScaleThreads) {
      g[j] = static_cast<T>(static_cast<float>(g[j]) * f);
    }
  }
}

}  // namespace cross_entropy
}  // namespace llmfast
