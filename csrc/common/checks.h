// Input checks shared by every launcher. Each message names the argument and what was
// expected, so a user sees e.g. "llmfast::norm_fwd: weight must have 768 elements, got 767".
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#define LLMFAST_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

namespace llmfast {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  auto st = t.scalar_type();
  LLMFAST_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, name,
                " must be float32, float16 or bfloat16, got ", st);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name) {
  LLMFAST_CHECK(t.device() == ref.device(), op, name, " must be on ", ref.device(), ", got ",
                t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  LLMFAST_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

}  // namespace llmfast
