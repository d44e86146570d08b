// CPU kernels of llmfast::norm_fwd / llmfast::norm_bwd (LayerNorm and RMSNorm over the last
// dimension of an (M, N) row-major tensor, optionally fused with a residual add). The contract
// is documented in norm_ops.cpp.
//
// Algorithm: rows are split over threads with at::parallel_for; each row is handled by one
// thread entirely in fp32. fp16/bf16 rows are first widened into a per-thread fp32 row buffer
// (N floats, stays in L1/L2), fp32 rows are read in place. Statistics are two-pass (mean, then
// sum((s - mean)^2)), never E[x^2] - mean^2. Row sums use kLanes independent fp32 accumulators,
// which lets the compiler vectorize them without -ffast-math and also shortens each partial
// sum (better rounding than one serial accumulator). Weights/bias are widened to fp32 once.
// Backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (RMSNorm drops the
// mean(g) term); dW/dB partial sums go to one fp32 buffer per row chunk (one chunk per thread),
// reduced afterwards in a fixed order, so results are deterministic for a given thread count.
//
// Memory traffic (T = element size): forward reads input (+ residual) once and writes out
// (+ residual_out) once: 2MNT (4MNT with residual) plus 8M bytes of statistics. Backward reads
// grad_out and s once (+ grad_residual_out) and writes grad_input once: 3MNT (4MNT), plus
// threads * 2N floats of dW/dB partials.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/checks.h"

namespace llmfast {
namespace {

constexpr const char* kFwd = "llmfast::norm_fwd";
constexpr const char* kBwd = "llmfast::norm_bwd";

// Independent accumulators per row sum: 16 floats = four SSE or two AVX registers.
constexpr int64_t kLanes = 16;
// Rows per parallel task are chosen so that a task touches at least this many elements;
// smaller problems run on the calling thread instead of paying for a thread wake-up.
constexpr int64_t kMinElemsPerTask = 1 << 14;

int64_t rows_grain(int64_t N) {
  return std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(N, 1));
}

// sum_{i < n} f(i) with kLanes interleaved accumulators, lanes folded pairwise at the end.
template <typename F>
inline float lane_sum(int64_t n, F f) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  }
  for (int64_t j = 0; i < n; ++i, ++j) acc[j] += f(i);
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return acc[0];
}

// Row `src` (n elements of T) as fp32: in place for fp32, else widened into `buf`.
template <typename T>
inline const float* row_as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
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
  bool rms;
};

// Normalizes rows [begin, end). Reads x (+ residual) once, writes out (+ residual_out) once.
template <typename T>
void norm_fwd_rows(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  std::vector<float> buf(std::is_same_v<T, float> ? 0 : N);
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * N;
    const T* x = a.x + off;
    const float* s;
    if (a.residual != nullptr) {
      const T* r = a.residual + off;
      T* so = a.residual_out + off;
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t i = 0; i < N; ++i) so[i] = x[i] + r[i];
        s = so;
      } else {
        float* sb = buf.data();
        for (int64_t i = 0; i < N; ++i) {
          // s is rounded to T before it is normalized, so backward recomputes the same xhat.
          const T v = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(r[i]));
          so[i] = v;
          sb[i] = static_cast<float>(v);
        }
        s = sb;
      }
    } else {
      s = row_as_float(x, buf.data(), N);
    }

    float mu = 0.0f;
    float var;
    if (a.rms) {
      var = lane_sum(N, [&](int64_t i) { return s[i] * s[i]; }) * inv_n;
    } else {
      mu = lane_sum(N, [&](int64_t i) { return s[i]; }) * inv_n;
      var = lane_sum(N, [&](int64_t i) {
              const float d = s[i] - mu;
              return d * d;
            }) *
            inv_n;
      a.mean[row] = mu;
    }
    const float rs = 1.0f / std::sqrt(var + a.eps);
    a.rstd[row] = rs;

    T* y = a.out + off;
    const float* w = a.w;
    const float* b = a.b;
    for (int64_t i = 0; i < N; ++i) y[i] = static_cast<T>((s[i] - mu) * rs * w[i] + b[i]);
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

// Rows [begin, end). Reads dy, s (+ grad_residual) once, writes dx once. With kParamGrad,
// also accumulates sum_rows(dy * xhat) into dw and sum_rows(dy) into db ((N,) fp32 each,
// private to the caller's chunk).
template <typename T, bool kParamGrad>
void norm_bwd_rows(const BwdArgs<T>& a, int64_t begin, int64_t end, float* dw, float* db) {
  const int64_t N = a.N;
  constexpr bool kWiden = !std::is_same_v<T, float>;
  std::vector<float> buf(kWiden ? 2 * N : 0);
  const float inv_n = 1.0f / static_cast<float>(N);
  const float* w = a.w;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * N;
    const float* s = row_as_float(a.s + off, buf.data(), N);
    const float* dy = row_as_float(a.dy + off, buf.data() + (kWiden ? N : 0), N);
    const float mu = a.mean != nullptr ? a.mean[row] : 0.0f;
    const float rs = a.rstd[row];

    // Pass 1: sum(g) and sum(g * xhat) (+ dW/dB partials), kLanes accumulators each.
    float acc_g[kLanes] = {};
    float acc_gx[kLanes] = {};
    auto step = [&](int64_t i, int64_t j) {
      const float xh = (s[i] - mu) * rs;
      const float g = dy[i] * w[i];
      acc_g[j] += g;
      acc_gx[j] += g * xh;
      if constexpr (kParamGrad) {
        dw[i] += dy[i] * xh;
        db[i] += dy[i];
      }
    };
    int64_t i = 0;
    for (; i + kLanes <= N; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) step(i + j, j);
    }
    for (int64_t j = 0; i < N; ++i, ++j) step(i, j);
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {
      for (int64_t j = 0; j < width; ++j) {
        acc_g[j] += acc_g[j + width];
        acc_gx[j] += acc_gx[j + width];
      }
    }
    // RMSNorm has no mean to subtract, so its dx has no mean(g) term.
    const float c_g = a.mean != nullptr ? acc_g[0] * inv_n : 0.0f;
    const float c_gx = acc_gx[0] * inv_n;

    // Pass 2: dx (the row is still in cache).
    T* dx = a.dx + off;
    if (a.grad_residual != nullptr) {
      const T* gr = a.grad_residual + off;
      for (int64_t k = 0; k < N; ++k) {
        const float xh = (s[k] - mu) * rs;
        dx[k] = static_cast<T>(rs * (dy[k] * w[k] - c_g - xh * c_gx) +
                               static_cast<float>(gr[k]));
      }
    } else {
      for (int64_t k = 0; k < N; ++k) {
        const float xh = (s[k] - mu) * rs;
        dx[k] = static_cast<T>(rs * (dy[k] * w[k] - c_g - xh * c_gx));
      }
    }
  }
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  LLMFAST_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
}

// input-like (M, N) tensor: CPU, 2-D, contiguous, float32/float16/bfloat16.
void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  check_cpu(t, op, name);
  LLMFAST_CHECK(t.dim() == 2, op, name, " must be 2-D (M, N), got shape ", t.sizes());
  check_floating(t, op, name);
  check_contiguous(t, op, name);
}

// Another (M, N) tensor that must match `ref` (named ref_name) in shape and dtype.
void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  check_cpu(t, op, name);
  LLMFAST_CHECK(t.sizes() == ref.sizes(), op, name, " must have the shape of ", ref_name, " ",
                ref.sizes(), ", got ", t.sizes());
  LLMFAST_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ",
                ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  check_contiguous(t, op, name);
}

// weight / bias: CPU, (N,), contiguous, dtype of the input or float32.
void check_param(const at::Tensor& t, int64_t N, at::ScalarType input_dtype, const char* op,
                 const char* name) {
  check_cpu(t, op, name);
  LLMFAST_CHECK(t.dim() == 1, op, name, " must be 1-D, got shape ", t.sizes());
  LLMFAST_CHECK(t.numel() == N, op, name, " must have ", N, " elements, got ", t.numel());
  LLMFAST_CHECK(t.scalar_type() == input_dtype || t.scalar_type() == at::kFloat, op, name,
                " must have the input's dtype (", input_dtype, ") or float32, got ",
                t.scalar_type());
  check_contiguous(t, op, name);
}

// Per-row statistic: CPU, float32, (M,), contiguous.
void check_stat(const at::Tensor& t, int64_t M, const char* op, const char* name) {
  check_cpu(t, op, name);
  LLMFAST_CHECK(t.scalar_type() == at::kFloat, op, name, " must be float32, got ",
                t.scalar_type());
  LLMFAST_CHECK(t.dim() == 1 && t.size(0) == M, op, name, " must have shape (", M, ",), got ",
                t.sizes());
  check_contiguous(t, op, name);
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
  check_matrix(input, kFwd, "input");
  const int64_t M = input.size(0);
  const int64_t N = input.size(1);
  const auto dtype = input.scalar_type();
  if (residual.has_value()) check_like(*residual, input, kFwd, "residual", "input");
  if (weight.has_value()) check_param(*weight, N, dtype, kFwd, "weight");
  if (bias.has_value()) {
    check_param(*bias, N, dtype, kFwd, "bias");
    if (weight.has_value()) {
      LLMFAST_CHECK(bias->scalar_type() == weight->scalar_type(), kFwd,
                    "bias must have the dtype of weight (", weight->scalar_type(), "), got ",
                    bias->scalar_type());
    }
  }

  const auto f32 = input.options().dtype(at::kFloat);
  at::Tensor out = at::empty({M, N}, input.options());
  at::Tensor residual_out =
      residual.has_value() ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
  at::Tensor mean = rms ? at::empty({0}, f32) : at::empty({M}, f32);
  at::Tensor rstd = at::empty({M}, f32);
  if (M == 0) return {out, residual_out, mean, rstd};
  if (N == 0) {
    // Statistics of an empty row, as torch.native_layer_norm reports them: mean 0, rstd NaN.
    if (!rms) mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {out, residual_out, mean, rstd};
  }

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
    a.rms = rms;
    at::parallel_for(0, M, rows_grain(N),
                     [&](int64_t begin, int64_t end) { norm_fwd_rows(a, begin, end); });
  });
  return {out, residual_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& normed_input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool rms, bool weight_grad, bool bias_grad) {
  check_matrix(normed_input, kBwd, "normed_input");
  const int64_t M = normed_input.size(0);
  const int64_t N = normed_input.size(1);
  const auto dtype = normed_input.scalar_type();
  check_like(grad_out, normed_input, kBwd, "grad_out", "normed_input");
  if (grad_residual_out.has_value()) {
    check_like(*grad_residual_out, normed_input, kBwd, "grad_residual_out", "normed_input");
  }
  if (weight.has_value()) check_param(*weight, N, dtype, kBwd, "weight");
  LLMFAST_CHECK(!weight_grad || weight.has_value(), kBwd,
                "weight_grad=True needs a weight, got None");
  if (rms) {
    // RMSNorm has no mean; the forward returns an empty one, which is not read.
    check_cpu(mean, kBwd, "mean");
  } else {
    check_stat(mean, M, kBwd, "mean");
  }
  check_stat(rstd, M, kBwd, "rstd");

  const auto param_dtype = weight.has_value() ? weight->scalar_type() : dtype;
  const auto param_opts = normed_input.options().dtype(param_dtype);
  at::Tensor grad_input = at::empty({M, N}, normed_input.options());
  const bool param_grad = weight_grad || bias_grad;

  at::Tensor dw_sum;  // (N,) fp32, row sums of dy * xhat
  at::Tensor db_sum;  // (N,) fp32, row sums of dy
  if (M > 0 && N > 0) {
    const at::Tensor w = param_as_float(weight, N, 1.0f);
    // One chunk of rows per thread; each chunk owns a 2N-float partial dW/dB row.
    const int64_t grain = rows_grain(N);
    const int64_t max_chunks = (M + grain - 1) / grain;
    const int64_t n_chunks =
        param_grad ? std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), max_chunks))
                   : 1;
    at::Tensor partial = param_grad
                             ? at::zeros({n_chunks, 2, N}, normed_input.options().dtype(at::kFloat))
                             : at::Tensor();
    float* partial_ptr = param_grad ? partial.mutable_data_ptr<float>() : nullptr;

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
      if (param_grad) {
        const int64_t rows_per_chunk = (M + n_chunks - 1) / n_chunks;
        at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
          for (int64_t c = c_begin; c < c_end; ++c) {
            const int64_t r0 = c * rows_per_chunk;
            const int64_t r1 = std::min(M, r0 + rows_per_chunk);
            float* dw = partial_ptr + c * 2 * N;
            if (r0 < r1) norm_bwd_rows<scalar_t, true>(a, r0, r1, dw, dw + N);
          }
        });
      } else {
        at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
          norm_bwd_rows<scalar_t, false>(a, begin, end, nullptr, nullptr);
        });
      }
    });

    if (param_grad) {
      // Fold the chunk partials in chunk order: deterministic for a given thread count.
      at::Tensor sums = at::empty({2, N}, normed_input.options().dtype(at::kFloat));
      float* out_ptr = sums.mutable_data_ptr<float>();
      at::parallel_for(0, 2 * N, kMinElemsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) out_ptr[k] = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) {
          const float* p = partial_ptr + c * 2 * N;
          for (int64_t k = begin; k < end; ++k) out_ptr[k] += p[k];
        }
      });
      dw_sum = sums[0];
      db_sum = sums[1];
    }
  }

  at::Tensor grad_weight = at::empty({0}, param_opts);
  at::Tensor grad_bias = at::empty({0}, param_opts);
  // copy=true: the two gradients must not share the storage of `sums`.
  if (weight_grad) {
    grad_weight = dw_sum.defined() ? dw_sum.to(param_dtype, false, true) : at::zeros({N}, param_opts);
  }
  if (bias_grad) {
    grad_bias = db_sum.defined() ? db_sum.to(param_dtype, false, true) : at::zeros({N}, param_opts);
  }
  return {grad_input, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("norm_fwd", &norm_fwd_cpu);
  m.impl("norm_bwd", &norm_bwd_cpu);
}

}  // namespace llmfast
