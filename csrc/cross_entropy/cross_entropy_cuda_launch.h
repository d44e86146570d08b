// Launchers of the CUDA cross-entropy kernels (cross_entropy_cuda.cuh): checks, the launch plan,
// dispatch over dtypes and options, the reductions. Included by cross_entropy_cuda.cu, which
// registers them for CUDA tensors, and by tests/emulation/, which runs the very same launchers and
// kernels on CPU tensors through the SIMT emulator (LLMFAST_SIMT_EMULATION). Device queries go
// through device_compat.cuh.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/device_compat.cuh"
#include "cross_entropy/cross_entropy_cuda.cuh"

namespace llmfast {
namespace cross_entropy {

constexpr const char* kFwd = "llmfast::cross_entropy_fwd";
constexpr const char* kFwdInplace = "llmfast::cross_entropy_fwd_inplace";
constexpr const char* kScale = "llmfast::cross_entropy_scale_grad_";

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

inline void check_device(const at::Tensor& t, const char* op, const char* name) {
  LLMFAST_CHECK(t.device().type() == device::kTensorDevice, op, name, " must be a ",
                c10::DeviceTypeName(device::kTensorDevice), " tensor, got ", t.device());
}

struct LaunchPlan {
  bool looped;
  int threads;
  int cluster;
};

// Smallest cluster (then block) holding the row's slots in registers; looped otherwise.
inline LaunchPlan plan_for(int64_t V, int elt_size, bool clusters_ok) {
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

inline Prepared prepare(const char* op, const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                 double label_smoothing, double z_loss, std::optional<double> softcap) {
  check_device(logits, op, "logits");
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
    LLMFAST_LAUNCH(ce_prepare_kernel, dim3(1), dim3(kReduceThreads), 0, target.const_data_ptr<int64_t>(),
                   p.w.defined() ? p.w.const_data_ptr<float>() : nullptr, M, static_cast<int>(V), ignore_index,
                   p.scalars.mutable_data_ptr<float>());
    device::check_launch();
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
void launch_fwd(const CeArgs& a, const LaunchPlan& plan, bool smooth, bool cap) {
  bool_switch(smooth, [&](auto smooth_c) {
    bool_switch(cap, [&](auto cap_c) {
      constexpr bool kSmooth = decltype(smooth_c)::value;
      constexpr bool kCap = decltype(cap_c)::value;
      if (plan.looped) {
        device::launch(ce_looped_kernel<T, kSmooth, kCap>, static_cast<unsigned>(a.M), plan.threads, 0, 1, a);
      } else if (plan.cluster > 1) {
        device::launch(ce_row_kernel<T, true, kSmooth, kCap>, static_cast<unsigned>(a.M * plan.cluster),
                       plan.threads, 0, plan.cluster, a, plan.cluster);
      } else {
        device::launch(ce_row_kernel<T, false, kSmooth, kCap>, static_cast<unsigned>(a.M), plan.threads, 0, 1,
                       a, 1);
      }
    });
  });
}

// Runs the row kernel (gradient into `grad` when defined) and reduces; returns (loss, lse).
inline std::tuple<at::Tensor, at::Tensor> run_fwd(const at::Tensor& logits, const at::Tensor& target, const Prepared& p,
                                           const at::Tensor& grad, int64_t reduction, int64_t ignore_index,
                                           double label_smoothing, double z_loss, std::optional<double> softcap) {
  const int64_t M = logits.size(0);
  const int64_t V = logits.size(1);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::empty({M}, f32);
  at::Tensor lse = at::empty({M}, f32);
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
    const bool clusters_ok = device::clusters_supported();
    const LaunchPlan plan = plan_for(V, static_cast<int>(logits.element_size()), clusters_ok);
    const bool smooth = label_smoothing > 0.0;
    dispatch_logits_type(logits.scalar_type(), [&](auto tag) {
      launch_fwd<typename decltype(tag)::type>(a, plan, smooth, softcap.has_value());
    });
  }
  if (reduction == 0) return {loss_rows, lse};
  at::Tensor loss = at::empty({}, f32);
  LLMFAST_LAUNCH(ce_reduce_kernel, dim3(1), dim3(kReduceThreads), 0, loss_rows.const_data_ptr<float>(), M,
                 reduction == 1 ? p.scalars.const_data_ptr<float>() : nullptr, loss.mutable_data_ptr<float>());
  device::check_launch();
  return {loss, lse};
}

// The kernels address the gradient row through the logits row's 16-byte misalignment, so the
// two buffers must share it; a logits view at an odd offset is copied once (rare).
inline at::Tensor aligned_like(const at::Tensor& logits, const at::Tensor& grad) {
  const auto a = reinterpret_cast<uintptr_t>(logits.const_data_ptr()) & 15;
  const auto b = reinterpret_cast<uintptr_t>(grad.const_data_ptr()) & 15;
  return a == b ? logits : logits.clone(at::MemoryFormat::Contiguous);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_kernels(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, bool compute_grad) {
  const device::DeviceGuard guard(logits.device());
  const Prepared p = prepare(kFwd, logits, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                             softcap);
  at::Tensor grad = compute_grad ? at::empty(logits.sizes(), logits.options()) : at::Tensor();
  const at::Tensor x = compute_grad ? aligned_like(logits, grad) : logits;
  auto [loss, lse] = run_fwd(x, target, p, grad, reduction, ignore_index, label_smoothing, z_loss, softcap);
  return {loss, lse, compute_grad ? grad : at::empty({0}, logits.options())};
}

inline std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_kernels(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t reduction,
    int64_t ignore_index, double label_smoothing, double z_loss, std::optional<double> softcap) {
  const device::DeviceGuard guard(logits.device());
  const Prepared p = prepare(kFwdInplace, logits, target, weight, reduction, ignore_index, label_smoothing,
                             z_loss, softcap);
  return run_fwd(logits, target, p, logits, reduction, ignore_index, label_smoothing, z_loss, softcap);
}

inline void cross_entropy_scale_grad_kernels(at::Tensor& grad_logits, const at::Tensor& grad_output) {
  check_device(grad_logits, kScale, "grad_logits");
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
  const device::DeviceGuard guard(grad_logits.device());
  constexpr int64_t kCols = kScaleThreads * kScaleElemsPerThread;
  const int64_t col_blocks = (V + kCols - 1) / kCols;
  // Enough blocks to fill the GPU (8 a multiprocessor), never more than there are tiles.
  const int64_t blocks = std::min<int64_t>(M * col_blocks, 8 * static_cast<int64_t>(device::sm_count()));
  const bool per_row = grad_output.numel() == M && M != 1;
  dispatch_logits_type(grad_logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    LLMFAST_LAUNCH(ce_scale_grad_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kScaleThreads), 0,
                   grad_logits.mutable_data_ptr<T>(), grad_output.const_data_ptr<float>(), M, static_cast<int>(V),
                   static_cast<int>(col_blocks), per_row);
  });
  device::check_launch();
}

}  // namespace cross_entropy
}  // namespace llmfast
