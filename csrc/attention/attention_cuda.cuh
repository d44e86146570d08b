// CUDA kernels of llmfast::attention_fwd / attention_bwd: FlashAttention-2 on the tensor cores.
// The contract is in attention_ops.cpp, the math in llmfast/reference/attention.py; the
// launchers are in attention_cuda_launch.h.
//
// Work partitioning (FlashAttention-2), grid (tiles, heads, batch):
//   forward   one block per (kFwdM queries, query head, batch); each warp owns 16 or 32 query
//             rows (Tiles::kFwdMT) and streams the key/value tiles of the band through shared
//             memory (cp.async, double-buffered): S = Q K^T on the
//             tensor cores, online softmax on the C fragments in registers, O += P V with P
//             fed from the same registers (mma.cuh, a_from_c). O and the row statistics never
//             leave registers until the end; the (Sq, Sk) scores never exist in memory.
//   backward  delta = rowsum(dO * O) - dlse first (attention_delta_kernel), then
//             dK/dV: one block per (kKeys keys, kv head, batch) -- at head dims over 128 two,
//                    each accumulating half of dK's and dV's columns --, each warp owns 16 keys and
//                    loops over the query tiles of every query head of its group (GQA sums in
//                    registers): S^T = K Q^T, dP^T = V dO^T, dS = P (dP - delta),
//                    dV += P^T dO, dK += scale dS^T Q; and, fused (FlashAttention-2's
//                    partitioning, fp16/bf16), dQ += scale dS K: dS^T goes through shared
//                    memory, each warp multiplies 16 of the tile's queries and adds them
//                    atomically into an fp32 dQ buffer (5 products in all, nondeterministic
//                    summation order);
//             dQ:    the deterministic alternative (torch.use_deterministic_algorithms, fp32,
//                    and the additive mask's gradient): one block per (kM queries, query head,
//                    batch) recomputes S and dP = dO V^T, then dQ += scale dS K and writes dS
//                    as the mask's gradient (7 products in all, no atomics).
// Element types: fp16 and bf16 on the tensor cores (fp32 accumulation, P and dS rounded to the
// input type for the second product, as FlashAttention does); fp32 through the same kernels
// with the exact fp32 product of mma.cuh (CUDA cores).
// Head dims: the kernels are instantiated for kD = 32, 64, 128, 256 (max(D, Dv) rounded up);
// columns past D / Dv are zero in shared memory and never stored.
// Masks: the band (causal / window), an (expanded) attn_mask of any strides (bool or additive,
// any float dtype), sequence ends; tiles wholly inside all of them skip the per-element tests.
// Dropout: the same counter-based hash as the CPU kernels (attention_problem.h), so the CPU and
// CUDA backends drop the same entries for one seed.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/memory.cuh"
#include "common/device_compat.cuh"
#include "common/mma.cuh"

namespace llmfast {
namespace attention {

enum MaskKind : int { kNoMask = 0, kMaskBool, kMaskF32, kMaskF16, kMaskBF16, kMaskF64 };

// Kernel arguments (by value). Strides are in elements; the last dimension of q, k, v and dout
// is contiguous (the launcher makes it so); out, lse, delta, dq, dk, dv, dmask are contiguous.
struct Params {
  int B, Hq, Hkv, G, Sq, Sk, D, Dv;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, sequence
  bool q_vec, k_vec, v_vec, do_vec;               // 16-byte aligned rows: vector loads
  const void* mask;
  int mask_kind;
  int64_t mask_stride[4];
  float scale;
  float softcap;        // 0 = off
  float softcap_scale;  // scale / softcap
  float dropout_p;
  float keep_scale;
  const int64_t* seed;
  int64_t left, right;  // band; -1 = unbounded
  // forward outputs
  void* out;
  float* lse;
  // backward
  const void* dout;
  int64_t do_stride[3];
  const float* lse_in;
  const float* grad_lse;  // may be null
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  float* dmask;     // null unless the mask gradient is wanted
  float* dq_accum;  // fused dQ (fp32, zeroed, atomically accumulated by the dK/dV kernel), or null
};

constexpr float kInf = INFINITY;
constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory rows are padded by 16 bytes so the fragment loads of a warp hit 32 banks.
template <typename T>
constexpr int padded_ld(int d) {
  return d + static_cast<int>(16 / sizeof(T));
}

// Tile sizes per element type and head dim. kStages = 2 double-buffers the streamed tiles
// (cp.async loads of the next tile overlap the products on the current one); fp32 keeps one
// stage so that its larger tiles fit sm_80's 163 KB of shared memory.
template <typename T, int kD>
struct Tiles {
  static constexpr bool kBig = kD > 128;
  static constexpr bool kWide = sizeof(T) == 4 && kBig;
  static constexpr int kM = kWide ? 32 : 64;        // queries per block (dQ), 16 per warp
  static constexpr int kN = kBig ? 32 : 64;         // keys per tile (forward, dQ)
  // The forward's warps own kFwdMT row tiles of 16 queries (two where the registers allow:
  // fewer shared-memory reads per mma), kFwdM queries per block, kM / 16 warps.
  // (ptxas, sm_90a: two tiles at head dim 128 need more than 255 registers and spill).
  static constexpr int kFwdMT = sizeof(T) == 2 && kD <= 64 ? 2 : 1;
  static constexpr int kFwdM = kM * kFwdMT;
  static constexpr int kKeys = kWide ? 32 : 64;     // keys per block (dK/dV)
  // queries per tile (dK/dV); 32 from head dim 128 on, where dK and dV take half the registers
  static constexpr int kQueries = kD >= 128 ? 32 : 64;
  // dK/dV columns one block accumulates. Past 128, dK and dV together would take kD fp32
  // registers a thread (ptxas spilled kilobytes at 256), so kDkdvSplits blocks share a key
  // block, each accumulating 128 columns; each recomputes the scores and dP (1.5x the products of
  // a step at 256).
  static constexpr int kDkdvCols = kD > 128 ? 128 : kD;
  static constexpr int kDkdvSplits = kD / kDkdvCols;
  static constexpr int kStages = sizeof(T) == 2 ? 2 : 1;
  static constexpr int kLd = padded_ld<T>(kD);
  // The forward keeps its warp's Q fragments in registers where they fit beside O.
  static constexpr bool kQInRegisters = sizeof(T) == 2 && kFwdMT == 1 && kD <= 128;
  static constexpr int fwd_shared_bytes() { return (kFwdM + kStages * 2 * kN) * kLd * sizeof(T); }
  static constexpr int dq_shared_bytes() { return (2 * kM + kStages * 2 * kN) * kLd * sizeof(T); }
  // dS^T of one step for the fused dQ (tensor-core types only).
  static constexpr bool kFusedDq = sizeof(T) == 2;
  static constexpr int kLdS = padded_ld<T>(kQueries);
  static constexpr int dkdv_shared_bytes() {
    return (2 * kKeys + kStages * 2 * kQueries) * kLd * sizeof(T) +
           kStages * 2 * kQueries * sizeof(float) + (kFusedDq ? kKeys * kLdS * sizeof(T) : 0);
  }
};

template <typename T>
LLMFAST_DEVICE T zero_element() {
  return mma::Element<T>::from_float(0.f);
}

// Stores the pair (a, b) of a C fragment at columns col, col + 1 (col even) of a row with
// ncols columns: one 32-bit store for 16-bit types when the row length keeps it aligned.
template <typename T>
LLMFAST_DEVICE void store_pair(T* row, int col, int ncols, float a, float b) {
  if constexpr (sizeof(T) == 2) {
    if ((ncols & 1) == 0 && col + 1 < ncols) {
      LLMFAST_CHECK_ALIGNED(row + col, 4, "32-bit store");
      *reinterpret_cast<uint32_t*>(row + col) = mma::Element<T>::pack(a, b);
      return;
    }
  }
  if (col < ncols) row[col] = mma::Element<T>::from_float(a);
  if (col + 1 < ncols) row[col + 1] = mma::Element<T>::from_float(b);
}

// Starts copying rows [0, kRows) x columns [0, kD) of a (rows, row_stride) matrix at g into
// shared memory (ld elements a row), with zeros past `rows` and `cols`: 16-byte chunks through
// cp.async when the rows are aligned (`vec`), element by element otherwise. All threads of the
// block call it; the tile is complete after device::async_commit / async_wait and a barrier.
template <typename T, int kRows, int kD, int kThreads>
LLMFAST_DEVICE void load_tile(T* s, int ld, const T* g, int64_t row_stride, int rows, int cols,
                              bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunks = kD / kVec;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * kVec;
    T* dst = s + r * ld + col;
    if (vec && r < rows && col + kVec <= cols) {
      device::copy_async_16(dst, g + r * row_stride + col);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        dst[e] = (r < rows && col + e < cols) ? g[r * row_stride + col + e] : zero_element<T>();
      }
    }
  }
}

// The key/value tiles of the forward and dQ kernels in shared memory: kStages stages, each the
// kN keys then their kN values, rows of kLd elements.
template <typename T, int kN, int kD, int kThreads>
struct KeyValueTiles {
  static constexpr int kLd = padded_ld<T>(kD);
  T* base;
  LLMFAST_DEVICE T* keys(int stage) const { return base + stage * 2 * kN * kLd; }
  LLMFAST_DEVICE T* values(int stage) const { return base + (stage * 2 + 1) * kN * kLd; }
  // Starts loading keys and values j0 .. j0 + kN - 1 of one (batch, kv head): k and v point at
  // its first key and value.
  LLMFAST_DEVICE void load(const Params& p, const T* k, const T* v, int64_t j0, int stage) const {
    const int cols = static_cast<int>(p.Sk - j0 < kN ? p.Sk - j0 : kN);
    load_tile<T, kN, kD, kThreads>(keys(stage), kLd, k + j0 * p.k_stride[2], p.k_stride[2], cols, p.D, p.k_vec);
    load_tile<T, kN, kD, kThreads>(values(stage), kLd, v + j0 * p.v_stride[2], p.v_stride[2], cols, p.Dv,
                                   p.v_vec);
  }
};

// Step `step` of a streaming loop of `steps` (the tiles every kernel loops over): with two
// stages, starts loading step + 1 into the other stage (load(step + 1, stage)) and waits for
// this step's copies, step 0 having been loaded before the loop; with one stage, loads this
// step and waits. Ends with a barrier, after which the step's tile is ready for every warp;
// returns the stage that holds it. The loop body must end with a barrier too (the stage is
// refilled next).
template <int kStages, typename Load>
LLMFAST_DEVICE int begin_step(int64_t step, int64_t steps, Load&& load) {
  const int stage = kStages == 2 ? static_cast<int>(step & 1) : 0;
  if (kStages == 1) {
    load(step, 0);
    device::async_commit();
    device::async_wait<0>();
  } else if (step + 1 < steps) {
    load(step + 1, stage ^ 1);
    device::async_commit();
    device::async_wait<1>();
  } else {
    device::async_wait<0>();
  }
  __syncthreads();
  return stage;
}

// tanh to a few ulp. Not tanhf: the extension is built with --use_fast_math, which turns
// tanhf into tanh.approx.f32 (about 2^-11 relative error: a visible error in softcapped logits
// and in 1 - tanh^2); expm1f has no fast-math substitute.
LLMFAST_DEVICE float accurate_tanh(float x) {
  const float em1 = expm1f(-2.f * fabsf(x));  // in (-1, 0]
  return copysignf(-em1 / (2.f + em1), x);
}

// The score of query i and key j after scaling and softcap, from the raw product q . k;
// th = tanh(.) under softcap (for the backward), else 0.
LLMFAST_DEVICE float scaled_score(const Params& p, float raw, float& th) {
  if (p.softcap > 0.f) {
    th = accurate_tanh(raw * p.softcap_scale);
    return p.softcap * th;
  }
  th = 0.f;
  return raw * p.scale;
}

// y plus the attn_mask entry (i, j), or -inf where a bool mask is false. Out of line: it runs
// only with a mask, from loops unrolled over every element of a fragment.
LLMFAST_DEVICE_NOINLINE float apply_attn_mask(const Params& p, float y, int64_t b, int64_t h, int64_t i,
                                              int64_t j) {
  const int64_t off = b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2] +
                      j * p.mask_stride[3];
  switch (p.mask_kind) {
    case kMaskBool:
      return static_cast<const bool*>(p.mask)[off] ? y : -kInf;
    case kMaskF32:
      return y + static_cast<const float*>(p.mask)[off];
    case kMaskF16:
      return y + mma::Element<__half>::to_float(static_cast<const __half*>(p.mask)[off]);
    case kMaskBF16:
      return y + mma::Element<__nv_bfloat16>::to_float(static_cast<const __nv_bfloat16*>(p.mask)[off]);
    default:
      return y + static_cast<float>(static_cast<const double*>(p.mask)[off]);
  }
}

// y with the mask applied: -inf where (i, j) takes no part (past a sequence end, outside the
// band, false in a bool mask), else y plus the additive mask. The sequence ends and the band
// (the causal diagonal) are a few inline comparisons; the mask tensor is read out of line.
LLMFAST_DEVICE float masked_score(const Params& p, float y, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (i >= p.Sq || j >= p.Sk) return -kInf;
  if (p.left >= 0 && j < i - p.left) return -kInf;
  if (p.right >= 0 && j > i + p.right) return -kInf;
  return p.mask_kind == kNoMask ? y : apply_attn_mask(p, y, b, h, i, j);
}

// True when the tile [i0, i0 + rows) x [j0, j0 + cols) lies inside both sequences and the band
// and there is no mask: its scores need no per-element test.
LLMFAST_DEVICE bool tile_is_clear(const Params& p, int64_t i0, int rows, int64_t j0, int cols) {
  if (p.mask_kind != kNoMask || i0 + rows > p.Sq || j0 + cols > p.Sk) return false;
  if (p.left >= 0 && j0 < i0 + rows - 1 - p.left) return false;
  if (p.right >= 0 && j0 + cols - 1 > i0 + p.right) return false;
  return true;
}

// Dropout: true when probability (b, h, i, j) is kept (the CPU kernels' hash). Out of line, as
// masked_score.
LLMFAST_DEVICE_NOINLINE bool dropout_keep(const Params& p, uint64_t seed, int64_t b, int64_t h, int64_t i,
                                 int64_t j) {
  uint64_t x = seed + 0x9E3779B97F4A7C15ull *
                          (static_cast<uint64_t>(((b * p.Hq + h) * p.Sq + i) * p.Sk + j) + 1);
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
  return u >= p.dropout_p;
}

// The keys [lo, hi) that queries [i0, i1) may see under the band (and the queries that keys
// [j0, j1) may be seen by).
LLMFAST_DEVICE void band_keys(const Params& p, int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) {
  lo = p.left >= 0 ? (i0 - p.left > 0 ? i0 - p.left : 0) : 0;
  hi = p.right >= 0 ? (i1 + p.right < p.Sk ? i1 + p.right : p.Sk) : p.Sk;
}
LLMFAST_DEVICE void band_queries(const Params& p, int64_t j0, int64_t j1, int64_t& lo,
                                 int64_t& hi) {
  lo = p.right >= 0 ? (j0 - p.right > 0 ? j0 - p.right : 0) : 0;
  hi = p.left >= 0 ? (j1 + p.left < p.Sq ? j1 + p.left : p.Sq) : p.Sq;
}

// --- forward ---------------------------------------------------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<T, kD>::kM * 2)
    attention_fwd_kernel(const LLMFAST_GRID_CONSTANT Params p) {
  using Cfg = Tiles<T, kD>;
  constexpr int kMT = Cfg::kFwdMT, kM = Cfg::kFwdM, kN = Cfg::kN, kLd = Cfg::kLd;
  constexpr int kThreads = Cfg::kM * 2, kStages = Cfg::kStages;
  LLMFAST_DYNAMIC_SHARED(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  const KeyValueTiles<T, kN, kD, kThreads> kv{sQ + kM * kLd};

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y, bh = b * p.Hq + h, hk = h / p.G;
  // The last query tiles first: under a causal mask they see the most keys.
  const int64_t i0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kM;
  const int rows = static_cast<int>(p.Sq - i0 < kM ? p.Sq - i0 : kM);
  const uint64_t seed = p.dropout_p > 0.f ? static_cast<uint64_t>(*p.seed) : 0;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];

  int64_t jlo, jhi;
  band_keys(p, i0, i0 + rows, jlo, jhi);
  const int64_t j_first = (jlo / kN) * kN;
  const int64_t steps = jhi > j_first ? (jhi - j_first + kN - 1) / kN : 0;
  auto load_step = [&](int64_t step, int stage) { kv.load(p, k, v, j_first + step * kN, stage); };
  load_tile<T, kM, kD, kThreads>(sQ, kLd, q + i0 * p.q_stride[2], p.q_stride[2], rows, p.D, p.q_vec);
  if (kStages == 2 && steps > 0) load_step(0, 0);
  device::async_commit();

  // Row statistics and O for this thread's rows: row tile mt, half r (the C fragment's rows g
  // and g + 8) is query row0 + 16 mt + 8 r.
  float m[kMT][2], l[kMT][2];
  float acc[kMT][kD / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    m[mt][0] = m[mt][1] = -kInf;
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int n = 0; n < kD / 8; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
  }
  mma::FragA<T> qf[kMT][Cfg::kQInRegisters ? kD / 16 : 1];
  const T* sQw = sQ + warp * 16 * kMT * kLd;        // this warp's query rows
  const int64_t row0 = i0 + warp * 16 * kMT + g;

  for (int64_t step = 0; step < steps; ++step) {
    const int stage = begin_step<kStages>(step, steps, load_step);
    const int64_t j0 = j_first + step * kN;

    float s[kMT][kN / 8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int n = 0; n < kN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
    }
    if constexpr (Cfg::kQInRegisters) {
      if (step == 0) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int kk = 0; kk < kD / 16; ++kk) mma::load_a_tile(qf[mt][kk], sQw + mt * 16 * kLd + kk * 16, kLd, lane);
        }
      }
      mma::warp_gemm_abt<T, kMT, kN, kD>(s, qf, kv.keys(stage), kLd, lane);
    } else {
      mma::warp_gemm_abt<T, kMT, kN, kD>(s, sQw, kLd, kv.keys(stage), kLd, lane);
    }

    const bool clear = tile_is_clear(p, i0, kM, j0, kN);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float th;
          const float y = scaled_score(p, s[mt][n][e], th);
          s[mt][n][e] = clear ? y
                              : masked_score(p, y, b, h, row0 + mt * 16 + (e >> 1) * 8, j0 + n * 8 + 2 * t + (e & 1));
        }
      }
    }
    // Online softmax, one row per half of each C fragment; the 4 lanes of a quad share a row.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -kInf;
#pragma unroll
        for (int n = 0; n < kN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
        const float m_new = fmaxf(m[mt][r], mx);
        const float m_use = m_new == -kInf ? 0.f : m_new;  // nothing visible yet: keep zeros
        const float alpha = exp2f((m[mt][r] - m_use) * kLog2e);
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            s[mt][n][e] = exp2f((s[mt][n][e] - m_use) * kLog2e);
            sum += s[mt][n][e];
          }
        }
        l[mt][r] = l[mt][r] * alpha + sum;  // per-lane partial sum; the quad is summed at the end
        m[mt][r] = m_new;
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
          acc[mt][n][2 * r] *= alpha;
          acc[mt][n][2 * r + 1] *= alpha;
        }
      }
    }
    if (p.dropout_p > 0.f) {  // the denominator above counts dropped entries too
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t i = row0 + mt * 16 + (e >> 1) * 8, j = j0 + n * 8 + 2 * t + (e & 1);
            const bool keep = i < p.Sq && j < p.Sk && dropout_keep(p, seed, b, h, i, j);
            s[mt][n][e] = keep ? s[mt][n][e] * p.keep_scale : 0.f;
          }
        }
      }
    }
    mma::warp_gemm_pb<T, kMT, kD, kN>(acc, s, kv.values(stage), kLd, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  device::async_wait<0>();  // (no key tile: the Q copy may still be in flight)

  T* out = static_cast<T*>(p.out) + bh * p.Sq * p.Dv;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = l[mt][r];
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 1);
      sum += __shfl_xor_sync(0xFFFFFFFFu, sum, 2);
      const int64_t i = row0 + mt * 16 + r * 8;
      if (i < p.Sq) {
        // sum is 0 only for a fully masked row; NaN or +inf scores make it NaN, which must
        // propagate to the output and lse as in torch (not read as "fully masked").
        const float inv = sum != 0.f ? 1.f / sum : 0.f;
#pragma unroll
        for (int n = 0; n < kD / 8; ++n) {
          store_pair(out + i * p.Dv, n * 8 + 2 * t, p.Dv, acc[mt][n][2 * r] * inv, acc[mt][n][2 * r + 1] * inv);
        }
        if (t == 0) p.lse[bh * p.Sq + i] = sum != 0.f ? m[mt][r] + logf(sum) : -kInf;
      }
    }
  }
}

// --- backward: delta = rowsum(dO * O) - dlse, one warp a row --------------------------------
template <typename T>
__global__ void __launch_bounds__(256) attention_delta_kernel(const LLMFAST_GRID_CONSTANT Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Sq;
  if (row < rows) {  // uniform across the warp
    const int64_t bh = row / p.Sq, i = row % p.Sq, b = bh / p.Hq, h = bh % p.Hq;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] +
                    i * p.do_stride[2];
    const T* out = static_cast<const T*>(p.out) + row * p.Dv;
    float sum = 0.f;
    for (int e = lane; e < p.Dv; e += 32) {
      sum += mma::Element<T>::to_float(dout[e]) * mma::Element<T>::to_float(out[e]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);
    if (lane == 0) p.delta[row] = sum - (p.grad_lse != nullptr ? p.grad_lse[row] : 0.f);
  }
}

// The lse a backward kernel subtracts: +inf for rows past the end and rows that saw no key,
// so that exp(s - lse) is 0 for them.
LLMFAST_DEVICE float lse_for_backward(const Params& p, int64_t bh, int64_t i) {
  if (i >= p.Sq) return kInf;
  const float x = p.lse_in[bh * p.Sq + i];
  return x == -kInf ? kInf : x;
}

// The gradient of one score from its raw product (recomputed), dP and the row's lse / delta:
// returns dS (the additive mask's gradient) and sets pd (the dropped, rescaled probability,
// the dV weight) and dsr (dS times d score / d raw, the dQ / dK weight).
LLMFAST_DEVICE float score_grad(const Params& p, uint64_t seed, bool clear, float raw, float dp,
                                float lse, float delta, int64_t b, int64_t h, int64_t i,
                                int64_t j, float& pd, float& dsr) {
  float th;
  float y = scaled_score(p, raw, th);
  if (!clear) y = masked_score(p, y, b, h, i, j);
  const float prob = exp2f((y - lse) * kLog2e);  // 0 where y = -inf or lse = +inf
  pd = prob;
  if (p.dropout_p > 0.f) {
    if (prob != 0.f && dropout_keep(p, seed, b, h, i, j)) {
      pd *= p.keep_scale;
      dp *= p.keep_scale;
    } else {
      pd = 0.f;
      dp = 0.f;
    }
  }
  const float ds = prob * (dp - delta);
  dsr = ds * p.scale;
  if (p.softcap > 0.f) dsr *= 1.f - th * th;
  return ds;
}

// --- backward: dQ (and the mask gradient) ----------------------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<T, kD>::kM * 2)
    attention_bwd_dq_kernel(const LLMFAST_GRID_CONSTANT Params p) {
  using Cfg = Tiles<T, kD>;
  constexpr int kM = Cfg::kM, kN = Cfg::kN, kLd = Cfg::kLd, kThreads = kM * 2;
  constexpr int kStages = Cfg::kStages;
  LLMFAST_DYNAMIC_SHARED(smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kM * kLd;
  const KeyValueTiles<T, kN, kD, kThreads> kv{sdO + kM * kLd};

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, h = blockIdx.y, bh = b * p.Hq + h, hk = h / p.G;
  const int64_t i0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kM;
  const int rows = static_cast<int>(p.Sq - i0 < kM ? p.Sq - i0 : kM);
  const uint64_t seed = p.dropout_p > 0.f ? static_cast<uint64_t>(*p.seed) : 0;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];

  int64_t jlo, jhi;
  band_keys(p, i0, i0 + rows, jlo, jhi);
  const int64_t j_first = (jlo / kN) * kN;
  const int64_t steps = jhi > j_first ? (jhi - j_first + kN - 1) / kN : 0;
  auto load_step = [&](int64_t step, int stage) { kv.load(p, k, v, j_first + step * kN, stage); };
  load_tile<T, kM, kD, kThreads>(sQ, kLd, q + i0 * p.q_stride[2], p.q_stride[2], rows, p.D, p.q_vec);
  load_tile<T, kM, kD, kThreads>(sdO, kLd, dout + i0 * p.do_stride[2], p.do_stride[2], rows, p.Dv,
                                 p.do_vec);
  if (kStages == 2 && steps > 0) load_step(0, 0);
  device::async_commit();

  const int64_t row0 = i0 + warp * 16 + g;
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row0 + r * 8;
    lse[r] = lse_for_backward(p, bh, i);
    delta[r] = i < p.Sq ? p.delta[bh * p.Sq + i] : 0.f;
  }
  float acc[1][kD / 8][4];
#pragma unroll
  for (int n = 0; n < kD / 8; ++n) acc[0][n][0] = acc[0][n][1] = acc[0][n][2] = acc[0][n][3] = 0.f;

  for (int64_t step = 0; step < steps; ++step) {
    const int stage = begin_step<kStages>(step, steps, load_step);
    const int64_t j0 = j_first + step * kN;

    float s[1][kN / 8][4], dp[1][kN / 8][4];
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][n][e] = dp[0][n][e] = 0.f;
    }
    mma::warp_gemm_abt<T, 1, kN, kD>(s, sQ + warp * 16 * kLd, kLd, kv.keys(stage), kLd, lane);
    mma::warp_gemm_abt<T, 1, kN, kD>(dp, sdO + warp * 16 * kLd, kLd, kv.values(stage), kLd, lane);

    const bool clear = tile_is_clear(p, i0, kM, j0, kN);
#pragma unroll
    for (int n = 0; n < kN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t i = row0 + r * 8, j = j0 + n * 8 + 2 * t + (e & 1);
        float pd, dsr;
        const float ds = score_grad(p, seed, clear, s[0][n][e], dp[0][n][e], lse[r], delta[r], b, h, i, j, pd, dsr);
        if (p.dmask != nullptr && i < p.Sq && j < p.Sk) p.dmask[(bh * p.Sq + i) * p.Sk + j] = ds;
        s[0][n][e] = dsr;
      }
    }
    mma::warp_gemm_pb<T, 1, kD, kN>(acc, s, kv.keys(stage), kLd, lane);  // dQ += dS K
    __syncthreads();
  }
  device::async_wait<0>();

  T* dq = static_cast<T*>(p.dq) + bh * p.Sq * p.D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row0 + r * 8;
    if (i < p.Sq) {
#pragma unroll
      for (int n = 0; n < kD / 8; ++n) {
        store_pair(dq + i * p.D, n * 8 + 2 * t, p.D, acc[0][n][2 * r], acc[0][n][2 * r + 1]);
      }
    }
  }
}

// --- backward: fused dQ, one step of the dK/dV kernel -------------------------------------------
// ds[0][n] holds this warp's rows of dS^T (16 keys x kQ queries, C fragments, already times
// d score / d raw). The block's dS^T goes to shared memory; then warp w multiplies the queries
// 16 (w % kQB) .. + 15 of the tile (A = dS, read transposed) by the block's keys (B = K) for
// the head-dim columns of its part (w / kQB, when there are more warps than 16-query blocks)
// and adds the result into dq_accum. Calls __syncthreads (uniformly: a block-wide condition).
template <typename T, int kD, int kKeys, int kQ, int kCols>
LLMFAST_DEVICE void fused_dq_step(const Params& p, const float (&ds)[1][kQ / 8][4], T* sdS, const T* sK,
                                  int64_t bh, int64_t i0, int col0, int warp, int lane) {
  constexpr int kLdS = Tiles<T, kD>::kLdS, kLd = Tiles<T, kD>::kLd;
  constexpr int kWarps = kKeys / 16, kQB = kQ / 16, kParts = kWarps / kQB;
  static_assert(kKeys >= kQ && kWarps % kQB == 0, "every 16-query block needs whole warps");
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < kQ / 8; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      LLMFAST_CHECK_ALIGNED(sdS + (warp * 16 + g + 8 * r) * kLdS + n * 8 + 2 * t, 4, "32-bit shared store");
      *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8 * r) * kLdS + n * 8 + 2 * t) =
          mma::Element<T>::pack(ds[0][n][2 * r], ds[0][n][2 * r + 1]);
    }
  }
  __syncthreads();
  const int qb = warp % kQB, part = warp / kQB;
  float* dq = p.dq_accum + (bh * p.Sq + i0 + qb * 16) * p.D;
  // pairs of 8-column n-tiles, over this block's columns [col0, col0 + kCols)
#pragma unroll 1
  for (int np = col0 / 16 + part; np < (col0 + kCols) / 16; np += kParts) {
    if (np * 16 >= p.D) break;  // padding columns: nothing to add
    float c[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      mma::FragA<T> a;
      mma::FragB<T> b0, b1;
      mma::ldmatrix_a_trans(a, sdS + kk * 16 * kLdS + qb * 16, kLdS, lane);
      mma::ldmatrix_b_kn(b0, b1, sK + kk * 16 * kLd + np * 16, kLd, lane);
      mma::mma_16x8x16(c[0], a, b0, lane);
      mma::mma_16x8x16(c[1], a, b1, lane);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = qb * 16 + g + 8 * r;
      if (i0 + row >= p.Sq) continue;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = np * 16 + j * 8 + 2 * t;
        float* dst = dq + (g + 8 * r) * p.D + col;
        if ((p.D & 1) == 0 && col + 1 < p.D) {  // rows of even length: the pair is 8-byte aligned
          device::atomic_add_pair(dst, c[j][2 * r], c[j][2 * r + 1]);
        } else {
          if (col < p.D) device::atomic_add(dst, c[j][2 * r]);
          if (col + 1 < p.D) device::atomic_add(dst + 1, c[j][2 * r + 1]);
        }
      }
    }
  }
}

// --- backward: dK and dV ---------------------------------------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<T, kD>::kKeys * 2)
    attention_bwd_dkdv_kernel(const LLMFAST_GRID_CONSTANT Params p) {
  using Cfg = Tiles<T, kD>;
  constexpr int kKeys = Cfg::kKeys, kQ = Cfg::kQueries, kLd = Cfg::kLd, kThreads = kKeys * 2;
  constexpr int kStages = Cfg::kStages;
  constexpr int kCols = Cfg::kDkdvCols, kSplits = Cfg::kDkdvSplits;
  LLMFAST_DYNAMIC_SHARED(smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kKeys * kLd;
  T* sQdO = sV + kKeys * kLd;  // stage s: queries at sQdO + 2 s kQ kLd, their dO kQ kLd further
  float* sStats = reinterpret_cast<float*>(sQdO + kStages * 2 * kQ * kLd);  // stage s: lse, delta
  T* sdS = reinterpret_cast<T*>(sStats + kStages * 2 * kQ);                  // (kKeys, kLdS)
  auto queries = [&](int stage) { return sQdO + stage * 2 * kQ * kLd; };
  auto grads = [&](int stage) { return sQdO + (stage * 2 + 1) * kQ * kLd; };
  auto lses = [&](int stage) { return sStats + stage * 2 * kQ; };
  auto deltas = [&](int stage) { return sStats + stage * 2 * kQ + kQ; };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int64_t b = blockIdx.z, hk = blockIdx.y, bhk = b * p.Hkv + hk;
  // Blocks kSplits * kb .. kSplits * kb + kSplits - 1 share key block kb; this one accumulates
  // dK and dV columns [col0, col0 + kCols).
  const int64_t j0 = static_cast<int64_t>(blockIdx.x / kSplits) * kKeys;
  const int col0 = static_cast<int>(blockIdx.x % kSplits) * kCols;
  const int nkeys = static_cast<int>(p.Sk - j0 < kKeys ? p.Sk - j0 : kKeys);
  const uint64_t seed = p.dropout_p > 0.f ? static_cast<uint64_t>(*p.seed) : 0;

  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  load_tile<T, kKeys, kD, kThreads>(sK, kLd, k + j0 * p.k_stride[2], p.k_stride[2], nkeys, p.D, p.k_vec);
  load_tile<T, kKeys, kD, kThreads>(sV, kLd, v + j0 * p.v_stride[2], p.v_stride[2], nkeys, p.Dv, p.v_vec);

  // The steps: every query tile of the band, for every query head of this kv head's group.
  int64_t ilo, ihi;
  band_queries(p, j0, j0 + nkeys, ilo, ihi);
  const int64_t i_first = (ilo / kQ) * kQ;
  const int64_t tiles = ihi > i_first ? (ihi - i_first + kQ - 1) / kQ : 0;
  const int64_t steps = tiles * p.G;
  auto load_step = [&](int64_t step, int stage) {  // Q and dO by cp.async; lse and delta stored
    const int64_t h = hk * p.G + step / tiles, bh = b * p.Hq + h;
    const int64_t i0 = i_first + static_cast<int64_t>(step % tiles) * kQ;
    const int rows = static_cast<int>(p.Sq - i0 < kQ ? p.Sq - i0 : kQ);
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i0 * p.q_stride[2];
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + i0 * p.do_stride[2];
    load_tile<T, kQ, kD, kThreads>(queries(stage), kLd, q, p.q_stride[2], rows, p.D, p.q_vec);
    load_tile<T, kQ, kD, kThreads>(grads(stage), kLd, dout, p.do_stride[2], rows, p.Dv, p.do_vec);
    for (int r = tid; r < kQ; r += kThreads) {
      lses(stage)[r] = lse_for_backward(p, bh, i0 + r);
      deltas(stage)[r] = i0 + r < p.Sq ? p.delta[bh * p.Sq + i0 + r] : 0.f;
    }
  };
  if (kStages == 2 && steps > 0) load_step(0, 0);
  device::async_commit();

  float dk[1][kCols / 8][4], dv[1][kCols / 8][4];
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[0][n][e] = dv[0][n][e] = 0.f;
  }
  const int64_t key0 = j0 + warp * 16 + g;  // this thread's keys: key0 and key0 + 8
  for (int64_t step = 0; step < steps; ++step) {
    const int stage = begin_step<kStages>(step, steps, load_step);
    const int64_t h = hk * p.G + step / tiles;
    const int64_t i0 = i_first + static_cast<int64_t>(step % tiles) * kQ;
    const T* sQ = queries(stage);
    const T* sdO = grads(stage);
    const float* sLse = lses(stage);
    const float* sDelta = deltas(stage);

    // Transposed scores: rows are this warp's 16 keys, columns the tile's queries.
    float s[1][kQ / 8][4], dp[1][kQ / 8][4];
#pragma unroll
    for (int n = 0; n < kQ / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][n][e] = dp[0][n][e] = 0.f;
    }
    mma::warp_gemm_abt<T, 1, kQ, kD>(s, sK + warp * 16 * kLd, kLd, sQ, kLd, lane);
    mma::warp_gemm_abt<T, 1, kQ, kD>(dp, sV + warp * 16 * kLd, kLd, sdO, kLd, lane);

    const bool clear = tile_is_clear(p, i0, kQ, j0, kKeys);
#pragma unroll
    for (int n = 0; n < kQ / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + 2 * t + (e & 1);
        const int64_t j = key0 + (e >> 1) * 8, i = i0 + c;
        float pd, dsr;
        score_grad(p, seed, clear, s[0][n][e], dp[0][n][e], sLse[c], sDelta[c], b, h, i, j, pd, dsr);
        s[0][n][e] = pd;
        dp[0][n][e] = dsr;
      }
    }
    mma::warp_gemm_pb<T, 1, kCols, kQ>(dv, s, sdO + col0, kLd, lane);  // dV += P^T dO
    mma::warp_gemm_pb<T, 1, kCols, kQ>(dk, dp, sQ + col0, kLd, lane);  // dK += dS^T Q
    if constexpr (Cfg::kFusedDq) {
      if (p.dq_accum != nullptr) {
        fused_dq_step<T, kD, kKeys, kQ, kCols>(p, dp, sdS, sK, b * p.Hq + h, i0, col0, warp, lane);
      }
    }
    __syncthreads();
  }
  device::async_wait<0>();

  T* dkp = static_cast<T*>(p.dk) + bhk * p.Sk * p.D;
  T* dvp = static_cast<T*>(p.dv) + bhk * p.Sk * p.Dv;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = key0 + r * 8;
    if (j < p.Sk) {
#pragma unroll
      for (int n = 0; n < kCols / 8; ++n) {
        store_pair(dkp + j * p.D, col0 + n * 8 + 2 * t, p.D, dk[0][n][2 * r], dk[0][n][2 * r + 1]);
        store_pair(dvp + j * p.Dv, col0 + n * 8 + 2 * t, p.Dv, dv[0][n][2 * r], dv[0][n][2 * r + 1]);
      }
    }
  }
}

}  // namespace attention
}  // namespace llmfast
