// Warp-level tensor-core products for the CUDA kernels: fragments of mma.m16n8k16 (A 16x16,
// B 16x8, C 16x8 in fp32), loaders from shared memory, and the two tile products every
// FlashAttention-style kernel is made of.
//
// Fragment layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A: a0,a1 = A[g][2t], A[g][2t+1]      a2,a3 = A[g+8][2t..]    a4,a5 = A[g][2t+8..]
//      a6,a7 = A[g+8][2t+8..]
//   B: b0,b1 = B[2t][g], B[2t+1][g]      b2,b3 = B[2t+8][g], B[2t+9][g]
//   C: c0,c1 = C[g][2t], C[g][2t+1]      c2,c3 = C[g+8][2t], C[g+8][2t+1]
// The C fragments of two neighbouring 16x8 tiles hold exactly the A fragment of their 16x16
// concatenation (a_from_c), which is how a product's result (attention probabilities) feeds the
// next product without leaving registers.
//
// Element types: __half and __nv_bfloat16 run on the tensor cores (sm_80+), two elements per
// 32-bit register. float runs the same fragment contract on the CUDA cores (products gathered
// with warp shuffles): slow, but exact fp32, so fp32 inputs get fp32 results from the very same
// kernels. Under LLMFAST_SIMT_EMULATION the tensor-core instruction is replaced by the
// emulator's model of it (simt_emulator.h).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/device_compat.cuh"

namespace llmfast {
namespace mma {

template <typename T>
struct Element;

template <>
struct Element<__half> {
  static LLMFAST_DEVICE __half from_float(float x) { return __float2half_rn(x); }
  static LLMFAST_DEVICE float to_float(__half x) { return __half2float(x); }
  static LLMFAST_DEVICE uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t w;
    std::memcpy(&w, &h, sizeof(w));
    return w;
  }
};

template <>
struct Element<__nv_bfloat16> {
  static LLMFAST_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static LLMFAST_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static LLMFAST_DEVICE uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t w;
    std::memcpy(&w, &h, sizeof(w));
    return w;
  }
};

template <>
struct Element<float> {
  static LLMFAST_DEVICE float from_float(float x) { return x; }
  static LLMFAST_DEVICE float to_float(float x) { return x; }
};

// Fragments: 16-bit types packed in pairs, float one element a register.
template <typename T>
struct FragA {
  uint32_t x[4];
};
template <typename T>
struct FragB {
  uint32_t x[2];
};
template <>
struct FragA<float> {
  float x[8];
};
template <>
struct FragB<float> {
  float x[4];
};

template <typename T>
LLMFAST_DEVICE uint32_t load_pair(const T* p) {  // two adjacent 16-bit elements, 4-byte aligned
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

template <typename T>
LLMFAST_DEVICE uint32_t pack_pair(T lo, T hi) {
  uint16_t a, b;
  std::memcpy(&a, &lo, sizeof(a));
  std::memcpy(&b, &hi, sizeof(b));
  return static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
}

// A (16x16) = s[r * ld + c], row-major in shared memory.
template <typename T>
LLMFAST_DEVICE void load_a(FragA<T>& a, const T* s, int ld, int lane) {
  const int g = lane >> 2, t = lane & 3;
  a.x[0] = load_pair(s + g * ld + 2 * t);
  a.x[1] = load_pair(s + (g + 8) * ld + 2 * t);
  a.x[2] = load_pair(s + g * ld + 2 * t + 8);
  a.x[3] = load_pair(s + (g + 8) * ld + 2 * t + 8);
}
LLMFAST_DEVICE void load_a(FragA<float>& a, const float* s, int ld, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float* r0 = s + g * ld + 2 * t;
  const float* r1 = r0 + 8 * ld;
  a.x[0] = r0[0];
  a.x[1] = r0[1];
  a.x[2] = r1[0];
  a.x[3] = r1[1];
  a.x[4] = r0[8];
  a.x[5] = r0[9];
  a.x[6] = r1[8];
  a.x[7] = r1[9];
}

// B (16x8) with B[k][n] = s[n * ld + k]: the operand of A B^T for a row-major B^T (keys).
template <typename T>
LLMFAST_DEVICE void load_b_nk(FragB<T>& b, const T* s, int ld, int lane) {
  const int g = lane >> 2, t = lane & 3;
  b.x[0] = load_pair(s + g * ld + 2 * t);
  b.x[1] = load_pair(s + g * ld + 2 * t + 8);
}
LLMFAST_DEVICE void load_b_nk(FragB<float>& b, const float* s, int ld, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float* r = s + g * ld + 2 * t;
  b.x[0] = r[0];
  b.x[1] = r[1];
  b.x[2] = r[8];
  b.x[3] = r[9];
}

// B (16x8) with B[k][n] = s[k * ld + n]: a row-major right operand (values).
template <typename T>
LLMFAST_DEVICE void load_b_kn(FragB<T>& b, const T* s, int ld, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const T* c = s + 2 * t * ld + g;
  b.x[0] = pack_pair(c[0], c[ld]);
  b.x[1] = pack_pair(c[8 * ld], c[9 * ld]);
}
LLMFAST_DEVICE void load_b_kn(FragB<float>& b, const float* s, int ld, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const float* c = s + 2 * t * ld + g;
  b.x[0] = c[0];
  b.x[1] = c[ld];
  b.x[2] = c[8 * ld];
  b.x[3] = c[9 * ld];
}

// The A fragment of the 16x16 tile whose left 16x8 half has C fragment c0 and right half c1.
template <typename T>
LLMFAST_DEVICE void a_from_c(FragA<T>& a, const float c0[4], const float c1[4]) {
  a.x[0] = Element<T>::pack(c0[0], c0[1]);
  a.x[1] = Element<T>::pack(c0[2], c0[3]);
  a.x[2] = Element<T>::pack(c1[0], c1[1]);
  a.x[3] = Element<T>::pack(c1[2], c1[3]);
}
LLMFAST_DEVICE void a_from_c(FragA<float>& a, const float c0[4], const float c1[4]) {
  for (int i = 0; i < 4; ++i) {
    a.x[i] = c0[i];
    a.x[4 + i] = c1[i];
  }
}

// c (16x8, fp32) += a b.
template <typename T>
LLMFAST_DEVICE void mma_16x8x16(float c[4], const FragA<T>& a, const FragB<T>& b, int lane) {
  (void)lane;
#ifdef LLMFAST_SIMT_EMULATION
  simt::mma_m16n8k16<T>(c, a.x, b.x);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // tensor-core mma of 16-bit floats needs sm_80 or newer (the build targets those)
#endif
}

// The fp32 product on the CUDA cores with the same fragments: lane (g, t) gathers rows g and
// g + 8 of A from the lanes of its quad, and columns 2t, 2t+1 of B from the lanes holding them.
LLMFAST_DEVICE void mma_16x8x16(float c[4], const FragA<float>& a, const FragB<float>& b, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int tt = 0; tt < 4; ++tt) {
    const int src_a = g * 4 + tt;
    float av[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) av[i] = __shfl_sync(0xFFFFFFFFu, a.x[i], src_a);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int src_b = (2 * t + j) * 4 + tt;
      float bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = __shfl_sync(0xFFFFFFFFu, b.x[i], src_b);
      // k = 2tt, 2tt+1 (a0 a1 / a2 a3, b0 b1) and 2tt+8, 2tt+9 (a4 a5 / a6 a7, b2 b3)
      c[j] += av[0] * bv[0] + av[1] * bv[1] + av[4] * bv[2] + av[5] * bv[3];
      c[2 + j] += av[2] * bv[0] + av[3] * bv[1] + av[6] * bv[2] + av[7] * bv[3];
    }
  }
}

// --- ldmatrix: 8x8 tiles of 16-bit elements from shared memory, four at a time -------------
// Lane l gives the address of one row (16 bytes, 16-byte aligned): lanes 8i .. 8i+7 the rows of
// matrix i. Register i of lane l receives matrix i's elements (row l/4, columns 2(l%4), +1), or
// with .trans (rows 2(l%4), 2(l%4)+1 of column l/4): exactly the A / B fragment registers when
// the addresses are chosen as in the loaders below.
template <typename T>
LLMFAST_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const T* row) {
#ifdef LLMFAST_SIMT_EMULATION
  LLMFAST_CHECK_ALIGNED(row, 16, "ldmatrix row");
  const int lane = simt::lane();
  for (int i = 0; i < 4; ++i) {
    const T* src = __shfl_sync(0xFFFFFFFFu, row, i * 8 + lane / 4);
    r[i] = load_pair(src + 2 * (lane % 4));
  }
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

template <typename T>
LLMFAST_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const T* row) {
#ifdef LLMFAST_SIMT_EMULATION
  LLMFAST_CHECK_ALIGNED(row, 16, "ldmatrix row");
  const int lane = simt::lane();
  for (int i = 0; i < 4; ++i) {
    const T* lo = __shfl_sync(0xFFFFFFFFu, row, i * 8 + 2 * (lane % 4));
    const T* hi = __shfl_sync(0xFFFFFFFFu, row, i * 8 + 2 * (lane % 4) + 1);
    r[i] = pack_pair(lo[lane / 4], hi[lane / 4]);
  }
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// The A fragment of the 16x16 tile at s (row-major, ld): matrices (rows 0-7 | 8-15) x
// (columns 0-7 | 8-15) in the order a0a1, a2a3, a4a5, a6a7.
template <typename T>
LLMFAST_DEVICE void ldmatrix_a(FragA<T>& a, const T* s, int ld, int lane) {
  const int m = lane >> 3, r = lane & 7;
  ldmatrix_x4(a.x, s + (r + (m & 1) * 8) * ld + (m >> 1) * 8);
}

// The A fragment of the 16x16 tile A[m][k] = s[k * ld + m] (A stored transposed), through the
// transposing load: matrix i of ldmatrix_a's order, read from the transposed position.
template <typename T>
LLMFAST_DEVICE void ldmatrix_a_trans(FragA<T>& a, const T* s, int ld, int lane) {
  const int m = lane >> 3, r = lane & 7;
  ldmatrix_x4_trans(a.x, s + (r + (m >> 1) * 8) * ld + (m & 1) * 8);
}

// The B fragments of two neighbouring n-tiles (n 0-7 and 8-15) for one k-step, B[k][n] =
// s[n * ld + k] (row-major B^T).
template <typename T>
LLMFAST_DEVICE void ldmatrix_b_nk(FragB<T>& b0, FragB<T>& b1, const T* s, int ld, int lane) {
  const int m = lane >> 3, r = lane & 7;
  uint32_t x[4];
  ldmatrix_x4(x, s + (r + (m >> 1) * 8) * ld + (m & 1) * 8);
  b0.x[0] = x[0];
  b0.x[1] = x[1];
  b1.x[0] = x[2];
  b1.x[1] = x[3];
}

// The same for B[k][n] = s[k * ld + n] (row-major B), through the transposing load.
template <typename T>
LLMFAST_DEVICE void ldmatrix_b_kn(FragB<T>& b0, FragB<T>& b1, const T* s, int ld, int lane) {
  const int m = lane >> 3, r = lane & 7;
  uint32_t x[4];
  ldmatrix_x4_trans(x, s + (r + (m & 1) * 8) * ld + (m >> 1) * 8);
  b0.x[0] = x[0];
  b0.x[1] = x[1];
  b1.x[0] = x[2];
  b1.x[1] = x[3];
}

template <typename T>
constexpr bool kTensorCore = sizeof(T) == 2;

// The A fragment of the 16x16 tile at s: ldmatrix for 16-bit types, element loads for fp32.
template <typename T>
LLMFAST_DEVICE void load_a_tile(FragA<T>& a, const T* s, int ld, int lane) {
  if constexpr (kTensorCore<T>) {
    ldmatrix_a(a, s, ld, lane);
  } else {
    load_a(a, s, ld, lane);
  }
}

// Runs step(kk) for kk < kSteps: fully unrolled for the tensor-core types (their fragments must
// stay in registers), as a loop for fp32, whose shuffle products would otherwise unroll into a
// huge kernel (compile time) for no speed that matters on that path.
template <typename T, int kSteps, typename Step>
LLMFAST_DEVICE void for_each_k_step(Step&& step) {
  if constexpr (kTensorCore<T>) {
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) step(kk);
  } else {
#pragma unroll 1
    for (int kk = 0; kk < kSteps; ++kk) step(kk);
  }
}

// The warp-level products. A warp owns kMT row tiles of 16 (kMT = 1 or 2): with two, every B
// fragment read from shared memory feeds twice as many mma instructions, which keeps the
// tensor cores rather than shared memory the limit. c[mt][n / 8] is the C fragment of rows
// 16 mt .. 16 mt + 15 and columns n .. n + 7.

// c (16 kMT x kN) += a B^T for one k-step: a[mt] given, B^T (kN x 16) row-major at b (ld ldb).
template <typename T, int kMT, int kN>
LLMFAST_DEVICE void warp_step_abt(float (&c)[kMT][kN / 8][4], const FragA<T> (&a)[kMT], const T* b,
                                  int ldb, int lane) {
  static_assert(kN % 16 == 0, "n-tiles are loaded in pairs");
#pragma unroll
  for (int nt = 0; nt < kN / 8; nt += 2) {
    FragB<T> b0, b1;
    if constexpr (kTensorCore<T>) {
      ldmatrix_b_nk(b0, b1, b + nt * 8 * ldb, ldb, lane);
    } else {
      load_b_nk(b0, b + nt * 8 * ldb, ldb, lane);
      load_b_nk(b1, b + (nt + 1) * 8 * ldb, ldb, lane);
    }
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
      mma_16x8x16(c[mt][nt], a[mt], b0, lane);
      mma_16x8x16(c[mt][nt + 1], a[mt], b1, lane);
    }
  }
}

// c (16 kMT x kN) += A B^T, A (16 kMT x kK) row-major at a (ld lda), B (kN x kK) row-major at b
// (ld ldb).
template <typename T, int kMT, int kN, int kK>
LLMFAST_DEVICE void warp_gemm_abt(float (&c)[kMT][kN / 8][4], const T* a, int lda, const T* b,
                                  int ldb, int lane) {
  for_each_k_step<T, kK / 16>([&](int kk) {
    FragA<T> fa[kMT];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) load_a_tile(fa[mt], a + mt * 16 * lda + kk * 16, lda, lane);
    warp_step_abt<T, kMT, kN>(c, fa, b + kk * 16, ldb, lane);
  });
}

// The same with A already in registers: a[mt][kk] is the fragment of row tile mt, columns
// 16 kk .. 16 kk + 15.
template <typename T, int kMT, int kN, int kK>
LLMFAST_DEVICE void warp_gemm_abt(float (&c)[kMT][kN / 8][4], const FragA<T> (&a)[kMT][kK / 16],
                                  const T* b, int ldb, int lane) {
  for_each_k_step<T, kK / 16>([&](int kk) {
    FragA<T> fa[kMT];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) fa[mt] = a[mt][kk];
    warp_step_abt<T, kMT, kN>(c, fa, b + kk * 16, ldb, lane);
  });
}

// c (16 kMT x kN) += P B, P (16 kMT x kK) held as C fragments p[mt][k / 8] (rounded to T), B
// (kK x kN) row-major at b (ld ldb).
template <typename T, int kMT, int kN, int kK>
LLMFAST_DEVICE void warp_gemm_pb(float (&c)[kMT][kN / 8][4], const float (&p)[kMT][kK / 8][4],
                                 const T* b, int ldb, int lane) {
  static_assert(kN % 16 == 0, "n-tiles are loaded in pairs");
  for_each_k_step<T, kK / 16>([&](int kk) {
    FragA<T> fa[kMT];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) a_from_c(fa[mt], p[mt][2 * kk], p[mt][2 * kk + 1]);
    const T* bk = b + kk * 16 * ldb;
#pragma unroll
    for (int nt = 0; nt < kN / 8; nt += 2) {
      FragB<T> b0, b1;
      if constexpr (kTensorCore<T>) {
        ldmatrix_b_kn(b0, b1, bk + nt * 8, ldb, lane);
      } else {
        load_b_kn(b0, bk + nt * 8, ldb, lane);
        load_b_kn(b1, bk + (nt + 1) * 8, ldb, lane);
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_16x8x16(c[mt][nt], fa[mt], b0, lane);
        mma_16x8x16(c[mt][nt + 1], fa[mt], b1, lane);
      }
    }
  });
}

}  // namespace mma
}  // namespace llmfast
