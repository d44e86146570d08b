// Helpers shared by the C++ CPU kernels.
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

namespace llmfast {

// sum_{i < n} f(i) with kLanes interleaved fp32 accumulators (independent chains the compiler
// can vectorise), folded pairwise at the end: faster and more accurate than one running sum.
template <int64_t kLanes, typename F>
C10_ALWAYS_INLINE float lane_sum(int64_t n, F f) {
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

}  // namespace llmfast
