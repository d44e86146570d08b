// Helpers shared by the C++ CPU kernels.
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

// A hot loop marked LLMFAST_SIMD_CLONES is compiled twice by GCC on x86-64 (AVX2, 8 floats an
// instruction, and the SSE2 baseline), the variant picked when the library loads. Such
// functions need external linkage (outside anonymous namespaces, in namespace
// llmfast::cpu_simd, with names unique across the library): the form of GCC's ifunc dispatch
// that every GCC version supports.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LLMFAST_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LLMFAST_SIMD_CLONES
#endif

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

// max_{i < n} f(i) with kLanes interleaved accumulators (vectorisable like lane_sum; the
// comparison form `a < b ? b : a` maps to the SIMD max instruction without fast-math).
template <int64_t kLanes, typename F>
C10_ALWAYS_INLINE float lane_max(int64_t n, F f, float init) {
  float acc[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) acc[j] = init;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = f(i + j);
      acc[j] = acc[j] < v ? v : acc[j];
    }
  }
  for (int64_t j = 0; i < n; ++i, ++j) {
    const float v = f(i);
    acc[j] = acc[j] < v ? v : acc[j];
  }
  float m = acc[0];
  for (int64_t j = 1; j < kLanes; ++j) m = m < acc[j] ? acc[j] : m;
  return m;
}

// exp(x) for x <= 0, in plain arithmetic that the compiler vectorises (std::exp is a scalar
// libm call, ~10x slower per element than torch's SIMD exp). x = n ln2 + r with |r| <= ln2/2,
// exp(r) by Cephes' expf polynomial, 2^n put into the exponent bits: relative error about
// 1e-7. Below -87 (where 2^n leaves the normal range) the result is 0, as exp underflows;
// -inf gives 0, NaN gives NaN. Also right for 0 < x <= 88 (n <= 127), which callers may pass
// when rounding leaves an exponent a hair above 0 (attention's s - lse); not beyond. Must not be compiled with -ffast-math (the rounding trick);
// vectorises only with -fno-trapping-math (setup.py sets it).
C10_ALWAYS_INLINE float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float xc = x < -87.0f ? -87.0f : x;  // -inf becomes -87 (fixed up below); NaN stays NaN
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float nc = n > -127.0f ? n : -127.0f;  // n in [-126, 0]; NaN -> -127, a defined conversion
  const int32_t bits = (static_cast<int32_t>(nc) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float y = p * two_n;  // NaN for NaN (p is NaN)
  return x < -87.0f ? 0.0f : y;
}

}  // namespace llmfast
