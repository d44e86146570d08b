// Launchers of the CUDA attention kernels (attention_cuda.cuh): checks, outputs, dispatch over
// dtype and head dim. Included by attention_cuda.cu, which registers them for CUDA tensors, and
// by tests/emulation/, which runs the very same launchers and kernels on CPU tensors through the
// SIMT emulator (LLMFAST_SIMT_EMULATION).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "attention/attention_cuda.cuh"
#include "attention/attention_problem.h"
#include "common/checks.h"

#ifndef LLMFAST_SIMT_EMULATION
#include <c10/cuda/CUDAGuard.h>
#endif

namespace llmfast {
namespace attention {

#ifdef LLMFAST_SIMT_EMULATION
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
#endif

constexpr int kMaxHeadDim = 256;

// The kernels' head dim for max(D, Dv): 32, 64, 128 or 256.
inline int kernel_head_dim(int64_t d) {
  return d <= 32 ? 32 : d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

// Calls f(T{}, std::integral_constant<int, kD>{}) for the element type and kernel head dim.
template <typename F>
void dispatch(at::ScalarType dtype, int head_dim, F&& f) {
  auto with_dim = [&](auto tag) {
    switch (head_dim) {
      case 32: f(tag, std::integral_constant<int, 32>{}); break;
      case 64: f(tag, std::integral_constant<int, 64>{}); break;
      case 128: f(tag, std::integral_constant<int, 128>{}); break;
      default: f(tag, std::integral_constant<int, 256>{}); break;
    }
  };
  switch (dtype) {
    case at::kHalf: with_dim(__half{}); break;
    case at::kBFloat16: with_dim(__nv_bfloat16{}); break;
    default: with_dim(float{}); break;
  }
}

// A view whose last dimension is contiguous (a copy only when it is not).
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// True when every row of the 4-D tensor t starts 16-byte aligned (vector loads).
inline bool rows_aligned(const at::Tensor& t) {
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  if ((reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) & 15) != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % vec != 0) return false;
  }
  return true;
}

inline int mask_kind(const at::Tensor& m) {
  switch (m.scalar_type()) {
    case at::kBool: return kMaskBool;
    case at::kFloat: return kMaskF32;
    case at::kHalf: return kMaskF16;
    case at::kBFloat16: return kMaskBF16;
    default: return kMaskF64;
  }
}

// A kernel's shared memory must fit the GPU's per-block limit (sm_86/89 allow 99 KB, less than
// the large-head-dim tiles of sm_80 and sm_90 use).
inline void check_shared_bytes(const char* op, int bytes, int64_t head_dim, at::ScalarType dtype) {
#ifndef LLMFAST_SIMT_EMULATION
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  LLMFAST_CHECK(static_cast<size_t>(bytes) <= prop->sharedMemPerBlockOptin, op,
                "the CUDA kernels for head dim ", head_dim, " in ", dtype, " need ", bytes,
                " bytes of shared memory per block and this GPU (", prop->name, ") allows ",
                prop->sharedMemPerBlockOptin, "; use the triton backend for it");
#else
  (void)op, (void)bytes, (void)head_dim, (void)dtype;
#endif
}

// Checks what only these kernels need, and fills the kernel arguments shared by forward and
// backward. q, k, v are the (row-contiguous) tensors the kernels read.
inline Params make_params(const char* op, const Problem& pr, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& attn_mask) {
  LLMFAST_CHECK(pr.D <= kMaxHeadDim && pr.Dv <= kMaxHeadDim, op,
                "query's and value's head dims must be at most ", kMaxHeadDim,
                " for the CUDA kernels, got ", pr.D, " and ", pr.Dv);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  LLMFAST_CHECK(pr.Sq < kIntMax && pr.Sk < kIntMax && pr.B < 65536 && pr.Hq < 65536, op,
                "sequence lengths must be under 2^31 and batch and heads under 65536, got B=",
                pr.B, ", Hq=", pr.Hq, ", Sq=", pr.Sq, ", Sk=", pr.Sk);
  Params p{};
  p.B = static_cast<int>(pr.B);
  p.Hq = static_cast<int>(pr.Hq);
  p.Hkv = static_cast<int>(pr.Hkv);
  p.G = static_cast<int>(pr.G);
  p.Sq = static_cast<int>(pr.Sq);
  p.Sk = static_cast<int>(pr.Sk);
  p.D = static_cast<int>(pr.D);
  p.Dv = static_cast<int>(pr.Dv);
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = q.stride(d);
    p.k_stride[d] = k.stride(d);
    p.v_stride[d] = v.stride(d);
  }
  p.q_vec = rows_aligned(q);
  p.k_vec = rows_aligned(k);
  p.v_vec = rows_aligned(v);
  p.mask = nullptr;
  p.mask_kind = kNoMask;
  if (attn_mask.has_value()) {
    p.mask = attn_mask->const_data_ptr();
    p.mask_kind = mask_kind(*attn_mask);
    for (int d = 0; d < 4; ++d) p.mask_stride[d] = attn_mask->stride(d);
  }
  p.scale = pr.scale;
  p.softcap = pr.softcap;
  p.softcap_scale = pr.softcap > 0.f ? pr.scale / pr.softcap : 0.f;
  p.dropout_p = pr.dropout_p;
  p.keep_scale = pr.keep_scale;
  p.seed = pr.seed_ptr;
  p.left = pr.left;
  p.right = pr.right;
  return p;
}

inline std::tuple<at::Tensor, at::Tensor> attention_fwd_kernels(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, double scale, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "llmfast::attention_fwd";
  const Problem pr = make_problem(op, query, key, value, attn_mask, scale, window_left,
                                  window_right, softcap, dropout_p, seed, kKernelDevice);
#ifndef LLMFAST_SIMT_EMULATION
  const c10::cuda::CUDAGuard guard(query.device());
#endif
  const at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  Params p = make_params(op, pr, q, k, v, attn_mask);
  at::Tensor out = at::empty({pr.B, pr.Hq, pr.Sq, pr.Dv}, query.options());
  at::Tensor lse = at::empty({pr.B, pr.Hq, pr.Sq}, query.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  dispatch(query.scalar_type(), kernel_head_dim(std::max(pr.D, pr.Dv)), [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int kD = decltype(dim)::value;
    using Cfg = Tiles<T, kD>;
    auto kernel = &attention_fwd_kernel<T, kD>;
    check_shared_bytes(op, Cfg::fwd_shared_bytes(), std::max(pr.D, pr.Dv), query.scalar_type());
    device::allow_shared_bytes(kernel, Cfg::fwd_shared_bytes());
    const dim3 grid(static_cast<unsigned>((pr.Sq + Cfg::kFwdM - 1) / Cfg::kFwdM),
                    static_cast<unsigned>(pr.Hq), static_cast<unsigned>(pr.B));
    LLMFAST_LAUNCH(kernel, grid, dim3(Cfg::kM * 2), Cfg::fwd_shared_bytes(), p);
    device::check_launch();
  });
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_kernels(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& grad_lse, const std::optional<at::Tensor>& attn_mask,
    double scale, int64_t window_left, int64_t window_right, double softcap, double dropout_p,
    const std::optional<at::Tensor>& seed, bool mask_grad) {
  constexpr const char* op = "llmfast::attention_bwd";
  const Problem pr = make_problem(op, query, key, value, attn_mask, scale, window_left,
                                  window_right, softcap, dropout_p, seed, kKernelDevice);
  check_backward(op, pr, query, grad_out, out, lse, grad_lse);
#ifndef LLMFAST_SIMT_EMULATION
  const c10::cuda::CUDAGuard guard(query.device());
#endif
  const bool want_dmask = mask_grad && attn_mask.has_value() &&
                          attn_mask->scalar_type() != at::kBool;
  at::Tensor grad_query = at::empty(query.sizes(), query.options());
  at::Tensor grad_key = at::empty(key.sizes(), key.options());
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  // Key tiles outside the band are never visited, so the mask gradient starts at zero.
  at::Tensor dmask = want_dmask ? at::zeros({pr.B, pr.Hq, pr.Sq, pr.Sk},
                                            query.options().dtype(at::kFloat))
                                : at::Tensor();
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    at::Tensor gm = want_dmask ? dmask.to(attn_mask->scalar_type())
                               : at::empty({0}, query.options());
    return {grad_query, grad_key, grad_value, gm};
  };
  if (pr.B * pr.Hq == 0 || pr.Sq == 0 || pr.Sk == 0) {
    grad_query.zero_();
    grad_key.zero_();
    grad_value.zero_();
    return finish();
  }
  const at::Tensor q = rows_contiguous(query), k = rows_contiguous(key), v = rows_contiguous(value);
  Params p = make_params(op, pr, q, k, v, attn_mask);
  const at::Tensor dout = rows_contiguous(grad_out.to(query.scalar_type()));
  const at::Tensor out_c = out.to(query.scalar_type()).contiguous();
  const at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  const at::Tensor glse = grad_lse.has_value() ? grad_lse->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor delta = at::empty({pr.B, pr.Hq, pr.Sq}, query.options().dtype(at::kFloat));
  p.dout = dout.const_data_ptr();
  for (int d = 0; d < 3; ++d) p.do_stride[d] = dout.stride(d);
  p.do_vec = rows_aligned(dout);
  p.out = const_cast<void*>(out_c.const_data_ptr());  // read only (delta)
  p.lse_in = lse_c.const_data_ptr<float>();
  p.grad_lse = glse.defined() ? glse.const_data_ptr<float>() : nullptr;
  p.delta = delta.mutable_data_ptr<float>();
  p.dq = grad_query.mutable_data_ptr();
  p.dk = grad_key.mutable_data_ptr();
  p.dv = grad_value.mutable_data_ptr();
  p.dmask = want_dmask ? dmask.mutable_data_ptr<float>() : nullptr;
  // dQ fused into the dK/dV kernel (atomic fp32 sums) unless the caller asked for deterministic
  // algorithms or the mask's gradient (written by the dQ kernel), or the inputs are fp32.
  at::Tensor dq_accum;
  if (query.scalar_type() != at::kFloat && !want_dmask &&
      !at::globalContext().deterministicAlgorithms()) {
    dq_accum = at::zeros({pr.B, pr.Hq, pr.Sq, pr.D}, query.options().dtype(at::kFloat));
  }
  p.dq_accum = dq_accum.defined() ? dq_accum.mutable_data_ptr<float>() : nullptr;

  dispatch(query.scalar_type(), kernel_head_dim(std::max(pr.D, pr.Dv)), [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int kD = decltype(dim)::value;
    using Cfg = Tiles<T, kD>;
    const int64_t rows = pr.B * pr.Hq * pr.Sq;
    LLMFAST_CHECK((rows + 7) / 8 <= std::numeric_limits<int>::max(), op, "B * Hq * Sq must be under 2^34, got ",
                  rows);
    const int64_t head_dim = std::max(pr.D, pr.Dv);
    check_shared_bytes(op, Cfg::dkdv_shared_bytes(), head_dim, query.scalar_type());
    check_shared_bytes(op, Cfg::dq_shared_bytes(), head_dim, query.scalar_type());
    auto delta_kernel = &attention_delta_kernel<T>;
    LLMFAST_LAUNCH(delta_kernel, dim3(static_cast<unsigned>((rows + 7) / 8)), dim3(256), 0, p);
    device::check_launch();

    auto dkdv_kernel = &attention_bwd_dkdv_kernel<T, kD>;
    device::allow_shared_bytes(dkdv_kernel, Cfg::dkdv_shared_bytes());
    const dim3 dkdv_grid(static_cast<unsigned>((pr.Sk + Cfg::kKeys - 1) / Cfg::kKeys * Cfg::kDkdvSplits),
                         static_cast<unsigned>(pr.Hkv), static_cast<unsigned>(pr.B));
    LLMFAST_LAUNCH(dkdv_kernel, dkdv_grid, dim3(Cfg::kKeys * 2), Cfg::dkdv_shared_bytes(), p);
    device::check_launch();

    if (p.dq_accum != nullptr) return;  // dQ was fused into the dK/dV kernel
    auto dq_kernel = &attention_bwd_dq_kernel<T, kD>;
    device::allow_shared_bytes(dq_kernel, Cfg::dq_shared_bytes());
    const dim3 dq_grid(static_cast<unsigned>((pr.Sq + Cfg::kM - 1) / Cfg::kM),
                       static_cast<unsigned>(pr.Hq), static_cast<unsigned>(pr.B));
    LLMFAST_LAUNCH(dq_kernel, dq_grid, dim3(Cfg::kM * 2), Cfg::dq_shared_bytes(), p);
    device::check_launch();
  });
  if (dq_accum.defined()) grad_query.copy_(dq_accum);
  return finish();
}

}  // namespace attention
}  // namespace llmfast
