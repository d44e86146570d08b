// CPU kernels of llmfast::attention_fwd / llmfast::attention_bwd: tiled FlashAttention on the
// CPU, never materialising the (Sq, Sk) score matrix. The contract is in attention_ops.cpp; the
// math is llmfast/reference/attention.py.
//
// Forward: the query tile (64 or 128 queries) is widened to fp32 once; key/value tiles of
// kBlockN keys stream past (the tile products go through ATen's fp32 brgemm micro-kernel, or
// vectorizable loops where this torch build has none), with the online softmax
//     s = softcap(scale q k^T) (+ mask), m_new = max(m, rowmax s), p = exp(s - m_new)
//     l = l exp(m - m_new) + rowsum p,   acc = acc exp(m - m_new) + dropout(p) v
// and out = acc / l, lse = m + log l (fp32). Rows with no visible key keep l = 0: out = 0 and
// lse = -inf. Key tiles entirely outside the causal band / window are skipped. The row loops
// (max, exp and sum, rescaling) are compiled for AVX2 too, with a polynomial exp
// (cpu_utils.h: exp_nonpositive), not libm's scalar one. Tasks (use_head_tasks): one per
// (batch, kv head) when there are enough of those for the threads (its K and V widened
// and transposed once, then every query tile of its query heads), else one per (batch, query
// head, query tile) (K and V widened per tile). Up to kFewQueries (16) queries (decoding) the
// scores come from the key rows themselves (no transposed copy; fp32 rows read in place), and
// the query heads of a grouped-query group share one tile, so the cache is read once a group.
// Every plan gives the same bits for a given problem: results do not depend on the threads.
// Backward (no atomics, deterministic): delta = rowsum(dO O) - dlse first, then for every
// visible (query tile, key tile) P = exp(s - lse) is recomputed and
//     dV += P^T dO;  dP = dO V^T;  dS = P (dP - delta);  dK += scale dS^T Q;  dQ += scale dS K
// (times 1 - tanh^2 under softcap; with dropout P and dP of kept entries are scaled by
// 1 / (1 - dropout_p), dropped ones are zero). Two plans (use_head_tasks), bitwise equal:
// - single pass, when there are enough (batch, kv head) pairs for the threads: one task per
//   pair computes P and dS of each tile once, completes dQ per query tile and accumulates
//   dK, dV over the whole key sequence in fp32 (2 products per tile fewer than below);
// - two passes (FlashAttention-2's partitioning, for few heads on many threads): tasks that own
//   kBlockN keys of one (batch, kv head) loop over the query tiles of every query head of its
//   group (dK, dV, GQA summed in the task), then tasks that own kBlockM queries (dQ).
// The mask gradient, when an additive mask asks for one, is dS itself: the only case that
// writes a (B, Hq, Sq, Sk) tensor. Dropout draws a counter-based hash of (seed, batch, head,
// query, key), so the backward redraws the forward's pattern without storing it.
//
// Memory traffic: the forward reads Q once and K, V once per task (per query tile in per-tile
// tasks), writes O and lse once;
// the backward reads K, V once per task (single pass) or once per query tile per pass, and Q,
// dO once per key tile (two passes), writes dQ, dK, dV once. A mask is read once per visited
// tile element (any strides, so a key-padding mask (B, 1, 1, Sk) expanded to (B, Hq, Sq, Sk)
// costs no copy). Offsets are 64-bit. Working memory per task is a few tiles of fp32 (tens of
// KB at D = 128), plus, in per-head tasks, fp32 copies of one head's K and V and its dK, dV
// accumulators (at most 64 MiB, else the per-tile tasks run).
//
// Build note: at::parallel_for runs on several threads only with -fopenmp (see setup.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attention/attention_problem.h"
#include "common/checks.h"
#include "common/cpu_utils.h"

namespace llmfast {
namespace cpu_simd {

// The per-element loops of the tiles, compiled for AVX2 and the baseline (cpu_utils.h).

// max(init, max_j s[j]); NaNs are skipped (as std::max(acc, s[j]) skips them).
LLMFAST_SIMD_CLONES float attn_row_max(const float* s, int64_t n, float init) {
  return lane_max<16>(n, [&](int64_t j) { return s[j]; }, init);
}

// s[j] = exp(s[j] - m) in place, for m >= every s[j]; returns sum_j s[j].
LLMFAST_SIMD_CLONES float attn_exp_sum(float* s, int64_t n, float m) {
  for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - m);
  return lane_sum<16>(n, [&](int64_t j) { return s[j]; });
}

// a[j] *= c.
LLMFAST_SIMD_CLONES void attn_scale(float* a, int64_t n, float c) {
  for (int64_t j = 0; j < n; ++j) a[j] *= c;
}

// One row of the backward's tile without dropout or softcap: p = exp(s - lse) (pd = p),
// ds = p (dp - delta) written over dp, dsr = scale ds.
LLMFAST_SIMD_CLONES void attn_grad_row(const float* s, float* ds, float* pd, float* dsr,
                                       int64_t n, float lse, float delta, float scale) {
  for (int64_t j = 0; j < n; ++j) {
    const float pj = exp_nonpositive(s[j] - lse);  // 0 where s = -inf
    const float g = pj * (ds[j] - delta);
    pd[j] = pj;
    ds[j] = g;
    dsr[j] = g * scale;
  }
}

// s[r * lds + j] = sum_d q[r * D + d] * k[j * ldk + d] for r < ni, j < nj: the scores of a
// few queries read straight from the key rows (no transposed copy of K).
LLMFAST_SIMD_CLONES void attn_scores_from_rows(const float* q, int64_t ni, int64_t D,
                                               const float* k, int64_t ldk, int64_t nj,
                                               float* s, int64_t lds) {
  for (int64_t j = 0; j < nj; ++j) {
    const float* kr = k + j * ldk;
    for (int64_t r = 0; r < ni; ++r) {
      const float* qr = q + r * D;
      s[r * lds + j] = lane_sum<16>(D, [&](int64_t d) { return qr[d] * kr[d]; });
    }
  }
}

}  // namespace cpu_simd

namespace {

constexpr const char* kFwd = "llmfast::attention_fwd";
constexpr const char* kBwd = "llmfast::attention_bwd";
constexpr int64_t kBlockM = 64;  // queries per tile (backward; the forward's least)
constexpr int64_t kMaxBlockMFwd = 128;  // queries per forward tile, at most
constexpr int64_t kBlockN = 64;  // keys per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using attention::Problem;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tile that task i of n runs: 0, n-1, 1, n-2, ... Under a causal mask or a window, tiles
// at one end of a sequence have less work than those at the other; at::parallel_for gives each
// thread a contiguous range of tasks, which this order balances.
int64_t zigzag(int64_t i, int64_t n) { return i % 2 == 0 ? i / 2 : n - 1 - i / 2; }

// ATen's fp32 brgemm (oneDNN's micro-kernel, single-threaded, safe inside at::parallel_for) when
// this torch build has a working one, checked once on a small product; otherwise (or with
// LLMFAST_ATTENTION_GEMM=loops) plain loops that the compiler vectorizes.
bool use_brgemm() {
  static const bool ok = [] {
    const char* env = std::getenv("LLMFAST_ATTENTION_GEMM");
    if (env != nullptr && std::strcmp(env, "loops") == 0) return false;
    try {
      const float a[4] = {1.f, 2.f, 3.f, 4.f}, b[4] = {5.f, 6.f, 7.f, 8.f};
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, false);
      at::native::cpublas::brgemm_release();
      return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

// Row-major C (M x N, ld ldc) = A (M x K, ld lda) B (K x N, ld ldb), added to C when `add`.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool add) {
  if (M == 0 || N == 0) return;
  if (K > 0 && use_brgemm()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    if (!add) std::fill(c, c + N, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * lda + k];
      const float* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// dst (cols x rows, ld ldd) = src (rows x cols, ld lds) transposed.
void transpose(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst,
               int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// dst[r * ld + c] = src[r * rs + c * cs] for r < rows, c < cols (widened to fp32).
template <typename T>
void load_rows(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, float* dst,
               int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    float* d = dst + r * ld;
    if (cs == 1) {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c * cs]);
    }
  }
}

// dst[c * ld + r] = src[r * rs + c * cs]: a transposed tile (columns of length ld = kBlockN).
template <typename T>
void load_transposed(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols,
                     float* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = static_cast<float>(s[c * cs]);
  }
}

// K^T (or V^T) of keys [0, n) as tiles of width x kBlockN (one per kBlockN keys), in dst.
template <typename T>
void load_transposed_tiles(const T* src, int64_t rs, int64_t cs, int64_t n, int64_t width,
                           float* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += kBlockN) {
    load_transposed(src + j0 * rs, rs, cs, std::min(kBlockN, n - j0), width,
                    dst + (j0 / kBlockN) * width * kBlockN, kBlockN);
  }
}

// rows x cols of src as fp32 rows: fp32 rows of unit stride in place (*ld = rs), others
// widened into scratch (*ld = cols).
template <typename T>
const float* rows_as_float(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols,
                           float* scratch, int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (cs == 1) {
      *ld = rs;
      return src;
    }
  }
  load_rows(src, rs, cs, rows, cols, scratch, cols);
  *ld = cols;
  return scratch;
}

// Adds the mask row (b, h, i, j0 .. j0 + nj) to s (or sets -inf where a bool mask is false).
void apply_mask_row(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t nj,
                    float* s) {
  const int64_t off = b * p.ms[0] + h * p.ms[1] + i * p.ms[2] + j0 * p.ms[3];
  const int64_t st = p.ms[3];
  switch (p.mask_type) {
    case at::kBool: {
      const bool* m = static_cast<const bool*>(p.mask) + off;
      for (int64_t j = 0; j < nj; ++j) {
        if (!m[j * st]) s[j] = kNegInf;
      }
      break;
    }
    case at::kFloat: {
      const float* m = static_cast<const float*>(p.mask) + off;
      for (int64_t j = 0; j < nj; ++j) s[j] += m[j * st];
      break;
    }
    case at::kDouble: {
      const double* m = static_cast<const double*>(p.mask) + off;
      for (int64_t j = 0; j < nj; ++j) s[j] += static_cast<float>(m[j * st]);
      break;
    }
    case at::kHalf: {
      const at::Half* m = static_cast<const at::Half*>(p.mask) + off;
      for (int64_t j = 0; j < nj; ++j) s[j] += static_cast<float>(m[j * st]);
      break;
    }
    case at::kBFloat16: {
      const at::BFloat16* m = static_cast<const at::BFloat16*>(p.mask) + off;
      for (int64_t j = 0; j < nj; ++j) s[j] += static_cast<float>(m[j * st]);
      break;
    }
    default:
      TORCH_CHECK(false, "llmfast attention: unsupported attn_mask dtype ", p.mask_type);
  }
}

// The scores' scale (or softcap), mask and band, in place on a tile's raw products q k^T.
void finish_scores(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t ni, int64_t j0,
                   int64_t nj, float* s, float* th) {
  for (int64_t r = 0; r < ni; ++r) {
    float* srow = s + r * kBlockN;
    if (p.softcap > 0.f) {
      const float inv = p.scale / p.softcap;
      for (int64_t j = 0; j < nj; ++j) {
        const float t = std::tanh(srow[j] * inv);
        if (th != nullptr) th[r * kBlockN + j] = t;
        srow[j] = p.softcap * t;
      }
    } else {
      cpu_simd::attn_scale(srow, nj, p.scale);
    }
    const int64_t i = i0 + r;
    if (p.mask != nullptr) apply_mask_row(p, b, h, i, j0, nj, srow);
    if (p.left >= 0 || p.right >= 0) {
      // the row's band is the keys [i - left, i + right]: hide the tile's columns outside it
      const int64_t lo = p.left >= 0 ? std::clamp<int64_t>(i - p.left - j0, 0, nj) : 0;
      const int64_t hi = p.right >= 0 ? std::clamp<int64_t>(i + p.right + 1 - j0, 0, nj) : nj;
      std::fill(srow, srow + lo, kNegInf);
      std::fill(srow + std::max(lo, hi), srow + nj, kNegInf);
    }
  }
}

// Scores of query rows [i0, i0 + ni) (fp32 tile qf, ld D) against keys [j0, j0 + nj) (kt: the
// transposed key tile, ld kBlockN): s (ld kBlockN) = mask(softcap(scale q k^T)); th (if not
// null) gets tanh(scale q k^T / softcap) for the softcap backward.
void score_tile(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t ni, int64_t j0,
                int64_t nj, const float* qf, const float* kt, float* s, float* th) {
  gemm(ni, nj, p.D, qf, p.D, kt, kBlockN, s, kBlockN, false);
  finish_scores(p, b, h, i0, ni, j0, nj, s, th);
}

// --- per-head tasks ----------------------------------------------------------------------------
// When there are enough (batch, kv head) pairs for the threads, the forward and backward run
// one task per pair, which widens (and transposes) that head's K and V once instead of
// once per query tile. The tile products are the same either way, so are the results, bit for
// bit. LLMFAST_ATTENTION_CPU_TASKS=head / tile forces one plan (tests of both).
constexpr int64_t kMaxHeadTaskBytes = int64_t{64} << 20;

// fp32 floats of one head's packed K and V (pack_head) and of its dK, dV accumulators.
int64_t head_task_floats(const Problem& p) {
  return cdiv(p.Sk, kBlockN) * kBlockN * (p.D + p.Dv) + p.Sk * (2 * p.D + 2 * p.Dv);
}

// Per-head tasks when they keep the threads busy enough (at least 3/4 of the time for the
// backward, whose single pass does about 30% less work than the per-tile plan's; 9/10 for the
// forward, which saves only the repeated widening of K and V) and their working memory is small.
bool use_head_tasks(const Problem& p, bool backward) {
  const char* env = std::getenv("LLMFAST_ATTENTION_CPU_TASKS");
  if (env != nullptr && std::strcmp(env, "head") == 0) return true;
  if (env != nullptr && std::strcmp(env, "tile") == 0) return false;
  const int64_t tasks = p.B * p.Hkv, threads = at::get_num_threads();
  const int64_t busy = tasks * (backward ? 4 : 10);
  const int64_t needed = cdiv(tasks, threads) * threads * (backward ? 3 : 9);
  return tasks >= threads && busy >= needed && 4 * head_task_floats(p) <= kMaxHeadTaskBytes;
}

// Widens the K and V of (batch b, kv head hk) into `buf`, in the layouts asked for (a null
// output pointer: not wanted): kt_all, tiles of D x kBlockN (K^T, the score products' right
// operand); vf_all, Sk x Dv (V rows); vt_all, tiles of Dv x kBlockN (V^T); kf_all, Sk x D.
template <typename T>
void pack_head(const Problem& p, int64_t b, int64_t hk, std::vector<float>& buf, float** kt_all,
               float** vf_all, float** vt_all, float** kf_all) {
  const int64_t D = p.D, Dv = p.Dv, Sk = p.Sk, tiled = cdiv(Sk, kBlockN) * kBlockN;
  buf.resize((kt_all ? tiled * D : 0) + (vf_all ? Sk * Dv : 0) + (vt_all ? tiled * Dv : 0) +
             (kf_all ? Sk * D : 0));
  float* x = buf.data();
  const T* kbase = static_cast<const T*>(p.k) + b * p.ks[0] + hk * p.ks[1];
  const T* vbase = static_cast<const T*>(p.v) + b * p.vs[0] + hk * p.vs[1];
  if (kt_all != nullptr) {
    *kt_all = x;
    x += tiled * D;
    load_transposed_tiles(kbase, p.ks[2], p.ks[3], Sk, D, *kt_all);
  }
  if (vf_all != nullptr) {
    *vf_all = x;
    x += Sk * Dv;
    load_rows(vbase, p.vs[2], p.vs[3], Sk, Dv, *vf_all, Dv);
  }
  if (vt_all != nullptr) {
    *vt_all = x;
    x += tiled * Dv;
    load_transposed_tiles(vbase, p.vs[2], p.vs[3], Sk, Dv, *vt_all);
  }
  if (kf_all != nullptr) {
    *kf_all = x;
    load_rows(kbase, p.ks[2], p.ks[3], Sk, D, *kf_all, D);
  }
}

// --- forward ---------------------------------------------------------------------------------
// Queries per forward tile: in per-tile tasks a key tile is widened and transposed once per
// query tile, so taller query tiles cost less of that per product (128 rows: 5-10% faster than
// 64 on this project's CPU; 256 slower under a causal mask), as long as there are tasks for
// every thread. The choice does not change a bit of the result: a row's keys are visited in the
// same tiles, and tiles outside its band add exact zeros. LLMFAST_ATTENTION_CPU_BLOCK_M (1 to
// 1024) forces it, for the tests that check this.
int64_t forward_block_m(const Problem& p) {
  if (const char* env = std::getenv("LLMFAST_ATTENTION_CPU_BLOCK_M")) {
    const int64_t forced = std::atoll(env);
    TORCH_CHECK(forced >= 1 && forced <= 1024,
                "llmfast: LLMFAST_ATTENTION_CPU_BLOCK_M must be 1 to 1024, got '", env, "'");
    return forced;
  }
  const int64_t threads = at::get_num_threads();
  int64_t bm = kMaxBlockMFwd;
  while (bm > kBlockM && p.B * p.Hq * cdiv(p.Sq, bm) < 4 * threads) bm /= 2;
  return bm;
}

// Up to this many queries (decoding, speculative decoding), the forward reads K by rows
// instead of transposing it (a transposed copy would cost as much as the few products), and
// fp32 K and V rows in place: 1 x 32 heads x 4096 keys x 128 decoding, fp32, 2 threads on
// this project's CPU: 17 ms before, 7-9 ms after, torch 9-10 ms.
constexpr int64_t kFewQueries = 16;

// Working memory of a forward task, in floats.
int64_t forward_buffer_size(const Problem& p, int64_t bm) {
  return bm * p.D + p.D * kBlockN + kBlockN * p.Dv + bm * kBlockN + bm * p.Dv + 2 * bm +
         bm * p.D + kBlockN * bm;  // (bm: rows of the tile)
}

// One forward task's rows: queries [qb * bm, +bm) of query head h, or, with heads > 1 (a few
// queries of grouped-query attention: Sq <= kFewQueries, qb = 0), all Sq queries of query heads
// h .. h + heads - 1, which share one kv head: their rows are stacked into one tile, so the
// keys and values are read once for the group. out / lse point at the first row; the rows of
// consecutive heads are consecutive in the outputs. kt_all / vf_all: the head's packed K^T
// tiles and V rows (pack_head), or null to read them here.
template <typename T>
void fwd_tile(const Problem& p, int64_t b, int64_t h, int64_t heads, int64_t qb, int64_t bm,
              T* out, float* lse, std::vector<float>& buf, const float* kt_all,
              const float* vf_all) {
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t i0 = qb * bm, nh = std::min(bm, p.Sq - i0);  // queries per head
  const int64_t ni = nh * heads;                               // rows of the tile
  const int64_t hk = h / p.G;
  const int64_t cap = std::max(bm, ni);
  float* qf = buf.data();                // cap x D
  float* kt = qf + cap * D;              // D x kBlockN
  float* vf = kt + D * kBlockN;          // kBlockN x Dv
  float* s = vf + kBlockN * Dv;          // cap x kBlockN
  float* acc = s + cap * kBlockN;        // cap x Dv
  float* m = acc + cap * Dv;             // cap
  float* l = m + cap;                    // cap
  float* qt = l + cap;                   // D x ni (Q^T, few-query path)
  float* st = qt + cap * D;              // kBlockN x ni

  for (int64_t g = 0; g < heads; ++g) {
    const T* qp = static_cast<const T*>(p.q) + b * p.qs[0] + (h + g) * p.qs[1] + i0 * p.qs[2];
    load_rows(qp, p.qs[2], p.qs[3], nh, D, qf + g * nh * D, D);
  }
  const bool few = p.Sq <= kFewQueries && kt_all == nullptr;
  if (few && ni > 2) transpose(qf, D, ni, D, qt, ni);
  std::fill(acc, acc + ni * Dv, 0.f);
  std::fill(m, m + ni, kNegInf);
  std::fill(l, l + ni, 0.f);

  int64_t jlo, jhi;
  p.key_range(i0, i0 + nh, &jlo, &jhi);
  const T* kbase = static_cast<const T*>(p.k) + b * p.ks[0] + hk * p.ks[1];
  const T* vbase = static_cast<const T*>(p.v) + b * p.vs[0] + hk * p.vs[1];
  for (int64_t j0 = (jlo / kBlockN) * kBlockN; j0 < jhi; j0 += kBlockN) {
    const int64_t nj = std::min(kBlockN, p.Sk - j0);
    const float* vtile = vf;
    int64_t ldv = Dv;
    if (few) {  // few queries: K and V by rows, fp32 ones in place
      int64_t ldk;
      const float* kf = rows_as_float(kbase + j0 * p.ks[2], p.ks[2], p.ks[3], nj, D, kt, &ldk);
      if (ni <= 2) {  // dot products of the key rows (a product with N <= 2 wastes lanes)
        cpu_simd::attn_scores_from_rows(qf, ni, D, kf, ldk, nj, s, kBlockN);
      } else {  // S^T (nj x ni) = K Q^T, transposed into s (nj x ni: small)
        gemm(nj, ni, D, kf, ldk, qt, ni, st, ni, false);
        transpose(st, ni, nj, ni, s, kBlockN);
      }
      for (int64_t g = 0; g < heads; ++g) {
        finish_scores(p, b, h + g, i0, nh, j0, nj, s + g * nh * kBlockN, nullptr);
      }
      vtile = rows_as_float(vbase + j0 * p.vs[2], p.vs[2], p.vs[3], nj, Dv, vf, &ldv);
    } else if (kt_all != nullptr) {  // the head's K^T tiles and V rows, widened once by the task
      score_tile(p, b, h, i0, ni, j0, nj, qf, kt_all + (j0 / kBlockN) * D * kBlockN, s, nullptr);
      vtile = vf_all + j0 * Dv;
    } else {
      load_transposed(kbase + j0 * p.ks[2], p.ks[2], p.ks[3], nj, D, kt, kBlockN);
      load_rows(vbase + j0 * p.vs[2], p.vs[2], p.vs[3], nj, Dv, vf, Dv);
      score_tile(p, b, h, i0, ni, j0, nj, qf, kt, s, nullptr);
    }
    for (int64_t r = 0; r < ni; ++r) {
      float* srow = s + r * kBlockN;
      const float mx = cpu_simd::attn_row_max(srow, nj, m[r]);
      if (mx == kNegInf) {  // nothing visible yet: this tile adds nothing to the row
        // ... unless it holds NaN scores (std::max skips them): the row's result is NaN, as
        // torch's (a NaN query or mask entry must not read as "fully masked").
        for (int64_t j = 0; j < nj; ++j) {
          if (std::isnan(srow[j])) l[r] = std::numeric_limits<float>::quiet_NaN();
        }
        std::fill(srow, srow + nj, 0.f);
        continue;
      }
      const float alpha = std::exp(m[r] - mx);  // 0 when m was -inf
      const float sum = cpu_simd::attn_exp_sum(srow, nj, mx);
      l[r] = l[r] * alpha + sum;  // the softmax denominator counts dropped entries too
      m[r] = mx;
      if (alpha != 1.f) cpu_simd::attn_scale(acc + r * Dv, Dv, alpha);
      if (p.dropout_p > 0.f) {
        const int64_t hr = h + r / nh, ir = i0 + r % nh;
        for (int64_t j = 0; j < nj; ++j) {
          srow[j] = p.keep(b, hr, ir, j0 + j) ? srow[j] * p.keep_scale : 0.f;
        }
      }
    }
    gemm(ni, Dv, nj, s, kBlockN, vtile, ldv, acc, Dv, true);  // acc += dropout(p) v
  }
  for (int64_t r = 0; r < ni; ++r) {
    T* o = out + r * Dv;
    if (l[r] != 0.f) {  // 0 only for a fully masked row; NaN (NaN or +inf scores) propagates
      const float inv = 1.f / l[r];
      for (int64_t e = 0; e < Dv; ++e) o[e] = static_cast<T>(acc[r * Dv + e] * inv);
      lse[r] = m[r] + std::log(l[r]);
    } else {
      for (int64_t e = 0; e < Dv; ++e) o[e] = static_cast<T>(0.f);
      lse[r] = kNegInf;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p, const std::optional<at::Tensor>& seed) {
  const Problem p = attention::make_problem(kFwd, query, key, value, attn_mask, scale,
                                            window_left, window_right, softcap, dropout_p, seed,
                                            c10::DeviceType::CPU);
  at::Tensor out = at::empty({p.B, p.Hq, p.Sq, p.Dv}, query.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Sq}, query.options().dtype(at::kFloat));
  if (p.B * p.Hq * p.Sq == 0) return {out, lse};
  const int64_t bm = forward_block_m(p);
  const int64_t nqb = cdiv(p.Sq, bm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_fwd_cpu",
                                  [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    float* ls = lse.mutable_data_ptr<float>();
    if (p.Sq <= kFewQueries && p.G > 1) {
      // grouped-query decoding: the query heads of a kv head in one tile (up to 128 rows), so
      // that its keys and values are read once. The grouping depends on the problem only, not
      // on the thread count, and so do the results.
      const int64_t hpt = std::min<int64_t>(p.G, std::max<int64_t>(1, kMaxBlockMFwd / p.Sq));
      const int64_t chunks = cdiv(p.G, hpt);
      at::parallel_for(0, p.B * p.Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(forward_buffer_size(p, hpt * p.Sq));
        for (int64_t t = begin; t < end; ++t) {
          const int64_t c = t % chunks, bhk = t / chunks;
          const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
          const int64_t h = hk * p.G + c * hpt, heads = std::min(hpt, p.G - c * hpt);
          const int64_t row = (b * p.Hq + h) * p.Sq;
          fwd_tile<scalar_t>(p, b, h, heads, 0, p.Sq, o + row * p.Dv, ls + row, buf, nullptr,
                             nullptr);
        }
        if (use_brgemm()) at::native::cpublas::brgemm_release();
      });
      return;
    }
    if (p.Sq > kFewQueries && use_head_tasks(p, /*backward=*/false)) {
      at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(forward_buffer_size(p, bm));
        std::vector<float> kv;
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / p.Hkv, hk = t % p.Hkv;
          float* kt_all = nullptr;
          float* vf_all = nullptr;
          pack_head<scalar_t>(p, b, hk, kv, &kt_all, &vf_all, nullptr, nullptr);
          for (int64_t g = 0; g < p.G; ++g) {
            const int64_t bh = b * p.Hq + hk * p.G + g;
            for (int64_t qb = 0; qb < nqb; ++qb) {
              const int64_t row = bh * p.Sq + qb * bm;
              fwd_tile<scalar_t>(p, b, hk * p.G + g, 1, qb, bm, o + row * p.Dv, ls + row, buf,
                                 kt_all, vf_all);
            }
          }
        }
        if (use_brgemm()) at::native::cpublas::brgemm_release();
      });
      return;
    }
    at::parallel_for(0, p.B * p.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(forward_buffer_size(p, bm));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t qb = zigzag(t % nqb, nqb), bh = t / nqb;
        const int64_t b = bh / p.Hq, h = bh % p.Hq;
        const int64_t row = bh * p.Sq + qb * bm;
        fwd_tile<scalar_t>(p, b, h, 1, qb, bm, o + row * p.Dv, ls + row, buf, nullptr, nullptr);
      }
      if (use_brgemm()) at::native::cpublas::brgemm_release();
    });
  });
  return {out, lse};
}

// --- backward --------------------------------------------------------------------------------
// Gradients of one (query tile, key tile) from its scores s (and th = tanh(.) under softcap):
//   pd  = the dropped, rescaled probabilities (the dV weights),
//   ds  = dL/ds = P (dP - delta), the gradient of the masked scores (= of an additive mask),
//   dsr = dL/d(q k^T) = ds * scale (* (1 - th^2) under softcap), the dQ / dK weights.
// dof is the dO tile (rows, ld Dv), vt the transposed value tile (ld kBlockN); rows whose
// lse is -inf (nothing visible) get zeros.
void grad_tile(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t ni, int64_t j0,
               int64_t nj, const float* s, const float* th, const float* dof, const float* vt,
               const float* lse, const float* delta, float* pd, float* ds, float* dsr) {
  gemm(ni, nj, p.Dv, dof, p.Dv, vt, kBlockN, ds, kBlockN, false);  // dP = dO V^T, into ds
  for (int64_t r = 0; r < ni; ++r) {
    const float* srow = s + r * kBlockN;
    float* pdrow = pd + r * kBlockN;
    float* dsrow = ds + r * kBlockN;
    float* dsrrow = dsr + r * kBlockN;
    const float lr = lse[r];
    if (lr == kNegInf) {  // fully masked row: no probability, no gradient
      for (int64_t j = 0; j < nj; ++j) pdrow[j] = dsrow[j] = dsrrow[j] = 0.f;
      continue;
    }
    const float dr = delta[r];
    if (p.dropout_p == 0.f && p.softcap == 0.f) {
      cpu_simd::attn_grad_row(srow, dsrow, pdrow, dsrrow, nj, lr, dr, p.scale);
      continue;
    }
    const float* dp = dsrow;  // read before overwritten, element by element
    for (int64_t j = 0; j < nj; ++j) {
      const float pj = exp_nonpositive(srow[j] - lr);  // 0 where s = -inf
      float pdj = pj, dpj = dp[j];
      if (p.dropout_p > 0.f) {
        if (p.keep(b, h, i0 + r, j0 + j)) {
          pdj *= p.keep_scale;
          dpj *= p.keep_scale;
        } else {
          pdj = 0.f;
          dpj = 0.f;
        }
      }
      pdrow[j] = pdj;
      const float g = pj * (dpj - dr);
      dsrow[j] = g;
      float gr = g * p.scale;
      if (p.softcap > 0.f) {
        const float t = th[r * kBlockN + j];
        gr *= 1.f - t * t;
      }
      dsrrow[j] = gr;
    }
  }
}

// Per-thread fp32 working tiles of the backward tasks.
struct BwdBuffers {
  std::vector<float> data;
  float *qf, *kt, *kf, *vt, *dof, *s, *th, *pd, *ds, *dsr, *pdt, *dsrt, *acc_k, *acc_v;
  BwdBuffers(int64_t D, int64_t Dv) {
    const int64_t tile = kBlockM * kBlockN;
    data.resize(kBlockM * D + 2 * D * kBlockN + Dv * kBlockN + kBlockM * Dv + 7 * tile +
                std::max(kBlockM, kBlockN) * D + kBlockN * Dv);
    float* x = data.data();
    qf = x; x += kBlockM * D;
    kt = x; x += D * kBlockN;
    kf = x; x += D * kBlockN;
    vt = x; x += Dv * kBlockN;
    dof = x; x += kBlockM * Dv;
    s = x; x += tile;
    th = x; x += tile;
    pd = x; x += tile;
    ds = x; x += tile;
    dsr = x; x += tile;
    pdt = x; x += tile;
    dsrt = x; x += tile;
    acc_k = x; x += std::max(kBlockM, kBlockN) * D;  // dK (kBlockN x D) or dQ (kBlockM x D)
    acc_v = x;
  }
};

// True when one of the rows has a visible key (lse > -inf): tiles of fully masked rows are
// skipped.
bool any_visible(const float* lse, int64_t ni) {
  for (int64_t r = 0; r < ni; ++r) {
    if (lse[r] != kNegInf) return true;
  }
  return false;
}

// The backward of one (query tile, key tile) of query head h: rows [i0, i0 + ni) (w.qf, w.dof,
// lse, delta), keys [j0, j0 + nj) (kt, vt: transposed tiles, ld kBlockN; kf: rows, ld D).
// Adds to the accumulators that are given (null: not wanted): dqf += dS K (ni x D),
// dvf += P^T dO and dkf += dS^T Q (nj rows), and writes dS into the mask gradient dmask.
// Every plan runs its tiles through this one step, which keeps the plans' results equal.
void backward_tile(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t ni, int64_t j0,
                   int64_t nj, const float* kt, const float* vt, const float* kf,
                   const float* lse, const float* delta, BwdBuffers& w, float* dqf, float* dkf,
                   float* dvf, float* dmask) {
  const int64_t D = p.D, Dv = p.Dv;
  score_tile(p, b, h, i0, ni, j0, nj, w.qf, kt, w.s, w.th);
  grad_tile(p, b, h, i0, ni, j0, nj, w.s, w.th, w.dof, vt, lse, delta, w.pd, w.ds, w.dsr);
  if (dqf != nullptr) gemm(ni, D, nj, w.dsr, kBlockN, kf, D, dqf, D, true);  // dQ += dS K
  if (dkf != nullptr) {
    transpose(w.pd, kBlockN, ni, nj, w.pdt, kBlockM);
    transpose(w.dsr, kBlockN, ni, nj, w.dsrt, kBlockM);
    gemm(nj, Dv, ni, w.pdt, kBlockM, w.dof, Dv, dvf, Dv, true);  // dV += P^T dO
    gemm(nj, D, ni, w.dsrt, kBlockM, w.qf, D, dkf, D, true);     // dK += dS^T Q
  }
  if (dmask != nullptr) {  // the mask gradient is dS itself
    const int64_t bh = b * p.Hq + h;
    for (int64_t r = 0; r < ni; ++r) {
      float* dm = dmask + (bh * p.Sq + i0 + r) * p.Sk + j0;
      std::copy(w.ds + r * kBlockN, w.ds + r * kBlockN + nj, dm);
    }
  }
}

template <typename T>
void bwd_dkdv_tile(const Problem& p, int64_t b, int64_t hk, int64_t kb, const float* dout,
                   const float* lse_all, const float* delta_all, T* dk, T* dv, BwdBuffers& w) {
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t j0 = kb * kBlockN, nj = std::min(kBlockN, p.Sk - j0);
  const T* kp = static_cast<const T*>(p.k) + b * p.ks[0] + hk * p.ks[1] + j0 * p.ks[2];
  const T* vp = static_cast<const T*>(p.v) + b * p.vs[0] + hk * p.vs[1] + j0 * p.vs[2];
  load_transposed(kp, p.ks[2], p.ks[3], nj, D, w.kt, kBlockN);
  load_transposed(vp, p.vs[2], p.vs[3], nj, Dv, w.vt, kBlockN);
  float* dkf = w.acc_k;
  float* dvf = w.acc_v;
  std::fill(dkf, dkf + nj * D, 0.f);
  std::fill(dvf, dvf + nj * Dv, 0.f);
  int64_t ilo, ihi;
  p.query_range(j0, j0 + nj, &ilo, &ihi);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t h = hk * p.G + g;
    const int64_t bh = b * p.Hq + h;
    const T* qbase = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
    for (int64_t i0 = (ilo / kBlockM) * kBlockM; i0 < ihi; i0 += kBlockM) {
      const int64_t ni = std::min(kBlockM, p.Sq - i0);
      const float* lse = lse_all + bh * p.Sq + i0;
      if (!any_visible(lse, ni)) continue;
      load_rows(qbase + i0 * p.qs[2], p.qs[2], p.qs[3], ni, D, w.qf, D);
      std::copy(dout + (bh * p.Sq + i0) * Dv, dout + (bh * p.Sq + i0 + ni) * Dv, w.dof);
      backward_tile(p, b, h, i0, ni, j0, nj, w.kt, w.vt, nullptr, lse, delta_all + bh * p.Sq + i0,
                    w, nullptr, dkf, dvf, nullptr);
    }
  }
  for (int64_t j = 0; j < nj; ++j) {
    for (int64_t d = 0; d < D; ++d) dk[j * D + d] = static_cast<T>(dkf[j * D + d]);
    for (int64_t e = 0; e < Dv; ++e) dv[j * Dv + e] = static_cast<T>(dvf[j * Dv + e]);
  }
}

template <typename T>
void bwd_dq_tile(const Problem& p, int64_t b, int64_t h, int64_t qb, const float* dout,
                 const float* lse_all, const float* delta_all, T* dq, float* dmask,
                 BwdBuffers& w) {
  const int64_t D = p.D, Dv = p.Dv;
  const int64_t i0 = qb * kBlockM, ni = std::min(kBlockM, p.Sq - i0);
  const int64_t hk = h / p.G, bh = b * p.Hq + h;
  const float* lse = lse_all + bh * p.Sq + i0;
  float* dqf = w.acc_k;
  std::fill(dqf, dqf + ni * D, 0.f);
  if (any_visible(lse, ni)) {
    const T* qp = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + i0 * p.qs[2];
    load_rows(qp, p.qs[2], p.qs[3], ni, D, w.qf, D);
    std::copy(dout + (bh * p.Sq + i0) * Dv, dout + (bh * p.Sq + i0 + ni) * Dv, w.dof);
    int64_t jlo, jhi;
    p.key_range(i0, i0 + ni, &jlo, &jhi);
    const T* kbase = static_cast<const T*>(p.k) + b * p.ks[0] + hk * p.ks[1];
    const T* vbase = static_cast<const T*>(p.v) + b * p.vs[0] + hk * p.vs[1];
    for (int64_t j0 = (jlo / kBlockN) * kBlockN; j0 < jhi; j0 += kBlockN) {
      const int64_t nj = std::min(kBlockN, p.Sk - j0);
      load_transposed(kbase + j0 * p.ks[2], p.ks[2], p.ks[3], nj, D, w.kt, kBlockN);
      load_rows(kbase + j0 * p.ks[2], p.ks[2], p.ks[3], nj, D, w.kf, D);
      load_transposed(vbase + j0 * p.vs[2], p.vs[2], p.vs[3], nj, Dv, w.vt, kBlockN);
      backward_tile(p, b, h, i0, ni, j0, nj, w.kt, w.vt, w.kf, lse, delta_all + bh * p.Sq + i0,
                    w, dqf, nullptr, nullptr, dmask);
    }
  }
  T* o = dq + (bh * p.Sq + i0) * D;
  for (int64_t x = 0; x < ni * D; ++x) o[x] = static_cast<T>(dqf[x]);
}

// The single-pass backward of one (batch, kv head), the per-head task plan (use_head_tasks):
// P and dS of each (query tile, key tile) are computed once and feed dQ (complete after the
// query tile's key loop), dK and dV (accumulated over the whole key sequence in fp32 in `acc`,
// the query heads of a GQA group summed in the task: no atomics, the same order of additions
// as the two-pass plan). K and V are widened (and transposed) once per task, into `kv`.
template <typename T>
void bwd_group_task(const Problem& p, int64_t b, int64_t hk, const float* dout,
                    const float* lse_all, const float* delta_all, T* dq, T* dk, T* dv,
                    float* dmask, BwdBuffers& w, std::vector<float>& kv, std::vector<float>& acc) {
  const int64_t D = p.D, Dv = p.Dv, Sk = p.Sk;
  const int64_t nqb = cdiv(p.Sq, kBlockM);
  float *kt_all, *vt_all, *kf_all;
  pack_head<T>(p, b, hk, kv, &kt_all, nullptr, &vt_all, &kf_all);
  acc.assign(Sk * (D + Dv), 0.f);
  float* dkf = acc.data();     // Sk x D
  float* dvf = dkf + Sk * D;   // Sk x Dv

  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t h = hk * p.G + g;
    const int64_t bh = b * p.Hq + h;
    const T* qbase = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1];
    for (int64_t qb = 0; qb < nqb; ++qb) {
      const int64_t i0 = qb * kBlockM, ni = std::min(kBlockM, p.Sq - i0);
      const float* lse = lse_all + bh * p.Sq + i0;
      const float* delta = delta_all + bh * p.Sq + i0;
      float* dqf = w.acc_k;
      std::fill(dqf, dqf + ni * D, 0.f);
      if (any_visible(lse, ni)) {
        load_rows(qbase + i0 * p.qs[2], p.qs[2], p.qs[3], ni, D, w.qf, D);
        std::copy(dout + (bh * p.Sq + i0) * Dv, dout + (bh * p.Sq + i0 + ni) * Dv, w.dof);
        int64_t jlo, jhi;
        p.key_range(i0, i0 + ni, &jlo, &jhi);
        for (int64_t j0 = (jlo / kBlockN) * kBlockN; j0 < jhi; j0 += kBlockN) {
          const int64_t kb = j0 / kBlockN, nj = std::min(kBlockN, Sk - j0);
          backward_tile(p, b, h, i0, ni, j0, nj, kt_all + kb * D * kBlockN,
                        vt_all + kb * Dv * kBlockN, kf_all + j0 * D, lse, delta, w, dqf,
                        dkf + j0 * D, dvf + j0 * Dv, dmask);
        }
      }
      T* o = dq + (bh * p.Sq + i0) * D;
      for (int64_t x = 0; x < ni * D; ++x) o[x] = static_cast<T>(dqf[x]);
    }
  }
  const int64_t row = (b * p.Hkv + hk) * Sk;
  T* dko = dk + row * D;
  T* dvo = dv + row * Dv;
  for (int64_t x = 0; x < Sk * D; ++x) dko[x] = static_cast<T>(dkf[x]);
  for (int64_t x = 0; x < Sk * Dv; ++x) dvo[x] = static_cast<T>(dvf[x]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& attn_mask,
    double scale, int64_t window_left, int64_t window_right, double softcap, double dropout_p,
    const std::optional<at::Tensor>& seed, bool mask_grad) {
  const Problem p = attention::make_problem(kBwd, query, key, value, attn_mask, scale,
                                            window_left, window_right, softcap, dropout_p, seed,
                                            c10::DeviceType::CPU);
  attention::check_backward(kBwd, p, query, grad_out, out, lse, grad_lse);
  const bool want_dmask = mask_grad && attn_mask.has_value() &&
                          attn_mask->scalar_type() != at::kBool;
  at::Tensor grad_query = at::empty(query.sizes(), query.options());
  at::Tensor grad_key = at::empty(key.sizes(), key.options());
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  // Key tiles outside the band are never visited, so the mask gradient starts at zero.
  at::Tensor dmask_f = want_dmask ? at::zeros({p.B, p.Hq, p.Sq, p.Sk},
                                              query.options().dtype(at::kFloat))
                                  : at::Tensor();
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    at::Tensor gm = want_dmask ? dmask_f.to(attn_mask->scalar_type())
                               : at::empty({0}, query.options());
    return {grad_query, grad_key, grad_value, gm};
  };
  if (p.B * p.Hq == 0 || p.Sq == 0 || p.Sk == 0) {
    grad_query.zero_();
    grad_key.zero_();
    grad_value.zero_();
    return finish();
  }

  // fp32 copies of dO (read by every key tile) and delta = rowsum(dO O) - dlse.
  const at::Tensor dout = grad_out.to(at::kFloat).contiguous();
  const at::Tensor out_f = out.to(at::kFloat).contiguous();
  const at::Tensor lse_f = lse.to(at::kFloat).contiguous();
  at::Tensor delta = (dout * out_f).sum(-1);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(at::kFloat);
  delta = delta.contiguous();
  const float* dop = dout.const_data_ptr<float>();
  const float* lp = lse_f.const_data_ptr<float>();
  const float* dp = delta.const_data_ptr<float>();
  float* dm = want_dmask ? dmask_f.mutable_data_ptr<float>() : nullptr;

  const int64_t nkb = cdiv(p.Sk, kBlockN), nqb = cdiv(p.Sq, kBlockM);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "attention_bwd_cpu",
                                  [&] {
    scalar_t* dk = grad_key.mutable_data_ptr<scalar_t>();
    scalar_t* dv = grad_value.mutable_data_ptr<scalar_t>();
    scalar_t* dq = grad_query.mutable_data_ptr<scalar_t>();
    if (use_head_tasks(p, /*backward=*/true)) {
      at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
        BwdBuffers w(p.D, p.Dv);
        std::vector<float> kv, acc;
        for (int64_t t = begin; t < end; ++t) {
          bwd_group_task<scalar_t>(p, t / p.Hkv, t % p.Hkv, dop, lp, dp, dq, dk, dv, dm, w, kv,
                                   acc);
        }
        if (use_brgemm()) at::native::cpublas::brgemm_release();
      });
      return;
    }
    at::parallel_for(0, p.B * p.Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
      BwdBuffers w(p.D, p.Dv);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t kb = zigzag(t % nkb, nkb), bhk = t / nkb;
        const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
        const int64_t row = bhk * p.Sk + kb * kBlockN;
        bwd_dkdv_tile<scalar_t>(p, b, hk, kb, dop, lp, dp, dk + row * p.D, dv + row * p.Dv, w);
      }
      if (use_brgemm()) at::native::cpublas::brgemm_release();
    });
    at::parallel_for(0, p.B * p.Hq * nqb, 1, [&](int64_t begin, int64_t end) {
      BwdBuffers w(p.D, p.Dv);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t qb = zigzag(t % nqb, nqb), bh = t / nqb;
        bwd_dq_tile<scalar_t>(p, bh / p.Hq, bh % p.Hq, qb, dop, lp, dp, dq, dm, w);
      }
      if (use_brgemm()) at::native::cpublas::brgemm_release();
    });
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace llmfast
