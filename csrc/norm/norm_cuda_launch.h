// Launchers of the CUDA norm kernels (norm_cuda.cuh): checks, outputs, the row layout, dispatch
// over dtypes. Included by norm_cuda.cu, which registers them for CUDA tensors, and by
// tests/emulation/, which runs the very same launchers and kernels on CPU tensors through the
// SIMT emulator (LLMFAST_SIMT_EMULATION). Device queries go through device_compat.cuh.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/device_compat.cuh"
#include "norm/norm_checks.h"
#include "norm/norm_cuda.cuh"

namespace llmfast {
namespace norm {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>, Tag<W>) for the input dtype T and the parameter dtype W (T or float).
template <typename F>
void dispatch_dtypes(at::ScalarType input, at::ScalarType param, F&& f) {
  switch (input) {
    case at::kFloat:
      f(Tag<float>{}, Tag<float>{});
      return;
    case at::kHalf:
      if (param == at::kFloat) {
        f(Tag<at::Half>{}, Tag<float>{});
      } else {
        f(Tag<at::Half>{}, Tag<at::Half>{});
      }
      return;
    case at::kBFloat16:
      if (param == at::kFloat) {
        f(Tag<at::BFloat16>{}, Tag<float>{});
      } else {
        f(Tag<at::BFloat16>{}, Tag<at::BFloat16>{});
      }
      return;
    default:
      TORCH_CHECK(false, "llmfast: unsupported dtype ", input);
  }
}

// How a row is laid over threads by the register-resident kernels.
struct RowLayout {
  int tpr;             // threads per row inside one block
  int rows_per_block;  // row groups per block (1 when cluster > 1)
  int cluster;         // blocks per row
  int block;           // threads per block
};

// Lays out a row of nvec vectors, vpt vectors per thread. False when it does not fit the
// register-resident kernels (then the generic kernels run).
inline bool plan_row_layout(int64_t nvec, int vpt, int target, bool clusters_ok, RowLayout& l) {
  const int64_t need = ceil_div<int64_t>(nvec, vpt);
  int64_t tpr = 1;
  if (need <= 32) {
    while (tpr < need) tpr *= 2;
  } else {
    tpr = round_up<int64_t>(need, 32);
  }
  if (tpr <= target) {
    l.tpr = static_cast<int>(tpr);
    l.rows_per_block = target / l.tpr;
    l.cluster = 1;
    l.block = l.tpr * l.rows_per_block;
    return true;
  }
  if (tpr <= kMaxThreads) {
    l.tpr = static_cast<int>(tpr);
    l.rows_per_block = 1;
    l.cluster = 1;
    l.block = l.tpr;
    return true;
  }
  if (!clusters_ok) return false;
  const int64_t cluster = ceil_div<int64_t>(need, kMaxThreads);
  if (cluster > kMaxCluster) return false;
  l.cluster = static_cast<int>(cluster);
  l.tpr = static_cast<int>(round_up<int64_t>(ceil_div<int64_t>(need, cluster), 32));
  l.rows_per_block = 1;
  l.block = l.tpr;
  return true;
}

inline unsigned checked_grid(int64_t blocks) {
  TORCH_CHECK(blocks > 0 && blocks <= std::numeric_limits<int>::max(),
              "llmfast: grid of ", blocks, " blocks is out of range");
  return static_cast<unsigned>(blocks);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_kernels(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  norm::check_fwd_args(input, residual, weight, bias, device::kTensorDevice);
  const int64_t M = input.size(0);
  const int64_t N = input.size(1);

  const device::DeviceGuard guard(input.device());
  at::Tensor out, residual_out, mean, rstd;
  std::tie(out, residual_out, mean, rstd) = norm::fwd_outputs(input, residual.has_value(), rms);
  if (M == 0 || N == 0) return {out, residual_out, mean, rstd};

  FwdParams p{};
  p.x = input.const_data_ptr();
  p.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  p.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.residual_out = residual.has_value() ? residual_out.mutable_data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.rows = M;
  p.cols = N;
  p.eps = static_cast<float>(eps);
  p.inv_cols = 1.0f / static_cast<float>(N);
  p.rms = rms;

  const auto dtype = input.scalar_type();
  const auto param_dtype = weight.has_value() ? weight->scalar_type()
                           : bias.has_value() ? bias->scalar_type()
                                              : dtype;
  const int vec = static_cast<int>(16 / input.element_size());
  const bool aligned = N % vec == 0 && cuda::is_aligned_16(p.x) &&
                       cuda::is_aligned_16(p.residual) && cuda::is_aligned_16(p.weight) &&
                       cuda::is_aligned_16(p.bias) && cuda::is_aligned_16(p.out) &&
                       cuda::is_aligned_16(p.residual_out);
  const bool clusters_ok = device::clusters_supported();

  dispatch_dtypes(dtype, param_dtype, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    RowLayout l;
    if (aligned && plan_row_layout(N / vec, kFwdVecsPerThread, kFwdTargetThreads, clusters_ok, l)) {
      p.nvec = static_cast<int>(N / vec);
      p.tpr = l.tpr;
      p.rows_per_block = l.rows_per_block;
      p.cluster = l.cluster;
      p.n_groups = ceil_div<int64_t>(M, l.rows_per_block);
      // One cluster per row group: measured faster than a persistent grid here.
      auto kernel =
          residual.has_value() ? norm_fwd_kernel<T, W, true> : norm_fwd_kernel<T, W, false>;
      device::launch(kernel, checked_grid(p.n_groups * l.cluster), l.block, 0, l.cluster, p);
    } else {
      const int block = static_cast<int>(
          std::min<int64_t>(kGenericThreads, round_up<int64_t>(N, 32)));
      p.tpr = block;
      p.rows_per_block = 1;
      p.cluster = 1;
      p.n_groups = M;
      device::launch(norm_fwd_generic_kernel<T, W>, checked_grid(std::min<int64_t>(M, 1 << 20)),
                     block, 0, 1, p);
    }
  });
  return {out, residual_out, mean, rstd};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_kernels(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& normed_input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, bool rms, bool weight_grad, bool bias_grad) {
  norm::check_bwd_args(grad_out, grad_residual_out, normed_input, weight, mean, rstd, rms,
                       weight_grad, device::kTensorDevice);
  const int64_t M = normed_input.size(0);
  const int64_t N = normed_input.size(1);

  const device::DeviceGuard guard(normed_input.device());
  const auto dtype = normed_input.scalar_type();
  const auto param_dtype = weight.has_value() ? weight->scalar_type() : dtype;
  const auto param_opts = normed_input.options().dtype(param_dtype);
  at::Tensor grad_input = at::empty({M, N}, normed_input.options());
  at::Tensor grad_weight = at::empty({0}, param_opts);
  at::Tensor grad_bias = at::empty({0}, param_opts);
  if (M == 0 || N == 0) {
    if (weight_grad) grad_weight = at::zeros({N}, param_opts);
    if (bias_grad) grad_bias = at::zeros({N}, param_opts);
    return {grad_input, grad_weight, grad_bias};
  }
  if (weight_grad) grad_weight = at::empty({N}, param_opts);
  if (bias_grad) grad_bias = at::empty({N}, param_opts);

  BwdParams p{};
  p.dy = grad_out.const_data_ptr();
  p.dres = grad_residual_out.has_value() ? grad_residual_out->const_data_ptr() : nullptr;
  p.x = normed_input.const_data_ptr();
  p.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.const_data_ptr<float>();
  p.rstd = rstd.const_data_ptr<float>();
  p.dx = grad_input.mutable_data_ptr();
  p.rows = M;
  p.cols = N;
  p.inv_cols = 1.0f / static_cast<float>(N);
  p.rms = rms;

  const int vec = static_cast<int>(16 / normed_input.element_size());
  const bool aligned = N % vec == 0 && cuda::is_aligned_16(p.dy) &&
                       cuda::is_aligned_16(p.dres) && cuda::is_aligned_16(p.x) &&
                       cuda::is_aligned_16(p.weight) && cuda::is_aligned_16(p.dx);
  const bool clusters_ok = device::clusters_supported();
  const int n_sm = device::sm_count();
  const auto f32 = normed_input.options().dtype(at::kFloat);
  at::Tensor ws_w, ws_b;
  int64_t parts = 0;

  dispatch_dtypes(dtype, param_dtype, [&](auto t_tag, auto w_tag) {
    using T = typename decltype(t_tag)::type;
    using W = typename decltype(w_tag)::type;
    constexpr int VEC = vec_of<T>();
    RowLayout l;
    if (aligned && plan_row_layout(N / VEC, kBwdVecsPerThread, kBwdTargetThreads, clusters_ok, l)) {
      auto kernel = norm_bwd_kernel<T, W>;
      const int n_acc = (weight_grad ? 1 : 0) + (bias_grad ? 1 : 0);
      const size_t smem =
          static_cast<size_t>(l.block) * kBwdVecsPerThread * VEC * sizeof(float) * n_acc;
      // Always the largest size any launch asks for: concurrent callers never lower it.
      device::allow_shared_bytes(kernel, kBwdMaxSmem);
      // Persistent grid: as many clusters as can be resident at once, never more than there are
      // row groups.
      const int64_t resident = device::resident_clusters(kernel, l.block, smem, l.cluster);
      const int64_t n_groups = ceil_div<int64_t>(M, l.rows_per_block);
      parts = std::min<int64_t>(n_groups, resident);
      if (weight_grad) ws_w = at::empty({parts, N}, f32);
      if (bias_grad) ws_b = at::empty({parts, N}, f32);
      p.ws_w = weight_grad ? ws_w.mutable_data_ptr<float>() : nullptr;
      p.ws_b = bias_grad ? ws_b.mutable_data_ptr<float>() : nullptr;
      p.nvec = static_cast<int>(N / VEC);
      p.tpr = l.tpr;
      p.rows_per_block = l.rows_per_block;
      p.cluster = l.cluster;
      p.n_groups = n_groups;
      p.prefetch = l.cluster > 1;
      device::launch(kernel, checked_grid(parts * l.cluster), l.block, smem, l.cluster, p);
    } else {
      const int block = static_cast<int>(
          std::min<int64_t>(kGenericThreads, round_up<int64_t>(N, 32)));
      // Without parameter gradients there is no workspace: one block per row. With them, the
      // workspace holds a row per block: at most 2 blocks per SM and 2^22 floats per tensor.
      const int64_t blocks =
          (weight_grad || bias_grad)
              ? std::max<int64_t>(1, std::min<int64_t>({M, 2 * static_cast<int64_t>(n_sm),
                                                        (int64_t{1} << 22) / N}))
              : std::min<int64_t>(M, 1 << 20);
      parts = blocks;
      if (weight_grad) ws_w = at::empty({parts, N}, f32);
      if (bias_grad) ws_b = at::empty({parts, N}, f32);
      p.ws_w = weight_grad ? ws_w.mutable_data_ptr<float>() : nullptr;
      p.ws_b = bias_grad ? ws_b.mutable_data_ptr<float>() : nullptr;
      p.tpr = block;
      p.rows_per_block = 1;
      p.cluster = 1;
      p.n_groups = M;
      device::launch(norm_bwd_generic_kernel<T, W>, checked_grid(blocks), block, 0, 1, p);
    }

    if (weight_grad || bias_grad) {
      // Both gradients share W: the weight's dtype, or the input's when there is no weight.
      const float* ws0 = weight_grad ? ws_w.const_data_ptr<float>() : ws_b.const_data_ptr<float>();
      W* out0 = weight_grad ? grad_weight.mutable_data_ptr<W>() : grad_bias.mutable_data_ptr<W>();
      const bool both = weight_grad && bias_grad;
      const float* ws1 = both ? ws_b.const_data_ptr<float>() : nullptr;
      W* out1 = both ? grad_bias.mutable_data_ptr<W>() : nullptr;
      const dim3 grid(checked_grid(ceil_div<int64_t>(N, 32)), both ? 2 : 1, 1);
      LLMFAST_LAUNCH(norm_param_grad_reduce_kernel<W>, grid, dim3(32, 32, 1), 0, ws0, out0, ws1,
                     out1, parts, N);
      device::check_launch();
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace norm
}  // namespace llmfast
