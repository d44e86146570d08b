// CPU kernels of llmfast::cross_entropy_fwd / cross_entropy_fwd_inplace /
// cross_entropy_scale_grad_. The contract is documented in cross_entropy_ops.cpp, the math in
// llmfast/reference/cross_entropy.py.
//
// Algorithm: a serial pre-pass over the M targets checks that each is ignore_index or in
// [0, V) (a clear error before any row is touched) and sums the 'mean' denominator
// sum w[t] in double. Rows are then split over threads with at::parallel_for; each row is
// widened (and soft-capped) into a per-thread fp32 buffer of V floats, so the row is read from
// memory once and every later pass runs from L1/L2: max, exp(x - max) into a second buffer
// (exp_nonpositive: vectorised, not libm's scalar exp), its sum (kLanes independent
// accumulators), the loss, then the gradient written once in the logits dtype. The loss uses
// (max - x[t]) + log(sum) rather than lse - x[t], and the gradient exp(x - max) / sum rather
// than exp(x - lse), so logits of large magnitude (1e4) lose no digits to cancellation.
// Per-row losses are reduced in double, in row order (deterministic).
//
// Memory traffic (T = element size): reads the logits once (M*V*T) and writes the gradient once
// (M*V*T) when it is asked for; ignored rows are not read. The scale kernel reads and writes
// only the rows whose factor is not 1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cpu_utils.h"

namespace llmfast {
namespace cpu_simd {

// The row kernel's two hottest loops, compiled for AVX2 and the baseline
// (LLMFAST_SIMD_CLONES, cpu_utils.h).

// max_i x[i] (NaNs skipped, as the scalar `a < b ? b : a` form skips them).
LLMFAST_SIMD_CLONES float ce_row_max(const float* x, int64_t n) {
  return lane_max<16>(n, [&](int64_t i) { return x[i]; }, -std::numeric_limits<float>::infinity());
}

// e[i] = exp(x[i] - m); returns sum_i e[i].
LLMFAST_SIMD_CLONES float ce_exp_shifted(const float* x, float* e, int64_t n, float m) {
  for (int64_t i = 0; i < n; ++i) e[i] = exp_nonpositive(x[i] - m);
  return lane_sum<16>(n, [&](int64_t i) { return e[i]; });
}

}  // namespace cpu_simd

namespace {

constexpr const char* kFwd = "llmfast::cross_entropy_fwd";
constexpr const char* kFwdInplace = "llmfast::cross_entropy_fwd_inplace";
constexpr const char* kScale = "llmfast::cross_entropy_scale_grad_";

// Independent accumulators per row sum (see norm_cpu.cpp).
constexpr int64_t kLanes = 16;
// Rows per parallel task are chosen so that a task touches at least this many elements.
constexpr int64_t kMinElemsPerTask = 1 << 14;

int64_t rows_grain(int64_t V) {
  return std::max<int64_t>(1, kMinElemsPerTask / std::max<int64_t>(V, 1));
}

// Arguments of the row kernel. logits, grad: (M, V) row-major (grad may alias logits, or be
// null when no gradient is wanted); target (M,); w (V,) fp32 or null; loss_rows, lse (M,) fp32.
template <typename T>
struct FwdArgs {
  const T* logits;
  const int64_t* target;
  const float* w;
  T* grad;
  float* loss_rows;
  float* lse;
  int64_t V;
  int64_t ignore_index;
  float smoothing;   // label_smoothing
  float z_loss;
  float softcap;     // 0 = off
  float w_sum;       // sum_c w[c] (V without weights), used by label smoothing
  float grad_scale;  // 1 / sum w[t] for 'mean', else 1
};

// Rows [begin, end). Reads each non-ignored row once; writes its gradient row once. Every
// pass over the row runs branch-free on the thread's buffers (so it vectorises); the target
// column's gradient is fixed up afterwards.
template <typename T>
void ce_fwd_rows(const FwdArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t V = a.V;
  std::vector<float> buf(2 * V);
  float* x = buf.data();  // the row, widened (and soft-capped)
  float* e = x + V;       // exp(x - max)
  const float eps_c = a.smoothing / static_cast<float>(V);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * V;
    const int64_t t = a.target[row];
    if (t == a.ignore_index) {
      a.loss_rows[row] = 0.0f;
      a.lse[row] = 0.0f;
      if (a.grad != nullptr) std::fill(a.grad + off, a.grad + off + V, static_cast<T>(0.0f));
      continue;
    }
    const T* src = a.logits + off;
    if (a.softcap > 0.0f) {
      const float inv_cap = 1.0f / a.softcap;
      for (int64_t i = 0; i < V; ++i) x[i] = a.softcap * std::tanh(static_cast<float>(src[i]) * inv_cap);
    } else {
      for (int64_t i = 0; i < V; ++i) x[i] = static_cast<float>(src[i]);
    }

    const float m = cpu_simd::ce_row_max(x, V);
    const float sum = cpu_simd::ce_exp_shifted(x, e, V, m);
    const float log_sum = std::log(sum);
    const float lse = m + log_sum;
    const float w_t = a.w != nullptr ? a.w[t] : 1.0f;

    float loss = w_t * ((m - x[t]) + log_sum);
    if (a.smoothing > 0.0f) {
      // sum_c w[c] * (lse - x[c]) = sum_c w[c] * (m - x[c]) + w_sum * log_sum
      const float sw = a.w != nullptr ? lane_sum<kLanes>(V, [&](int64_t i) { return a.w[i] * (m - x[i]); })
                                      : lane_sum<kLanes>(V, [&](int64_t i) { return m - x[i]; });
      loss = (1.0f - a.smoothing) * loss + eps_c * (sw + a.w_sum * log_sum);
    }
    if (a.z_loss != 0.0f) loss += a.z_loss * w_t * lse * lse;
    a.loss_rows[row] = loss;
    a.lse[row] = lse;

    if (a.grad != nullptr) {
      // d loss / d x_j = p_j * (w_t (1 - eps) + eps/V * w_sum + 2 z w_t lse)
      //                  - w_t (1 - eps) [j == t] - eps/V * w_j, times 1 - tanh^2 with softcap
      const float s = a.grad_scale;
      const float inv_sum = 1.0f / sum;
      const float coef_p =
          s * inv_sum * (w_t * (1.0f - a.smoothing) + eps_c * a.w_sum + 2.0f * a.z_loss * w_t * lse);
      const float coef_t = s * w_t * (1.0f - a.smoothing);
      const float coef_w = s * eps_c;
      const float inv_cap = a.softcap > 0.0f ? 1.0f / a.softcap : 0.0f;
      const auto grad_at = [&](int64_t j) {  // without the target term
        float d = e[j] * coef_p;
        if (a.smoothing > 0.0f) d -= coef_w * (a.w != nullptr ? a.w[j] : 1.0f);
        return d;
      };
      T* g = a.grad + off;
      if (a.softcap > 0.0f) {
        for (int64_t j = 0; j < V; ++j) {
          const float th = x[j] * inv_cap;  // tanh(z / softcap)
          g[j] = static_cast<T>(grad_at(j) * (1.0f - th * th));
        }
      } else if (a.smoothing > 0.0f) {
        for (int64_t j = 0; j < V; ++j) g[j] = static_cast<T>(grad_at(j));
      } else {
        for (int64_t j = 0; j < V; ++j) g[j] = static_cast<T>(e[j] * coef_p);
      }
      float d_t = grad_at(t) - coef_t;
      if (a.softcap > 0.0f) {
        const float th = x[t] * inv_cap;
        d_t *= 1.0f - th * th;
      }
      g[t] = static_cast<T>(d_t);
    }
  }
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  LLMFAST_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
}

struct Prepared {
  at::Tensor w;  // (V,) fp32 contiguous, or undefined
  float w_sum;
  double total_weight;  // sum over non-ignored rows of w[t]
};

// Checks every argument and every target (before any kernel runs); computes the class-weight
// sum and the 'mean' denominator.
Prepared prepare(const char* op, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                 double label_smoothing, double z_loss, std::optional<double> softcap) {
  check_cpu(logits, op, "logits");
  LLMFAST_CHECK(logits.dim() == 2, op, "logits must be 2-D (M, V), got shape ", logits.sizes());
  check_floating(logits, op, "logits");
  check_contiguous(logits, op, "logits");
  const int64_t M = logits.size(0);
  const int64_t V = logits.size(1);
  LLMFAST_CHECK(V >= 1, op, "logits must have at least one class (V >= 1), got V = ", V);
  check_cpu(target, op, "target");
  LLMFAST_CHECK(target.scalar_type() == at::kLong, op, "target must be int64, got ",
                target.scalar_type());
  LLMFAST_CHECK(target.dim() == 1 && target.size(0) == M, op, "target must have shape (", M,
                ",), got ", target.sizes());
  check_contiguous(target, op, "target");
  LLMFAST_CHECK(reduction >= 0 && reduction <= 2, op,
                "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  LLMFAST_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                "label_smoothing must be in [0, 1], got ", label_smoothing);
  LLMFAST_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, op,
                "z_loss must be a finite number >= 0, got ", z_loss);
  LLMFAST_CHECK(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0.0), op,
                "softcap must be None or a finite number > 0, got ", softcap.value_or(0.0));

  Prepared p;
  p.w_sum = static_cast<float>(V);
  if (weight.has_value()) {
    check_cpu(*weight, op, "weight");
    LLMFAST_CHECK(weight->dim() == 1 && weight->size(0) == V, op, "weight must have shape (", V,
                  ",), got ", weight->sizes());
    LLMFAST_CHECK(at::isFloatingType(weight->scalar_type()), op,
                  "weight must be a floating-point tensor, got ", weight->scalar_type());
    p.w = weight->to(at::kFloat).contiguous();
    const float* w = p.w.const_data_ptr<float>();
    double s = 0.0;
    for (int64_t c = 0; c < V; ++c) s += w[c];
    p.w_sum = static_cast<float>(s);
  }

  const int64_t* t = target.const_data_ptr<int64_t>();
  const float* w = p.w.defined() ? p.w.const_data_ptr<float>() : nullptr;
  double total = 0.0;
  for (int64_t i = 0; i < M; ++i) {
    const int64_t ti = t[i];
    if (ti == ignore_index) continue;
    // IndexError in Python, as torch raises for an out-of-range class index.
    TORCH_CHECK_INDEX(ti >= 0 && ti < V, op, ": target[", i, "] = ", ti,
                  " is out of bounds: targets must be in [0, ", V, ") or equal ignore_index (",
                  ignore_index, ")");
    total += w != nullptr ? w[ti] : 1.0;
  }
  p.total_weight = total;
  return p;
}

// Runs the row kernel into `grad` (null: no gradient) and reduces the per-row losses.
std::tuple<at::Tensor, at::Tensor> run_fwd(const at::Tensor& logits, const at::Tensor& target,
                                           const Prepared& p, at::Tensor* grad, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing,
                                           double z_loss, std::optional<double> softcap) {
  const int64_t M = logits.size(0);
  const int64_t V = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::empty({M}, f32);
  at::Tensor lse = at::empty({M}, f32);
  if (M > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
      FwdArgs<scalar_t> a;
      a.logits = logits.const_data_ptr<scalar_t>();
      a.target = target.const_data_ptr<int64_t>();
      a.w = p.w.defined() ? p.w.const_data_ptr<float>() : nullptr;
      a.grad = grad != nullptr ? grad->mutable_data_ptr<scalar_t>() : nullptr;
      a.loss_rows = loss_rows.mutable_data_ptr<float>();
      a.lse = lse.mutable_data_ptr<float>();
      a.V = V;
      a.ignore_index = ignore_index;
      a.smoothing = static_cast<float>(label_smoothing);
      a.z_loss = static_cast<float>(z_loss);
      a.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
      a.w_sum = p.w_sum;
      // 'mean': 1 / 0 = inf when every target is ignored; ignored rows never use it.
      a.grad_scale = reduction == 1 ? static_cast<float>(1.0 / p.total_weight) : 1.0f;
      at::parallel_for(0, M, rows_grain(V),
                       [&](int64_t begin, int64_t end) { ce_fwd_rows(a, begin, end); });
    });
  }
  if (reduction == 0) return {loss_rows, lse};
  const float* lr = loss_rows.const_data_ptr<float>();
  double total = 0.0;
  for (int64_t i = 0; i < M; ++i) total += lr[i];
  if (reduction == 1) {
    // 'mean' over a zero weight sum (every target ignored, or zero class weights) is NaN, as
    // torch's (its NLL term is 0 / 0), also where label smoothing or z_loss leave a sum
    total = p.total_weight == 0.0 ? std::numeric_limits<double>::quiet_NaN() : total / p.total_weight;
  }
  return {at::scalar_tensor(total, f32), lse};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, bool compute_grad) {
  const Prepared p = prepare(kFwd, logits, target, weight, reduction, ignore_index,
                             label_smoothing, z_loss, softcap);
  at::Tensor grad = compute_grad ? at::empty(logits.sizes(), logits.options())
                                 : at::empty({0}, logits.options());
  auto [loss, lse] = run_fwd(logits, target, p, compute_grad ? &grad : nullptr, reduction,
                             ignore_index, label_smoothing, z_loss, softcap);
  return {loss, lse, grad};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cpu(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap) {
  const Prepared p = prepare(kFwdInplace, logits, target, weight, reduction, ignore_index,
                             label_smoothing, z_loss, softcap);
  // Each row is copied into the thread's buffer before its gradient overwrites it.
  return run_fwd(logits, target, p, &logits, reduction, ignore_index, label_smoothing, z_loss,
                 softcap);
}

void cross_entropy_scale_grad_cpu(at::Tensor& grad_logits, const at::Tensor& grad_output) {
  check_cpu(grad_logits, kScale, "grad_logits");
  LLMFAST_CHECK(grad_logits.dim() == 2, kScale, "grad_logits must be 2-D (M, V), got shape ",
                grad_logits.sizes());
  check_floating(grad_logits, kScale, "grad_logits");
  check_contiguous(grad_logits, kScale, "grad_logits");
  const int64_t M = grad_logits.size(0);
  const int64_t V = grad_logits.size(1);
  check_cpu(grad_output, kScale, "grad_output");
  LLMFAST_CHECK(grad_output.scalar_type() == at::kFloat, kScale,
                "grad_output must be float32, got ", grad_output.scalar_type());
  LLMFAST_CHECK(grad_output.numel() == 1 || grad_output.numel() == M, kScale,
                "grad_output must have 1 or ", M, " elements, got ", grad_output.numel());
  check_contiguous(grad_output, kScale, "grad_output");
  if (M == 0 || V == 0) return;
  const float* go = grad_output.const_data_ptr<float>();
  const bool per_row = grad_output.numel() == M && M != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_logits.scalar_type(), "cross_entropy_scale_grad_cpu", [&] {
    scalar_t* g = grad_logits.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, M, rows_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float f = go[per_row ? row : 0];
        if (f == 1.0f) continue;
        scalar_t* r = g + row * V;
        for (int64_t j = 0; j < V; ++j) r[j] = static_cast<scalar_t>(static_cast<float>(r[j]) * f);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(llmfast, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace_cpu);
  m.impl("cross_entropy_scale_grad_", &cross_entropy_scale_grad_cpu);
}

}  // namespace llmfast
