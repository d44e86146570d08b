// CPU kernels of llmfast::norm_fwd / llmfast::norm_bwd (LayerNorm and RMSNorm over the last
// dimension of an (M, N) row-major tensor, optionally fused with a residual add). The contract
// is documented in norm_ops.cpp.
//
// Algorithm: rows are split over threads with at::parallel_for; each row is handled by one
// thread entirely in fp32. fp16/bf16 rows are widened into per-thread fp32 row buffers (a few
// N floats, L1/L2-resident) and results narrowed back row by row; fp32 rows are used in place.
// Statistics are two-pass (mean, then sum((s - mean)^2)), never E[x^2] - mean^2. Row sums use
// Isa::kLanes interleaved fp32 accumulators, which lets the compiler vectorize them without
// -ffast-math and keeps each partial sum short. Weights/bias are widened to fp32 once.
// Backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (RMSNorm drops the
// mean(g) term); dW/dB are summed in fp32, one partial row per row chunk (one chunk per
// thread), folded in chunk order afterwards: deterministic for a given thread count.
//
// The row kernels are plain loops compiled twice: for the baseline ISA and, on x86, for
// AVX2+FMA+F16C (256-bit vectors, hardware fp16 conversion), chosen at run time. The two builds
// differ only in rounding (lane count, FMA contraction); ATEN_CPU_CAPABILITY=default forces
// the baseline build, as it does for torch's own kernels.
//
// Memory traffic (T = element size): forward reads input (+ residual) once and writes out
// (+ residual_out) once: 2MNT (4MNT with residual) plus 8M bytes of statistics. Backward reads
// grad_out and s (+ grad_residual_out) once and writes grad_input once: 3MNT (4MNT), plus
// chunks * 2N floats of dW/dB partials.
//
// Build note: at::parallel_for only runs on several threads when this file is compiled with
// -fopenmp (ATen's OpenMP backend is header-only); without it every op runs on one thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/cpu_utils.h"
#include "norm/norm_checks.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define LLMFAST_NORM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define LLMFAST_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#if !defined(_OPENMP)
#pragma message("norm_cpu.cpp built without -fopenmp: the CPU norm kernels will use one thread")
#endif

namespace llmfast {
namespace {


// Rows per parallel task are chosen so that a task touches at least this many elements;
// smaller problems run on the calling thread instead of paying for a thread wake-up.
constexpr int64_t kMinElemsPerTask = 1 << 14;

int64_t rows_grain(int64_t N) {
  return std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(N, 1));
}

// Row conversions and lane count for the baseline ISA (SSE2 on x86-64, NEON on arm64).
struct BaselineIsa {
  static constexpr int64_t kLanes = 16;  // four 128-bit accumulators

  template <typename T>
  static void widen(const T* src, float* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
  template <typename T>
  static void narrow(const float* src, T* dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
};

#ifdef LLMFAST_NORM_X86
// The same for AVX2+FMA+F16C. fp16 goes through vcvtph2ps / vcvtps2ph (round to nearest even,
// like c10::Half); bf16 is a shift / rounding add that the compiler vectorizes by itself.
struct Avx2Isa {
  static constexpr int64_t kLanes = 32;  // four 256-bit accumulators

  template <typename T>
  LLMFAST_TARGET_AVX2 static void widen(const T* src, float* dst, int64_t n) {
    int64_t i = 0;
    if constexpr (std::is_same_v<T, c10::Half>) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
      }
      for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
    } else {
      for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
    }
  }
  template <typename T>
  LLMFAST_TARGET_AVX2 static void narrow(const float* src, T* dst, int64_t n) {
    int64_t i = 0;
    if constexpr (std::is_same_v<T, c10::Half>) {
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
      }
      for (; i < n; ++i) {
        dst[i] = c10::Half(_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT), c10::Half::from_bits());
      }
    } else {
      for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
    }
  }
};

bool use_avx2() {
  static const bool ok = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
    return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}
#endif

// One pass over a row each. Every pointer is a different buffer, and saying so (restrict)
// lets the compiler vectorize without run-time overlap checks, which it gives up on when a
// loop touches as many arrays as the backward pass 1 does.

// out = a + b
C10_ALWAYS_INLINE void add_row(int64_t n, const float* C10_RESTRICT a,
                               const float* C10_RESTRICT b, float* C10_RESTRICT out) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// acc += v
C10_ALWAYS_INLINE void accumulate_row(int64_t n, float* C10_RESTRICT acc,
                                      const float* C10_RESTRICT v) {
  for (int64_t i = 0; i < n; ++i) acc[i] += v[i];
}

// y = (s - mu) * rs * w + b
C10_ALWAYS_INLINE void affine_row(int64_t n, const float* C10_RESTRICT s, float mu, float rs,
                                  const float* C10_RESTRICT w, const float* C10_RESTRICT b,
                                  float* C10_RESTRICT y) {
  for (int64_t i = 0; i < n; ++i) y[i] = (s[i] - mu) * rs * w[i] + b[i];
}

// Backward pass 1 over a row: g = dy * w (stored), sum(g) and sum(g * xhat) with kLanes
// accumulators each, and (kDW / kDB) dw += dy * xhat, db += dy.
template <int64_t kLanes, bool kDW, bool kDB>
C10_ALWAYS_INLINE void bwd_row_sums(int64_t n, const float* C10_RESTRICT s,
                                    const float* C10_RESTRICT dy, const float* C10_RESTRICT w,
                                    float mu, float rs, float* C10_RESTRICT g,
                                    float* C10_RESTRICT dw, float* C10_RESTRICT db,
                                    float* sum_g, float* sum_gx) {
  float acc_g[kLanes] = {};
  float acc_gx[kLanes] = {};
  // Element i goes to lane i % kLanes; the body is written out twice (blocks, then the tail)
  // rather than shared through a lambda, which would hide the restrict qualifiers.
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float xh = (s[i + j] - mu) * rs;
      const float gi = dy[i + j] * w[i + j];
      g[i + j] = gi;
      acc_g[j] += gi;
      acc_gx[j] += gi * xh;
      if constexpr (kDW) dw[i + j] += dy[i + j] * xh;
      if constexpr (kDB) db[i + j] += dy[i + j];
    }
  }
  for (int64_t j = 0; i < n; ++i, ++j) {
    const float xh = (s[i] - mu) * rs;
    const float gi = dy[i] * w[i];
    g[i] = gi;
    acc_g[j] += gi;
    acc_gx[j] += gi * xh;
    if constexpr (kDW) dw[i] += dy[i] * xh;
    if constexpr (kDB) db[i] += dy[i];
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t j = 0; j < width; ++j) {
      acc_g[j] += acc_g[j + width];
      acc_gx[j] += acc_gx[j + width];
    }
  }
  *sum_g = acc_g[0];
  *sum_gx = acc_gx[0];
}

// Backward pass 2 over a row, in place over g: dx = rs * (g - c_g - xhat * c_gx) (+ gr).
C10_ALWAYS_INLINE void bwd_row_dx(int64_t n, const float* C10_RESTRICT s, float mu, float rs,
                                  float c_g, float c_gx, float* C10_RESTRICT g_dx,
                                  const float* C10_RESTRICT gr) {
  if (gr != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float xh = (s[i] - mu) * rs;
      g_dx[i] = rs * (g_dx[i] - c_g - xh * c_gx) + gr[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float xh = (s[i] - mu) * rs;
      g_dx[i] = rs * (g_dx[i] - c_g - xh * c_gx);
    }
  }
}

// Arguments of the forward row kernel. x, residual, out, residual_out: (M, N) row-major;
// w, b: (N,) fp32, never null (ones / zeros stand in for a missing weight / bias);
// mean (M,) or null for RMSNorm; rstd (M,).
template <typename T>
struct FwdArgs {
  const T* x;
  const T* residual;  // null when there is no residual
  const float* w;
  const float* b;
  T* out;
  T* residual_out;  // null when there is no residual
  float* mean;
  float* rstd;
  int64_t N;
  float eps;
};

// Normalizes rows [begin, end). Reads x (+ residual) once, writes out (+ residual_out) once.
template <typename T, typename Isa>
C10_ALWAYS_INLINE void norm_fwd_rows_impl(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  constexpr int64_t kLanes = Isa::kLanes;
  const int64_t N = a.N;
  const float n = static_cast<float>(N);
  const float* w = a.w;
  const float* b = a.b;
  // fp16/bf16 only: s and the fp32 output row.
  std::unique_ptr<float[]> buf(kFloat ? nullptr : new float[2 * N]);
  float* sbuf = buf.get();
  float* ybuf = buf.get() + (kFloat ? 0 : N);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * N;
    const T* x = a.x + off;
    const float* s;
    if (a.residual != nullptr) {
      const T* r = a.residual + off;
      T* so = a.residual_out + off;
      if constexpr (kFloat) {
        add_row(N, x, r, so);
        s = so;
      } else {
        Isa::widen(x, sbuf, N);
        Isa::widen(r, ybuf, N);
        accumulate_row(N, sbuf, ybuf);
        // s is rounded to T before it is normalized, so backward recomputes the same xhat.
        Isa::narrow(sbuf, so, N);
        Isa::widen(so, sbuf, N);
        s = sbuf;
      }
    } else if constexpr (kFloat) {
      s = x;
    } else {
      Isa::widen(x, sbuf, N);
      s = sbuf;
    }

    float mu = 0.0f;
    float var;
    if (a.mean == nullptr) {
      var = lane_sum<kLanes>(N, [&](int64_t i) { return s[i] * s[i]; }) / n;
    } else {
      // The mean of s - s[0], plus s[0]: exact for a constant row (as torch's Welford mean), so
      // such a row normalizes to exactly 0 even with a tiny eps (BERT's 1e-12).
      const float shift = s[0];
      mu = shift + lane_sum<kLanes>(N, [&](int64_t i) { return s[i] - shift; }) / n;
      var = lane_sum<kLanes>(N, [&](int64_t i) {
              const float d = s[i] - mu;
              return d * d;
            }) /
            n;
      a.mean[row] = mu;
    }
    const float rs = 1.0f / std::sqrt(var + a.eps);
    a.rstd[row] = rs;

    float* y;
    if constexpr (kFloat) {
      y = a.out + off;
    } else {
      y = ybuf;
    }
    affine_row(N, s, mu, rs, w, b, y);
    if constexpr (!kFloat) Isa::narrow(ybuf, a.out + off, N);
  }
}

// Arguments of the backward row kernel. dy, s, grad_residual, dx: (M, N) row-major;
// w (N,) fp32, never null; mean (M,) or null for RMSNorm; rstd (M,).
template <typename T>
struct BwdArgs {
  const T* dy;
  const T* s;
  const T* grad_residual;  // null when not given
  const float* w;
  const float* mean;
  const float* rstd;
  T* dx;
  int64_t N;
};

// Rows [begin, end). Reads dy, s (+ grad_residual) once, writes dx once. With kDW / kDB it
// also adds sum_rows(dy * xhat) to dw / sum_rows(dy) to db ((N,) fp32, private to the
// caller's chunk of rows).
template <typename T, bool kDW, bool kDB, typename Isa>
C10_ALWAYS_INLINE void norm_bwd_rows_impl(const BwdArgs<T>& a, int64_t begin, int64_t end,
                                          float* dw, float* db) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  constexpr int64_t kLanes = Isa::kLanes;
  const int64_t N = a.N;
  const float n = static_cast<float>(N);
  const float* w = a.w;
  // fp16/bf16 only: s, dy (later grad_residual) and g (later dx) as fp32 rows.
  std::unique_ptr<float[]> buf(kFloat ? nullptr : new float[3 * N]);
  float* sbuf = buf.get();
  float* dybuf = buf.get() + (kFloat ? 0 : N);
  float* dxbuf = buf.get() + (kFloat ? 0 : 2 * N);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * N;
    const float* s;
    const float* dy;
    if constexpr (kFloat) {
      s = a.s + off;
      dy = a.dy + off;
    } else {
      Isa::widen(a.s + off, sbuf, N);
      Isa::widen(a.dy + off, dybuf, N);
      s = sbuf;
      dy = dybuf;
    }
    const float mu = a.mean != nullptr ? a.mean[row] : 0.0f;
    const float rs = a.rstd[row];
    // g = dy * w is stored (into the dx row) and reused by pass 2 rather than recomputed: a
    // recomputed product may be contracted into an FMA there and no longer cancel exactly
    // against mean(g) (one-element LayerNorm rows, whose exact dx is 0, would get
    // rstd * ulp(g) = 1/sqrt(eps) * ulp(g)).
    float* g_row;
    if constexpr (kFloat) {
      g_row = a.dx + off;
    } else {
      g_row = dxbuf;
    }

    float sum_g;
    float sum_gx;
    bwd_row_sums<kLanes, kDW, kDB>(N, s, dy, w, mu, rs, g_row, dw, db, &sum_g, &sum_gx);
    // RMSNorm has no mean to subtract, so its dx has no mean(g) term.
    const float c_g = a.mean != nullptr ? sum_g / n : 0.0f;
    const float c_gx = sum_gx / n;

    // Pass 2, while the row is still in cache. grad_residual is added in fp32 before the
    // single rounding to T.
    const float* gr = nullptr;
    if (a.grad_residual != nullptr) {
      if constexpr (kFloat) {
        gr = a.grad_residual + off;
      } else {
        Isa::widen(a.grad_residual + off, dybuf, N);  // dy is no longer needed
        gr = dybuf;
      }
    }
    bwd_row_dx(N, s, mu, rs, c_g, c_gx, g_row, gr);
    if constexpr (!kFloat) Isa::narrow(dxbuf, a.dx + off, N);
  }
}

// The row kernels, built for the baseline ISA and (x86) for AVX2, picked per call.
template <typename T>
void norm_fwd_rows_baseline(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  norm_fwd_rows_impl<T, BaselineIsa>(a, begin, end);
}
template <typename T, bool kDW, bool kDB>
void norm_bwd_rows_baseline(const BwdArgs<T>& a, int64_t begin, int64_t end, float* dw,
                            float* db) {
  norm_bwd_rows_impl<T, kDW, kDB, BaselineIsa>(a, begin, end, dw, db);
}
#ifdef LLMFAST_NORM_X86
template <typename T>
LLMFAST_TARGET_AVX2 void norm_fwd_rows_avx2(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  norm_fwd_rows_impl<T, Avx2Isa>(a, begin, end);
}
template <typename T, bool kDW, bool kDB>
LLMFAST_TARGET_AVX2 void norm_bwd_rows_avx2(const BwdArgs<T>& a, int64_t begin, int64_t end,
                                            float* dw, float* db) {
  norm_bwd_rows_impl<T, kDW, kDB, Avx2Isa>(a, begin, end, dw, db);
}
#endif

template <typename T>
void norm_fwd_rows(const FwdArgs<T>& a, int64_t begin, int64_t end) {
#ifdef LLMFAST_NORM_X86
  if (use_avx2()) return norm_fwd_rows_avx2(a, begin, end);
#endif
  norm_fwd_rows_baseline(a, begin, end);
}
template <typename T, bool kDW, bool kDB>
void norm_bwd_rows_static(const BwdArgs<T>& a, int64_t begin, int64_t end, float* dw,
                          float* db) {
#ifdef LLMFAST_NORM_X86
  if (use_avx2()) return norm_bwd_rows_avx2<T, kDW, kDB>(a, begin, end, dw, db);
#endif
  norm_bwd_rows_baseline<T, kDW, kDB>(a, begin, end, dw, db);
}

// Picks the instantiation from which partial sums are wanted (dw / db null: not wanted).
template <typename T>
void norm_bwd_rows(const BwdArgs<T>& a, int64_t begin, int64_t end, float* dw, float* db) {
  if (dw != nullptr && db != nullptr) {
    norm_bwd_rows_static<T, true, true>(a, begin, end, dw, db);
  } else if (dw != nullptr) {
    norm_bwd_rows_static<T, true, false>(a, begin, end, dw, db);
  } else if (db != nullptr) {
    norm_bwd_rows_static<T, false, true>(a, begin, end, dw, db);
  } else {
    norm_bwd_rows_static<T, false, false>(a, begin, end, dw, db);
  }
}

// A parameter as an (N,) fp32 tensor; `fill` stands in when it is absent.
at::Tensor param_as_float(const std::optional<at::Tensor>& t, int64_t N, float fill) {
  if (t.has_value()) return t->to(at::kFloat).contiguous();
  return at::full({N}, fill, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  norm::check_fwd_args(input, residual, weight, bias, c10::DeviceType::CPU);
  const int64_t M = input.size(0);
  const int64_t N = input.size(1);
  const auto dtype = input.scalar_type();

  at::Tensor out, residual_out, mean, rstd;
  std::tie(out, residual_out, mean, rstd) = norm::fwd_outputs(input, residual.has_value(), rms);
  if (M == 0 || N == 0) return {out, residual_out, mean, rstd};

  const at::Tensor w = param_as_float(weight, N, 1.0f);
  const at::Tensor b = param_as_float(bias, N, 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "norm_fwd_cpu", [&] {
    FwdArgs<scalar_t> a;
    a.x = input.const_data_ptr<scalar_t>();
    a.residual = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    a.w = w.const_data_ptr<float>();
    a.b = b.const_data_ptr<float>();
    a.out = out.mutable_data_ptr<scalar_t>();
    a.residual_out = residual.has_value() ? residual_out.mutable_data_ptr<scalar_t>() : nullptr;
    a.mean = rms ? nullptr : mean.mutable_data_ptr<float>();
    a.rstd = rstd.mutable_data_ptr<float>();
    a.N = N;
    a.eps = static_cast<float>(eps);
    at::parallel_for(0, M, rows_grain(N),
                     [&](int64_t begin, int64_t end) { norm_fwd_rows(a, begin, end); });
  });
  return {out, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& normed_input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool rms, bool weight_grad, bool bias_grad) {
  norm::check_bwd_args(grad_out, grad_residual_out, normed_input, weight, mean, rstd, rms,
                       weight_grad, c10::DeviceType::CPU);
  const int64_t M = normed_input.size(0);
  const int64_t N = normed_input.size(1);
  const auto dtype = normed_input.scalar_type();

  const auto param_dtype = weight.has_value() ? weight->scalar_type() : dtype;
  const auto param_opts = normed_input.options().dtype(param_dtype);
  const auto f32 = normed_input.options().dtype(at::kFloat);
  at::Tensor grad_input = at::empty({M, N}, normed_input.options());
  // fp32 sums of dy * xhat and dy over rows, (N,) each; they are the returned gradients
  // themselves when the parameters are fp32. Rows are split into one chunk per thread: chunk 0
  // adds into these, chunk c > 0 into its own zeroed partial row, folded in afterwards in chunk
  // order (deterministic for a given thread count).
  at::Tensor dw_sum = weight_grad ? at::zeros({N}, f32) : at::Tensor();
  at::Tensor db_sum = bias_grad ? at::zeros({N}, f32) : at::Tensor();
  if (M > 0 && N > 0) {
    const at::Tensor w = param_as_float(weight, N, 1.0f);
    const int64_t grain = rows_grain(N);
    const int64_t max_chunks = std::min<int64_t>(at::get_num_threads(), (M + grain - 1) / grain);
    const int64_t n_chunks = (weight_grad || bias_grad) ? std::max<int64_t>(1, max_chunks) : 1;
    const int64_t rows_per_chunk = (M + n_chunks - 1) / n_chunks;
    const int64_t sums_per_chunk = (weight_grad ? N : 0) + (bias_grad ? N : 0);
    at::Tensor partial =
        n_chunks > 1 ? at::zeros({n_chunks - 1, sums_per_chunk}, f32) : at::Tensor();
    // dW / dB destinations of chunk c (null: not wanted).
    auto chunk_sums = [&](int64_t c, float** dw, float** db) {
      if (c == 0) {
        *dw = weight_grad ? dw_sum.mutable_data_ptr<float>() : nullptr;
        *db = bias_grad ? db_sum.mutable_data_ptr<float>() : nullptr;
      } else {
        float* p = partial.mutable_data_ptr<float>() + (c - 1) * sums_per_chunk;
        *dw = weight_grad ? p : nullptr;
        *db = bias_grad ? p + (weight_grad ? N : 0) : nullptr;
      }
    };

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "norm_bwd_cpu", [&] {
      BwdArgs<scalar_t> a;
      a.dy = grad_out.const_data_ptr<scalar_t>();
      a.s = normed_input.const_data_ptr<scalar_t>();
      a.grad_residual =
          grad_residual_out.has_value() ? grad_residual_out->const_data_ptr<scalar_t>() : nullptr;
      a.w = w.const_data_ptr<float>();
      a.mean = rms ? nullptr : mean.const_data_ptr<float>();
      a.rstd = rstd.const_data_ptr<float>();
      a.dx = grad_input.mutable_data_ptr<scalar_t>();
      a.N = N;
      if (weight_grad || bias_grad) {
        at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
          for (int64_t c = c_begin; c < c_end; ++c) {
            const int64_t r0 = c * rows_per_chunk;
            const int64_t r1 = std::min(M, r0 + rows_per_chunk);
            float* dw;
            float* db;
            chunk_sums(c, &dw, &db);
            if (r0 < r1) norm_bwd_rows(a, r0, r1, dw, db);
          }
        });
      } else {
        at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
          norm_bwd_rows<scalar_t>(a, begin, end, nullptr, nullptr);
        });
      }
    });

    if (n_chunks > 1) {
      float* dw0;
      float* db0;
      chunk_sums(0, &dw0, &db0);
      at::parallel_for(0, N, kMinElemsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t c = 1; c < n_chunks; ++c) {
          float* dw;
          float* db;
          chunk_sums(c, &dw, &db);
          if (dw != nullptr) {
            for (int64_t k = begin; k < end; ++k) dw0[k] += dw[k];
          }
          if (db != nullptr) {
            for (int64_t k = begin; k < end; ++k) db0[k] += db[k];
          }
        }
      });
    }
  }

  at::Tensor grad_weight = weight_grad ? dw_sum.to(param_dtype) : at::empty({0}, param_opts);
  at::Tensor grad_bias = bias_grad ? db_sum.to(param_dtype) : at::empty({0}, param_opts);
  return {grad_input, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("norm_fwd", &norm_fwd_cpu);
  m.impl("norm_bwd", &norm_bwd_cpu);
}

}  // namespace llmfast
