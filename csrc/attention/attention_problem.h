// The argument checks and the problem description shared by the attention launchers (CPU in
// attention_cpu.cpp, CUDA in attention_cuda_launch.h). The contract is in attention_ops.cpp.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace llmfast {
namespace attention {

// Everything a tile needs to know, shared by forward and backward.
struct Problem {
  int64_t B, Hq, Hkv, G, Sq, Sk, D, Dv;
  const void* q;
  const void* k;
  const void* v;
  int64_t qs[4], ks[4], vs[4];
  const void* mask = nullptr;  // nullptr: no mask
  at::ScalarType mask_type = at::kBool;
  int64_t ms[4] = {0, 0, 0, 0};
  float scale;
  int64_t left, right;  // -1 = unbounded
  float softcap;        // 0 = off
  float dropout_p;
  float keep_scale;     // 1 / (1 - dropout_p)
  uint64_t seed = 0;    // CPU launchers only (read from the seed tensor)
  const int64_t* seed_ptr = nullptr;  // the seed tensor's data, on the inputs' device

  // The keys [lo, hi) that query rows [i0, i1) may see under the band.
  void key_range(int64_t i0, int64_t i1, int64_t* lo, int64_t* hi) const {
    *lo = left >= 0 ? std::max<int64_t>(0, i0 - left) : 0;
    *hi = right >= 0 ? std::min<int64_t>(Sk, i1 - 1 + right + 1) : Sk;
  }
  // The queries [lo, hi) that may see keys [j0, j1).
  void query_range(int64_t j0, int64_t j1, int64_t* lo, int64_t* hi) const {
    *lo = right >= 0 ? std::max<int64_t>(0, j0 - right) : 0;
    *hi = left >= 0 ? std::min<int64_t>(Sq, j1 - 1 + left + 1) : Sq;
  }
  bool in_band(int64_t i, int64_t j) const {
    return (left < 0 || j >= i - left) && (right < 0 || j <= i + right);
  }
  // Dropout: true when probability (b, h, i, j) is kept. splitmix64 of the element's counter
  // (the CUDA kernels draw the same numbers: attention_cuda.cuh, dropout_keep).
  bool keep(int64_t b, int64_t h, int64_t i, int64_t j) const {
    uint64_t x = seed + 0x9E3779B97F4A7C15ull *
                            (static_cast<uint64_t>(((b * Hq + h) * Sq + i) * Sk + j) + 1);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
    return u >= dropout_p;
  }
};

inline const char* device_name(c10::DeviceType type) {
  return type == c10::DeviceType::CPU ? "a CPU" : "a CUDA";
}

// Checks the forward's arguments (which the backward shares) on a `device`-type launcher.
inline Problem make_problem(const char* op, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                            double scale, int64_t window_left, int64_t window_right,
                            double softcap, double dropout_p,
                            const std::optional<at::Tensor>& seed, c10::DeviceType device) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{query, "query"},
                         {key, "key"}, {value, "value"}}) {
    LLMFAST_CHECK(t.device().type() == device, op, name, " must be ", device_name(device),
                  " tensor, got ", t.device());
    LLMFAST_CHECK(t.dim() == 4, op, name, " must be 4-D (B, H, S, D), got shape ", t.sizes());
    check_floating(t, op, name);
    LLMFAST_CHECK(t.scalar_type() == query.scalar_type(), op, name,
                  " must have query's dtype (", query.scalar_type(), "), got ", t.scalar_type());
    if (&t != &query) check_same_device(t, query, op, name);
  }
  Problem p;
  p.B = query.size(0);
  p.Hq = query.size(1);
  p.Sq = query.size(2);
  p.D = query.size(3);
  p.Hkv = key.size(1);
  p.Sk = key.size(2);
  p.Dv = value.size(3);
  LLMFAST_CHECK(key.size(0) == p.B && key.size(3) == p.D, op, "key must have shape (", p.B,
                ", Hkv, Sk, ", p.D, "), got ", key.sizes());
  LLMFAST_CHECK(value.size(0) == p.B && value.size(1) == p.Hkv && value.size(2) == p.Sk, op,
                "value must have shape (", p.B, ", ", p.Hkv, ", ", p.Sk, ", Dv), got ",
                value.sizes());
  LLMFAST_CHECK(p.Hkv > 0 ? p.Hq % p.Hkv == 0 : p.Hq == 0, op, "query's heads (", p.Hq,
                ") must be a multiple of key's heads (", p.Hkv, ")");
  p.G = p.Hkv > 0 ? p.Hq / p.Hkv : 1;
  p.q = query.const_data_ptr();
  p.k = key.const_data_ptr();
  p.v = value.const_data_ptr();
  for (int i = 0; i < 4; ++i) {
    p.qs[i] = query.stride(i);
    p.ks[i] = key.stride(i);
    p.vs[i] = value.stride(i);
  }
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    LLMFAST_CHECK(m.device() == query.device(), op, "attn_mask must be on ", query.device(),
                  ", got ", m.device());
    LLMFAST_CHECK(m.dim() == 4 && m.size(0) == p.B && m.size(1) == p.Hq && m.size(2) == p.Sq &&
                      m.size(3) == p.Sk,
                  op, "attn_mask must have shape (", p.B, ", ", p.Hq, ", ", p.Sq, ", ", p.Sk,
                  ") (an expanded view is fine), got ", m.sizes());
    const auto mt = m.scalar_type();
    LLMFAST_CHECK(mt == at::kBool || mt == at::kFloat || mt == at::kHalf ||
                      mt == at::kBFloat16 || mt == at::kDouble,
                  op, "attn_mask must be bool or floating, got ", mt);
    p.mask = m.const_data_ptr();
    p.mask_type = mt;
    for (int i = 0; i < 4; ++i) p.ms[i] = m.stride(i);
  }
  LLMFAST_CHECK(window_left >= -1 && window_right >= -1, op,
                "window_left / window_right must be >= -1, got ", window_left, ", ",
                window_right);
  LLMFAST_CHECK(softcap >= 0.0, op, "softcap must be >= 0 (0 = off), got ", softcap);
  LLMFAST_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, "dropout_p must be in [0, 1), got ",
                dropout_p);
  p.scale = static_cast<float>(scale);
  p.left = window_left;
  p.right = window_right;
  p.softcap = static_cast<float>(softcap);
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  if (dropout_p > 0.0) {
    LLMFAST_CHECK(seed.has_value(), op, "seed must be given when dropout_p > 0");
    LLMFAST_CHECK(seed->device() == query.device() && seed->scalar_type() == at::kLong &&
                      seed->numel() == 1,
                  op, "seed must be a one-element int64 tensor on ", query.device(), ", got ",
                  seed->scalar_type(), " of shape ", seed->sizes(), " on ", seed->device());
    p.seed_ptr = seed->const_data_ptr<int64_t>();
    if (device == c10::DeviceType::CPU) p.seed = static_cast<uint64_t>(*p.seed_ptr);
  }
  return p;
}

// Checks the backward's own tensors: grad_out and out (B, Hq, Sq, Dv), lse and grad_lse
// (B, Hq, Sq), on the inputs' device.
inline void check_backward(const char* op, const Problem& p, const at::Tensor& query,
                           const at::Tensor& grad_out, const at::Tensor& out,
                           const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse) {
  const std::vector<int64_t> o_shape{p.B, p.Hq, p.Sq, p.Dv};
  const std::vector<int64_t> l_shape{p.B, p.Hq, p.Sq};
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                         {out, "out"}}) {
    check_same_device(t, query, op, name);
    LLMFAST_CHECK(t.sizes() == at::IntArrayRef(o_shape), op, name, " must have shape ",
                  at::IntArrayRef(o_shape), ", got ", t.sizes());
    check_floating(t, op, name);
  }
  check_same_device(lse, query, op, "lse");
  LLMFAST_CHECK(lse.sizes() == at::IntArrayRef(l_shape), op, "lse must have shape ",
                at::IntArrayRef(l_shape), ", got ", lse.sizes());
  if (grad_lse.has_value()) {
    check_same_device(*grad_lse, query, op, "grad_lse");
    LLMFAST_CHECK(grad_lse->sizes() == at::IntArrayRef(l_shape), op,
                  "grad_lse must have shape ", at::IntArrayRef(l_shape), ", got ",
                  grad_lse->sizes());
  }
}

}  // namespace attention
}  // namespace llmfast
