// The CUDA kernels of llmfast::norm_fwd / llmfast::norm_bwd (launched by norm_cuda_launch.h): LayerNorm and RMSNorm over the rows of
// an (M, N) row-major tensor, optionally fused with a residual add (contract in norm_ops.cpp).
//
// Algorithm. A row is spread over a "row group" of threads; each thread loads its part of the
// row with 16-byte vector loads (all loads of a row issued before the first use) and keeps it in
// registers, packed in the input dtype, until the row is written back. Statistics are in fp32
// and never E[x^2] - mean^2: LayerNorm's forward has each thread take the mean and the sum of
// squared deviations of its own elements (two passes over its registers) and merges those pairs
// over the row in one reduction (MergeMoments); the generic kernels take the row's mean, then
// sum((s - mean)^2). Row reductions go through warp shuffles, then shared memory across the warps
// of the group, then -- when one row is split over a thread-block cluster (Hopper) -- distributed
// shared memory across the blocks of the cluster. Backward runs a persistent grid: every thread
// owns the same columns in every row it visits and adds dy * xhat and dy into fp32 accumulators
// in shared memory; at the end each cluster writes one fp32 partial row of dW and dB to a
// workspace, and a small kernel sums the partials in a fixed order (deterministic for a given
// device and shape). When a row
// spans a cluster (1-2 rows in flight per SM), backward also has L2 fetch the next row (sm_90
// bulk prefetch) while the current one is reduced: +5-10% there, a loss for shorter rows.
//
// Memory traffic (T = element size). Forward: reads input (+ residual) once, writes out
// (+ residual_out) once: 2MNT (4MNT with a residual), plus 8M bytes of statistics; weight and bias
// are re-read per row from L1/L2. Backward: reads grad_out and s (+ grad_residual_out) once,
// writes grad_input once: 3MNT (4MNT), plus P * N * 8 bytes of dW/dB partials written and read
// back (P = clusters in the persistent grid, 1-2 blocks per SM: a few % of the main traffic).
//
// Launch shapes, chosen on the host from N (VEC = 16 / T elements per 16-byte vector):
//   vectors per thread: forward 4 (32 bf16 / 16 fp32 columns: 16 registers of packed data),
//   backward 2 per tensor (x and dy are both held across the row reduction).
//   threads per row (tpr) = ceil(N / VEC / vectors-per-thread), rounded up to a power of two
//   when <= 32 (a group's shuffles then stay inside its warp), else to a multiple of 32.
//   Rows with tpr <= target share a block of `target` threads (target / tpr rows per block);
//   target = 128 forward (smaller blocks: a row group's barriers hold up fewer rows), 512
//   backward (fewer blocks: fewer dW/dB partial rows). Rows with target < tpr <= 512 get a block
//   of their own. Longer rows are split over a cluster of C <= 8 blocks of <= 512 threads (sm_90
//   and newer): a block then holds a part of a row, so that more than one row is in flight per
//   SM and one row's loads overlap another's reductions.
//     N (bf16)   forward                       backward
//     1024       tpr 32, 4 rows / 128 thr      tpr 64, 8 rows / 512 thr
//     4096       tpr 128, 1 row / 128 thr      tpr 256, 2 rows / 512 thr
//     8192       tpr 256                       tpr 512
//     16384      tpr 512                       cluster 2 x 512
//     65536      cluster 4 x 512               cluster 8 x 512
//   Register-resident limits: forward N <= 8*512*4*VEC (131072 bf16, 65536 fp32), backward
//   N <= 8*512*2*VEC (65536 bf16, 32768 fp32); without clusters (sm_80) one block of 512
//   threads per row: forward N <= 16384 bf16 / 8192 fp32, backward N <= 8192 bf16 / 4096 fp32.
//   Blocks are launched at 2 per SM x 512 threads worth of registers (<= 64 per thread); the
//   hot bf16/fp16 kernels fit without spills (forward 56 registers, backward 64).
//   Anything else -- N not a multiple of VEC, a pointer not 16-byte aligned, or a longer row --
//   takes the generic kernels: one 512-thread block per row, strided scalar loops that re-read
//   the row (from L1/L2) for each pass; backward accumulates dW/dB in a per-block fp32 row of
//   the workspace. Correct for any N, not tuned.
//
// Measured on H100 SXM (bf16, weight and bias, copy ceiling 3020 GB/s; bytes as in PERF.md:
// forward 2MNT, forward+backward 5MNT), shapes 16384x1024 / 16384x4096 / 8192x8192 / 4096x16384 /
// 2048x65536: LayerNorm forward 2240 / 2780 / 2760 / 2650 / 1760 GB/s, forward+backward
// 2040 / 2550 / 2380 / 2140 / 1780 GB/s; RMSNorm forward 2250 / 2790 / 2790 / 2770 / 2210,
// forward+backward 2090 / 2620 / 2560 / 2300 / 2030. (Measured with LayerNorm's forward taking two
// row reductions, mean then sum((s - mean)^2); the one-reduction MergeMoments form is unmeasured:
// it should bring LayerNorm's forward to RMSNorm's, which takes one.)
#pragma once
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/device_compat.cuh"

namespace llmfast {
namespace norm {

using cuda::ceil_div;
using cuda::Packed;
using cuda::round_up;

// Register-resident kernels: threads per block at most (the launch bound: 2 blocks of 512 per SM
// at <= 64 registers), blocks per cluster at most (the portable limit), and the block size that
// rows of at most that many threads are packed into (several rows per block). Forward prefers
// small blocks: a row group's barriers then hold up fewer rows (+2-4% on H100 at N = 1024..8192);
// backward prefers large ones: fewer blocks, so fewer dW/dB partial rows to write and reduce.
constexpr int kMaxThreads = 512;
constexpr int kMaxCluster = 8;
constexpr int kFwdTargetThreads = 128;
constexpr int kBwdTargetThreads = 512;
constexpr int kFwdVecsPerThread = 4;
constexpr int kBwdVecsPerThread = 2;
constexpr int kGenericThreads = 512;
// Backward dW + dB accumulators of the largest block (16-bit types: 16 columns per thread).
constexpr int kBwdMaxSmem =
    kMaxThreads * kBwdVecsPerThread * 8 * 2 * static_cast<int>(sizeof(float));

template <typename T>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Row-group sums.
// ---------------------------------------------------------------------------------------------

// Shared scratch of one block for row_group_reduce: per-warp partials, and the block's partial
// that the other blocks of a cluster read. Each call uses one of two buffers in turn: a buffer is
// written again two calls later, after a barrier (the next call's) that every reader of its
// previous contents has passed.
template <int K>
struct RowScratch {
  float warp[2][32][K];
  float block[2][K];
};

// v <- combine(v, partner) over a full warp: butterfly on all 32 lanes, each step combining the
// operand of the lower lane with that of the upper lane, so both lanes of a pair compute the
// same bits and every lane ends with the same result. Lanes holding the identity do not change
// it.
template <int K, typename Combine>
__device__ __forceinline__ void warp_butterfly(float (&v)[K], int max_off, Combine combine) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    if (off < max_off) {
      float other[K];
#pragma unroll
      for (int i = 0; i < K; ++i) other[i] = __shfl_xor_sync(0xffffffffu, v[i], off);
      if (lane & off) {
        combine(other, v);
#pragma unroll
        for (int i = 0; i < K; ++i) v[i] = other[i];
      } else {
        combine(v, other);
      }
    }
  }
}

// Reduces v over the row group of the calling thread: tpr consecutive threads of the block (tpr
// a power of two <= 32, or a multiple of 32), times `cluster` blocks when a row spans a cluster
// (then tpr == blockDim.x). combine(lo, hi) folds hi into lo (lo <- lo (+) hi); `identity` is
// its neutral element. Every thread of the group ends with the same bits: shuffles pair lanes
// in a fixed order, and per-warp / per-block partials are gathered into fixed lanes (lane j <-
// warp j or block j) and folded the same way. Must be called by all threads of the block (and
// cluster) the same number of times.
template <int K, typename Combine>
__device__ __forceinline__ void row_group_reduce(float (&v)[K], RowScratch<K>& s, int& parity,
                                                 int tpr, int cluster, const float (&identity)[K],
                                                 Combine combine) {
  const int lane = threadIdx.x & 31;
  // Inside a group of <= 32 lanes only offsets < tpr are used: the group's lanes never mix with
  // another group's.
  warp_butterfly(v, tpr, combine);
  if (tpr > 32) {
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < K; ++i) s.warp[parity][warp][i] = v[i];
    }
    __syncthreads();
    const int warps_per_group = tpr >> 5;
    const int first = (warp / warps_per_group) * warps_per_group;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v[i] = lane < warps_per_group ? s.warp[parity][first + lane][i] : identity[i];
    }
    warp_butterfly(v, 32, combine);
  }
  if (cluster > 1) {
    if (threadIdx.x == 0) {
#pragma unroll
      for (int i = 0; i < K; ++i) s.block[parity][i] = v[i];
    }
    device::cluster_sync();
    if (lane < cluster) {
      const float* remote = device::map_shared_rank(&s.block[parity][0], lane);
#pragma unroll
      for (int i = 0; i < K; ++i) v[i] = remote[i];
    } else {
#pragma unroll
      for (int i = 0; i < K; ++i) v[i] = identity[i];
    }
    warp_butterfly(v, 32, combine);
  }
  parity ^= 1;
}

template <int K>
__device__ __forceinline__ void row_group_sum(float (&v)[K], RowScratch<K>& s, int& parity,
                                              int tpr, int cluster) {
  float zero[K];
#pragma unroll
  for (int i = 0; i < K; ++i) zero[i] = 0.0f;
  row_group_reduce(v, s, parity, tpr, cluster, zero, [](float(&a)[K], const float(&b)[K]) {
#pragma unroll
    for (int i = 0; i < K; ++i) a[i] += b[i];
  });
}

// LayerNorm's row statistics in one reduction: each thread holds (count, mean, M2) of its own
// elements (M2 = sum of squared deviations from that mean, two-pass over its registers), and
// row_group_reduce merges them pairwise (Chan, Golub and LeVeque's update):
//   n = na + nb, delta = mean_b - mean_a, mean = mean_a + delta * nb / n,
//   M2 = M2_a + M2_b + delta^2 * na * nb / n.
// As stable as the two-pass sum((s - mean)^2) (never E[x^2] - mean^2), with one round of
// barriers per row instead of two: one cluster barrier less a row when a row spans a cluster.
// A part with no elements (count 0) is the identity and leaves the other unchanged.
struct MergeMoments {
  __device__ __forceinline__ void operator()(float (&a)[3], const float (&b)[3]) const {
    const float nb = b[0];
    if (nb == 0.0f) return;
    const float n = a[0] + nb;
    const float delta = b[1] - a[1];
    const float wb = nb / n;  // 1 when a is empty: a becomes b exactly
    a[2] = a[2] + b[2] + delta * delta * a[0] * wb;
    a[1] = fmaf(delta, wb, a[1]);
    a[0] = n;
  }
};

__device__ __forceinline__ void row_group_moments(float (&m)[3], RowScratch<3>& s, int& parity, int tpr,
                                                  int cluster) {
  const float empty[3] = {0.0f, 0.0f, 0.0f};
  row_group_reduce(m, s, parity, tpr, cluster, empty, MergeMoments());
}

// Asks L2 to fetch bytes [p, p + bytes) ahead of their use (sm_90 bulk prefetch: no registers
// held, nothing waited for; p 16-byte aligned, bytes a multiple of 16). One thread issues it.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int64_t kPiece = 32768;
  const char* c = static_cast<const char*>(p);
#pragma unroll 1
  for (int64_t off = 0; off < bytes; off += kPiece) {
    const unsigned len = static_cast<unsigned>(bytes - off < kPiece ? bytes - off : kPiece);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(c + off), "r"(len) : "memory");
  }
#endif
}

// A block must not exit while the other blocks of its cluster may still read its shared memory.
__device__ __forceinline__ void cluster_exit_barrier(int cluster) {
  if (cluster > 1) device::cluster_sync();
}

// ---------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------

// Arguments of the forward kernels. x, residual, out, residual_out: (rows, cols) row-major;
// weight, bias: (cols,); mean: (rows,) or null (RMSNorm); rstd: (rows,). residual / weight /
// bias null when absent (residual_out is then unused).
struct FwdParams {
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* out;
  void* residual_out;
  float* mean;
  float* rstd;
  int64_t rows;
  int64_t cols;
  int64_t n_groups;  // row groups: ceil(rows / rows_per_block)
  int nvec;          // cols / VEC (register-resident kernel only)
  int tpr;           // threads per row inside one block
  int rows_per_block;
  int cluster;  // blocks per row
  float eps;
  float inv_cols;
  unsigned zero;  // always 0; see Packed::launder
  bool rms;
};

// Register-resident forward. Row group g of block b handles row (b / cluster) * rows_per_block
// + g; its thread t (counting over the cluster) holds vectors t, t + T, t + 2T, t + 3T of the
// row (T = threads per row), so each warp-wide load is contiguous.
// Traffic: reads x (+ residual) once, writes out (+ residual_out) once, 8 bytes of statistics
// per row; weight and bias are read per row from L1/L2.
// kResidual is a template flag (not a run-time one like the others): holding s and the residual
// at once needs 16 more registers, which would otherwise spill in the plain kernel.
template <typename T, typename W, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads, 2) norm_fwd_kernel(const FwdParams p) {
  constexpr int VEC = vec_of<T>();
  constexpr int VPT = kFwdVecsPerThread;
  using TPack = Packed<T, VEC>;
  using WPack = Packed<W, VEC>;
  LLMFAST_SHARED(RowScratch<1>, scratch);          // RMSNorm: sum(s^2)
  LLMFAST_SHARED(RowScratch<3>, moments_scratch);  // LayerNorm: (count, mean, M2)
  int parity = 0;

  const T* x = static_cast<const T*>(p.x);
  const T* res = kResidual ? static_cast<const T*>(p.residual) : nullptr;
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  T* out = static_cast<T*>(p.out);
  T* res_out = static_cast<T*>(p.residual_out);

  const int group = threadIdx.x / p.tpr;
  const int rank = static_cast<int>(blockIdx.x % p.cluster);
  const int t_row = rank * p.tpr + static_cast<int>(threadIdx.x % p.tpr);
  const int threads_per_row = p.cluster * p.tpr;
  const int64_t n_clusters = gridDim.x / p.cluster;

  for (int64_t rg = blockIdx.x / p.cluster; rg < p.n_groups; rg += n_clusters) {
    const int64_t row = rg * p.rows_per_block + group;
    const bool row_ok = row < p.rows;
    const int64_t row_off = row * p.cols;

    bool valid[VPT];
    TPack s[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int v = k * threads_per_row + t_row;
      valid[k] = row_ok && v < p.nvec;
      if (valid[k]) {
        s[k].load(x + row_off + static_cast<int64_t>(v) * VEC);
      } else {
        s[k].zero();
      }
    }
    if (kResidual) {
      TPack r[VPT];
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int v = k * threads_per_row + t_row;
        if (valid[k]) r[k].load(res + row_off + static_cast<int64_t>(v) * VEC);
      }
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        if (valid[k]) {
          const int v = k * threads_per_row + t_row;
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[k].set(e, s[k].get(e) + r[k].get(e));
          s[k].store(res_out + row_off + static_cast<int64_t>(v) * VEC);
        }
      }
    }

    // Invalid vectors hold zeros: they add nothing to the sums.
    float mu = 0.0f;
    float var;
    if (p.rms) {
      float acc[1] = {0.0f};
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float f = s[k].get(e);
          acc[0] += f * f;
        }
      }
      row_group_sum(acc, scratch, parity, p.tpr, p.cluster);
      var = acc[0] * p.inv_cols;
    } else {
      // This thread's (count, mean, M2), two passes over its registers, then one merge over
      // the row group (MergeMoments). The thread's mean is taken as shift + mean(s - shift),
      // shift = its first element: exact for a constant row (as torch's Welford mean), and
      // parts with equal means merge exactly, so such a row normalizes to exactly 0 even with
      // a tiny eps (BERT's 1e-12). Valid vectors come first (v grows with k).
      const float shift = valid[0] ? s[0].get(0) : 0.0f;
      float m[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        if (valid[k]) {
          m[0] += static_cast<float>(VEC);
#pragma unroll
          for (int e = 0; e < VEC; ++e) m[1] += s[k].get(e) - shift;
        }
      }
      if (m[0] > 0.0f) {
        const float local_mu = m[1] / m[0];
        m[1] = shift + local_mu;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
          s[k].launder(p.zero);
          if (valid[k]) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float d = (s[k].get(e) - shift) - local_mu;
              m[2] += d * d;
            }
          }
        }
      }
      row_group_moments(m, moments_scratch, parity, p.tpr, p.cluster);
      mu = m[1];
      var = m[2] * p.inv_cols;
    }
    const float rs = rsqrtf(var + p.eps);
    if (row_ok && t_row == 0) {
      if (!p.rms) p.mean[row] = mu;
      p.rstd[row] = rs;
    }

#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      s[k].launder(p.zero);
      if (valid[k]) {
        const int v = k * threads_per_row + t_row;
        WPack w, b;
        if (weight != nullptr) w.load_ldg_ordered(weight + static_cast<int64_t>(v) * VEC);
        if (bias != nullptr) b.load_ldg_ordered(bias + static_cast<int64_t>(v) * VEC);
        TPack y;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float f = (s[k].get(e) - mu) * rs;
          if (weight != nullptr) f *= w.get(e);
          if (bias != nullptr) f += b.get(e);
          y.set(e, f);
        }
        y.store_ordered(out + row_off + static_cast<int64_t>(v) * VEC);
      }
    }
  }
  cluster_exit_barrier(p.cluster);
}

// Generic forward: any N and alignment. One block (tpr == blockDim.x, a multiple of 32) per row,
// strided scalar loops. Traffic: as the register kernel, plus one (LayerNorm) or two re-reads of
// the row, mostly from L1/L2.
template <typename T, typename W>
__global__ void __launch_bounds__(kGenericThreads) norm_fwd_generic_kernel(const FwdParams p) {
  LLMFAST_SHARED(RowScratch<1>, scratch);
  int parity = 0;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  T* out = static_cast<T*>(p.out);
  T* res_out = static_cast<T*>(p.residual_out);
  const int64_t cols = p.cols;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t off = row * cols;
    // With a residual, s is re-read from residual_out, written by this same thread.
    const T* s = res != nullptr ? res_out + off : x + off;
    // s[j]: x, or x + residual rounded to T.
    auto s_at = [&](int64_t j) -> T {
      return res != nullptr ? static_cast<T>(static_cast<float>(x[off + j]) + static_cast<float>(res[off + j]))
                            : x[off + j];
    };
    // LayerNorm sums s - s[0] (every thread computes s[0]): the mean s[0] + sum(s - s[0]) / cols
    // is exact for a constant row, which then normalizes to 0.
    const float shift = p.rms ? 0.0f : static_cast<float>(s_at(0));
    float acc[1] = {0.0f};
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const T v = s_at(j);
      if (res != nullptr) res_out[off + j] = v;
      const float f = static_cast<float>(v);
      acc[0] += p.rms ? f * f : f - shift;
    }
    row_group_sum(acc, scratch, parity, blockDim.x, 1);
    float mu = 0.0f;
    float var;
    if (p.rms) {
      var = acc[0] * p.inv_cols;
    } else {
      mu = shift + acc[0] * p.inv_cols;
      acc[0] = 0.0f;
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float d = static_cast<float>(s[j]) - mu;
        acc[0] += d * d;
      }
      row_group_sum(acc, scratch, parity, blockDim.x, 1);
      var = acc[0] * p.inv_cols;
    }
    const float rs = rsqrtf(var + p.eps);
    if (threadIdx.x == 0) {
      if (!p.rms) p.mean[row] = mu;
      p.rstd[row] = rs;
    }
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      float f = (static_cast<float>(s[j]) - mu) * rs;
      if (weight != nullptr) f *= static_cast<float>(weight[j]);
      if (bias != nullptr) f += static_cast<float>(bias[j]);
      out[off + j] = static_cast<T>(f);
    }
  }
}

// Arguments of the backward kernels. dy, dres, x (= s), dx: (rows, cols) row-major; weight:
// (cols,) or null; mean: (rows,) or null (RMSNorm); rstd: (rows,). ws_w / ws_b: (P, cols) fp32
// partial sums of dy * xhat / dy, one row per cluster (per block for the generic kernel), or
// null when that gradient is not wanted.
struct BwdParams {
  const void* dy;
  const void* dres;
  const void* x;
  const void* weight;
  const float* mean;
  const float* rstd;
  void* dx;
  float* ws_w;
  float* ws_b;
  int64_t rows;
  int64_t cols;
  int64_t n_groups;
  int nvec;
  int tpr;
  int rows_per_block;
  int cluster;
  float inv_cols;
  unsigned zero;  // always 0; see Packed::launder
  bool rms;
  bool prefetch;  // prefetch the next row group into L2
};

// Register-resident backward over a persistent grid (cluster c visits row groups c, c + G, ...).
// Thread/column mapping as in norm_fwd_kernel, 2 vectors per thread. dW/dB accumulate in fp32
// in dynamic shared memory: per row group, float4 slot (k, e4) of thread t lives at
// ((g * VPT + k) * VEC/4 + e4) * tpr + t, so a warp's float4 accesses are contiguous.
// Traffic: reads dy, x (+ dres) once, writes dx once, 8 bytes of statistics read per row;
// weight is read per row from L1/L2; finally writes one partial row of dW and dB per cluster.
template <typename T, typename W>
__global__ void __launch_bounds__(kMaxThreads, 2) norm_bwd_kernel(const BwdParams p) {
  constexpr int VEC = vec_of<T>();
  constexpr int VPT = kBwdVecsPerThread;
  constexpr int F4 = VEC / 4;
  using TPack = Packed<T, VEC>;
  using WPack = Packed<W, VEC>;
  LLMFAST_DYNAMIC_SHARED(smem);
  float4* const param_acc = reinterpret_cast<float4*>(smem);
  LLMFAST_SHARED(RowScratch<2>, scratch);
  int parity = 0;

  const T* dy = static_cast<const T*>(p.dy);
  const T* dres = static_cast<const T*>(p.dres);
  const T* x = static_cast<const T*>(p.x);
  const W* weight = static_cast<const W*>(p.weight);
  T* dx = static_cast<T*>(p.dx);

  const int tpr = p.tpr;
  const int group = threadIdx.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int rank = static_cast<int>(blockIdx.x % p.cluster);
  const int t_row = rank * tpr + lane;
  const int threads_per_row = p.cluster * tpr;
  const int64_t n_clusters = gridDim.x / p.cluster;

  const int slots_per_group = VPT * F4 * tpr;
  float4* acc_w = p.ws_w != nullptr ? param_acc : nullptr;
  float4* acc_b =
      p.ws_b != nullptr
          ? param_acc + (p.ws_w != nullptr ? p.rows_per_block * slots_per_group : 0)
          : nullptr;
  float4* my_w = acc_w != nullptr ? acc_w + group * slots_per_group + lane : nullptr;
  float4* my_b = acc_b != nullptr ? acc_b + group * slots_per_group + lane : nullptr;
#pragma unroll
  for (int q = 0; q < VPT * F4; ++q) {
    if (my_w != nullptr) my_w[q * tpr] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (my_b != nullptr) my_b[q * tpr] = make_float4(0.f, 0.f, 0.f, 0.f);
  }

  for (int64_t rg = blockIdx.x / p.cluster; rg < p.n_groups; rg += n_clusters) {
    const int64_t row = rg * p.rows_per_block + group;
    const bool row_ok = row < p.rows;
    const int64_t row_off = row * p.cols;
    if (p.prefetch && rank == 0 && threadIdx.x == 0 && rg + n_clusters < p.n_groups) {
      // The rows this cluster handles next are contiguous: have L2 fetch them while this row
      // is reduced and written, so that the next loads find them there. Measured on H100: a
      // win when a row spans a cluster (1-2 rows in flight per SM), a loss otherwise.
      const int64_t first = (rg + n_clusters) * p.rows_per_block;
      const int64_t bytes = min(static_cast<int64_t>(p.rows_per_block), p.rows - first) * p.cols *
                            static_cast<int64_t>(sizeof(T));
      prefetch_l2(x + first * p.cols, bytes);
      prefetch_l2(dy + first * p.cols, bytes);
      if (dres != nullptr) prefetch_l2(dres + first * p.cols, bytes);
    }

    bool valid[VPT];
    TPack xs[VPT], gy[VPT];
    WPack w[VPT];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int v = k * threads_per_row + t_row;
      valid[k] = row_ok && v < p.nvec;
      if (valid[k]) {
        xs[k].load(x + row_off + static_cast<int64_t>(v) * VEC);
        gy[k].load(dy + row_off + static_cast<int64_t>(v) * VEC);
        if (weight != nullptr) w[k].load_ldg(weight + static_cast<int64_t>(v) * VEC);
      } else {
        xs[k].zero();
        gy[k].zero();
      }
    }
    const float mu = (row_ok && !p.rms) ? p.mean[row] : 0.0f;
    const float rs = row_ok ? p.rstd[row] : 0.0f;

    // sum(g) and sum(g * xhat), g = dy * w.
    float acc[2] = {0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      if (valid[k]) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float xh = (xs[k].get(e) - mu) * rs;
          const float g = weight != nullptr ? gy[k].get(e) * w[k].get(e) : gy[k].get(e);
          acc[0] += g;
          acc[1] += g * xh;
        }
      }
    }
    row_group_sum(acc, scratch, parity, tpr, p.cluster);
    // RMSNorm has no mean to subtract, so its dx has no mean(g) term.
    const float c_g = p.rms ? 0.0f : acc[0] * p.inv_cols;
    const float c_gx = acc[1] * p.inv_cols;

    // Only x and dy (packed) stay in registers across the reduction; the weight is read again
    // (an L1 hit) rather than held.
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      xs[k].launder(p.zero);
      gy[k].launder(p.zero);
      if (valid[k]) {
        const int v = k * threads_per_row + t_row;
        const int64_t off = row_off + static_cast<int64_t>(v) * VEC;
        WPack wk;
        if (weight != nullptr) wk.load_ldg_ordered(weight + static_cast<int64_t>(v) * VEC);
        TPack r;
        if (dres != nullptr) r.load(dres + off);
        TPack d;
#pragma unroll
        for (int e4 = 0; e4 < F4; ++e4) {
          float xh[4], gyf[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int e = 4 * e4 + i;
            xh[i] = (xs[k].get(e) - mu) * rs;
            gyf[i] = gy[k].get(e);
            const float g = weight != nullptr ? gyf[i] * wk.get(e) : gyf[i];
            float f = rs * (g - c_g - xh[i] * c_gx);
            if (dres != nullptr) f += r.get(e);
            d.set(e, f);
          }
          const int q = (k * F4 + e4) * tpr;
          if (my_w != nullptr) {
            float4 a = my_w[q];
            a.x += gyf[0] * xh[0];
            a.y += gyf[1] * xh[1];
            a.z += gyf[2] * xh[2];
            a.w += gyf[3] * xh[3];
            my_w[q] = a;
          }
          if (my_b != nullptr) {
            float4 a = my_b[q];
            a.x += gyf[0];
            a.y += gyf[1];
            a.z += gyf[2];
            a.w += gyf[3];
            my_b[q] = a;
          }
        }
        d.store(dx + off);
      }
    }
  }

  if (acc_w != nullptr || acc_b != nullptr) {
    // Fold the block's row groups (in group order) and write this cluster's partial row.
    __syncthreads();
    const int64_t part = blockIdx.x / p.cluster;
    for (int slot = threadIdx.x; slot < slots_per_group; slot += blockDim.x) {
      const int t = slot % tpr;
      const int ke = slot / tpr;
      const int v = (ke / F4) * threads_per_row + rank * tpr + t;
      if (v >= p.nvec) continue;
      const int64_t col = static_cast<int64_t>(v) * VEC + (ke % F4) * 4;
      if (acc_w != nullptr) {
        float4 a = acc_w[slot];
#pragma unroll 1
        for (int g = 1; g < p.rows_per_block; ++g) {
          const float4 b = acc_w[g * slots_per_group + slot];
          a.x += b.x;
          a.y += b.y;
          a.z += b.z;
          a.w += b.w;
        }
        LLMFAST_CHECK_ALIGNED(p.ws_w + part * p.cols + col, 16, "16-byte store");
        *reinterpret_cast<float4*>(p.ws_w + part * p.cols + col) = a;
      }
      if (acc_b != nullptr) {
        float4 a = acc_b[slot];
#pragma unroll 1
        for (int g = 1; g < p.rows_per_block; ++g) {
          const float4 b = acc_b[g * slots_per_group + slot];
          a.x += b.x;
          a.y += b.y;
          a.z += b.z;
          a.w += b.w;
        }
        LLMFAST_CHECK_ALIGNED(p.ws_b + part * p.cols + col, 16, "16-byte store");
        *reinterpret_cast<float4*>(p.ws_b + part * p.cols + col) = a;
      }
    }
  }
  cluster_exit_barrier(p.cluster);
}

// Generic backward: any N and alignment. Block b visits rows b, b + gridDim.x, ... (one row at a
// time, tpr == blockDim.x) and accumulates dW/dB directly in its own workspace row (each thread
// always touches the same columns, so no races). Traffic: as the register kernel, plus a re-read
// of the row from L1/L2 and a read-modify-write of the workspace row per row visited.
template <typename T, typename W>
__global__ void __launch_bounds__(kGenericThreads) norm_bwd_generic_kernel(const BwdParams p) {
  LLMFAST_SHARED(RowScratch<2>, scratch);
  int parity = 0;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dres = static_cast<const T*>(p.dres);
  const T* x = static_cast<const T*>(p.x);
  const W* weight = static_cast<const W*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int64_t cols = p.cols;
  float* ws_w = p.ws_w != nullptr ? p.ws_w + blockIdx.x * cols : nullptr;
  float* ws_b = p.ws_b != nullptr ? p.ws_b + blockIdx.x * cols : nullptr;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    if (ws_w != nullptr) ws_w[j] = 0.0f;
    if (ws_b != nullptr) ws_b[j] = 0.0f;
  }

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t off = row * cols;
    const float mu = p.rms ? 0.0f : p.mean[row];
    const float rs = p.rstd[row];
    float acc[2] = {0.0f, 0.0f};
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float xh = (static_cast<float>(x[off + j]) - mu) * rs;
      float g = static_cast<float>(dy[off + j]);
      if (weight != nullptr) g *= static_cast<float>(weight[j]);
      acc[0] += g;
      acc[1] += g * xh;
    }
    row_group_sum(acc, scratch, parity, blockDim.x, 1);
    const float c_g = p.rms ? 0.0f : acc[0] * p.inv_cols;
    const float c_gx = acc[1] * p.inv_cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float xh = (static_cast<float>(x[off + j]) - mu) * rs;
      const float gy = static_cast<float>(dy[off + j]);
      const float g = weight != nullptr ? gy * static_cast<float>(weight[j]) : gy;
      float f = rs * (g - c_g - xh * c_gx);
      if (dres != nullptr) f += static_cast<float>(dres[off + j]);
      dx[off + j] = static_cast<T>(f);
      if (ws_w != nullptr) ws_w[j] += gy * xh;
      if (ws_b != nullptr) ws_b[j] += gy;
    }
  }
}

// out[c] = sum over p of ws[p][c] (p ascending per thread-row, then the 32 thread-rows in
// order), cast to OutT; blockIdx.y picks the (ws, out) pair. Block (32, 32): 32 columns, the
// parts split over threadIdx.y. Traffic: reads the (parts, cols) workspace once.
template <typename OutT>
__global__ void __launch_bounds__(1024)
    norm_param_grad_reduce_kernel(const float* ws0, OutT* out0, const float* ws1, OutT* out1,
                                  int64_t parts, int64_t cols) {
  LLMFAST_SHARED(float[32][33], tile);
  const float* ws = blockIdx.y == 0 ? ws0 : ws1;
  OutT* out = blockIdx.y == 0 ? out0 : out1;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.0f;
  if (col < cols) {
#pragma unroll 4
    for (int64_t part = threadIdx.y; part < parts; part += 32) acc += ws[part * cols + col];
  }
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; ++i) sum += tile[i][threadIdx.x];
    out[col] = static_cast<OutT>(sum);
  }
}

}  // namespace norm
}  // namespace llmfast
