// Argument checks and output allocation of the norm ops, shared by the CPU and CUDA launchers
// (norm_cpu.cpp, norm_cuda.cu). The contract they enforce is in norm_ops.cpp. Every message names the op and
// the argument, e.g. "llmfast::norm_fwd: weight must have 768 elements, got 767".
#pragma once
#include <limits>
#include <optional>
#include <tuple>

#include "common/checks.h"

namespace llmfast {
namespace norm {

constexpr const char* kFwd = "llmfast::norm_fwd";
constexpr const char* kBwd = "llmfast::norm_bwd";

// Any tensor of the call: on a device of type `type`, and on `ref`'s device.
inline void check_on(const at::Tensor& t, const at::Tensor& ref, c10::DeviceType type,
                     const char* op, const char* name) {
  LLMFAST_CHECK(t.device().type() == type, op, name, " must be a ", c10::DeviceTypeName(type),
                " tensor, got ", t.device());
  check_same_device(t, ref, op, name);
}

// The (M, N) tensor everything else is checked against: 2-D, contiguous, float32/16/bf16.
inline void check_matrix(const at::Tensor& t, c10::DeviceType type, const char* op,
                         const char* name) {
  check_on(t, t, type, op, name);
  LLMFAST_CHECK(t.dim() == 2, op, name, " must be 2-D (M, N), got shape ", t.sizes());
  check_floating(t, op, name);
  check_contiguous(t, op, name);
}

// Another (M, N) tensor that must match `ref` (named ref_name) in device, shape and dtype.
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name, const char* ref_name) {
  check_on(t, ref, ref.device().type(), op, name);
  LLMFAST_CHECK(t.sizes() == ref.sizes(), op, name, " must have the shape of ", ref_name, " ",
                ref.sizes(), ", got ", t.sizes());
  LLMFAST_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ",
                ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  check_contiguous(t, op, name);
}

// weight / bias: (N,), contiguous, dtype of `ref` (the input) or float32.
inline void check_param(const at::Tensor& t, const at::Tensor& ref, const char* op,
                        const char* name) {
  check_on(t, ref, ref.device().type(), op, name);
  const int64_t N = ref.size(1);
  LLMFAST_CHECK(t.dim() == 1, op, name, " must be 1-D, got shape ", t.sizes());
  LLMFAST_CHECK(t.numel() == N, op, name, " must have ", N, " elements, got ", t.numel());
  LLMFAST_CHECK(t.scalar_type() == ref.scalar_type() || t.scalar_type() == at::kFloat, op, name,
                " must have the input's dtype (", ref.scalar_type(), ") or float32, got ",
                t.scalar_type());
  check_contiguous(t, op, name);
}

// Per-row statistic: float32, (M,), contiguous.
inline void check_stat(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name) {
  check_on(t, ref, ref.device().type(), op, name);
  const int64_t M = ref.size(0);
  LLMFAST_CHECK(t.scalar_type() == at::kFloat, op, name, " must be float32, got ",
                t.scalar_type());
  LLMFAST_CHECK(t.dim() == 1 && t.size(0) == M, op, name, " must have shape (", M, ",), got ",
                t.sizes());
  check_contiguous(t, op, name);
}

inline void check_fwd_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, c10::DeviceType type) {
  check_matrix(input, type, kFwd, "input");
  if (residual.has_value()) check_like(*residual, input, kFwd, "residual", "input");
  if (weight.has_value()) check_param(*weight, input, kFwd, "weight");
  if (bias.has_value()) {
    check_param(*bias, input, kFwd, "bias");
    if (weight.has_value()) {
      LLMFAST_CHECK(bias->scalar_type() == weight->scalar_type(), kFwd,
                    "bias must have the dtype of weight (", weight->scalar_type(), "), got ",
                    bias->scalar_type());
    }
  }
}

inline void check_bwd_args(const at::Tensor& grad_out,
                           const std::optional<at::Tensor>& grad_residual_out,
                           const at::Tensor& normed_input, const std::optional<at::Tensor>& weight,
                           const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                           bool weight_grad, c10::DeviceType type) {
  check_matrix(normed_input, type, kBwd, "normed_input");
  check_like(grad_out, normed_input, kBwd, "grad_out", "normed_input");
  if (grad_residual_out.has_value()) {
    check_like(*grad_residual_out, normed_input, kBwd, "grad_residual_out", "normed_input");
  }
  if (weight.has_value()) check_param(*weight, normed_input, kBwd, "weight");
  LLMFAST_CHECK(!weight_grad || weight.has_value(), kBwd,
                "weight_grad=True needs a weight, got None");
  if (rms) {
    // RMSNorm has no mean; the forward returns an empty one, which is not read.
    check_on(mean, normed_input, type, kBwd, "mean");
  } else {
    check_stat(mean, normed_input, kBwd, "mean");
  }
  check_stat(rstd, normed_input, kBwd, "rstd");
}

// norm_fwd's outputs (out, residual_out, mean, rstd) on the input's device. When the input is
// empty they are already final: an empty row's statistics are what torch.native_layer_norm
// reports (mean 0, rstd NaN), and the launcher returns them without a kernel.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_outputs(
    const at::Tensor& input, bool has_residual, bool rms) {
  const int64_t M = input.size(0);
  const int64_t N = input.size(1);
  const auto f32 = input.options().dtype(at::kFloat);
  at::Tensor out = at::empty({M, N}, input.options());
  at::Tensor residual_out =
      has_residual ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
  at::Tensor mean = at::empty({rms ? 0 : M}, f32);
  at::Tensor rstd = at::empty({M}, f32);
  if (M > 0 && N == 0) {
    if (!rms) mean.zero_();
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return {out, residual_out, mean, rstd};
}

}  // namespace norm
}  // namespace llmfast
