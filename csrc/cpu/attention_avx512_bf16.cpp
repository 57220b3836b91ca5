// avx512_bf16 kernels of the CPU flash attention for bf16 inputs (the drivers are in
// attention_bf16.cpp, the operand layouts in attention_tiles.h). Compiled for
// AVX-512 with avx512bf16 (avx512_region_begin.h) and called only after the run-time CPU check.
//
// vdpbf16ps multiplies 16 pairs of bf16 and adds both products to 16 fp32 lanes: twice the
// multiply-adds of an fp32 FMA per instruction, on half the bytes. The micro-kernel is the fp32
// one's shape (6 rows x 64 columns of C in 24 accumulators), stepping over pairs of the sum index:
// per step 4 vectors of B pairs and 6 broadcast A pairs.
#include "cpu/attention_tiles.h"

#if FUSEDLM_ATTN_X86
#include <immintrin.h>

#include "cpu/avx512_math.h"

#include <array>
#include <utility>

#define FUSEDLM_AVX512_REGION_BF16
#include "cpu/avx512_region_begin.h"

namespace fusedlm {
namespace cpu {
namespace attn {
namespace {

constexpr int kRows = 6;
constexpr int kVecs = 4;
constexpr __mmask16 kAll = 0xffff;

using avx512::lanes;

inline __m512i pair_at(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return _mm512_set1_epi32(int(w));
}

template <int MR, int NV, bool kAcc>
void micro_kernel(int64_t k2, const uint16_t* a, int64_t a_row, int64_t a_col, const uint16_t* b, int64_t ldb,
                  float* c, int64_t ldc, __mmask16 last, float alpha) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  int64_t off[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) off[r] = r * a_row;
  for (int64_t p = 0; p < k2; ++p) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_epi32(last, b + 32 * v) : _mm512_loadu_si512(b + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i ar = pair_at(a + off[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)ar, (__m512bh)bv[v]);
    }
    a += a_col;
    b += ldb;
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : kAll;
      float* cp = c + r * ldc + 16 * v;
      const __m512 x = kAcc ? _mm512_fmadd_ps(al, acc[r][v], _mm512_maskz_loadu_ps(mk, cp)) : _mm512_mul_ps(al, acc[r][v]);
      _mm512_mask_storeu_ps(cp, mk, x);
    }
}

using MicroFn = void (*)(int64_t, const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, float*, int64_t,
                         __mmask16, float);

template <bool kAcc, int MR, int... NV>
constexpr auto row_of(std::integer_sequence<int, NV...>) {
  return std::array<MicroFn, sizeof...(NV)>{&micro_kernel<MR, NV + 1, kAcc>...};
}

template <bool kAcc, int... MR>
constexpr auto table_of(std::integer_sequence<int, MR...>) {
  return std::array<std::array<MicroFn, kVecs>, sizeof...(MR)>{
      row_of<kAcc, MR + 1>(std::make_integer_sequence<int, kVecs>{})...};
}

const std::array<std::array<MicroFn, kVecs>, kRows> kMicro[2] = {
    table_of<false>(std::make_integer_sequence<int, kRows>{}),
    table_of<true>(std::make_integer_sequence<int, kRows>{})};

void gemm(int64_t m, int64_t n, int64_t k2, const uint16_t* a, int64_t a_row, int64_t a_col, const uint16_t* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate, float alpha) {
  for (int64_t n0 = 0; n0 < n; n0 += 16 * kVecs) {
    const int64_t width = std::min<int64_t>(16 * kVecs, n - n0);
    const int64_t nv = (width + 15) / 16;
    const __mmask16 last = lanes(width - 16 * (nv - 1));
    for (int64_t m0 = 0; m0 < m; m0 += kRows) {
      const int64_t mr = std::min<int64_t>(kRows, m - m0);
      kMicro[accumulate][mr - 1][nv - 1](k2, a + m0 * a_row, a_row, a_col, b + 2 * n0, ldb, c + m0 * ldc + n0, ldc,
                                         last, alpha);
    }
  }
}

// vcvtneps2bf16 rounds to nearest even (and flushes subnormals, below any probability that matters).
inline __m512i bf16_lanes32(__m512 x) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)); }

void tile_to_bf16(const float* s, int64_t rows, uint16_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < kQueryBlock; c += 32) {
      const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + r * kQueryBlock + c + 16),
                                             _mm512_loadu_ps(s + r * kQueryBlock + c));
      _mm512_storeu_si512(dst + r * kQueryBlock + c, (__m512i)x);
    }
}

void tile_to_pairs(const float* s, int64_t rows, uint16_t* dst) {
  for (int64_t r = 0; r < rows; r += 2)
    for (int64_t c = 0; c < kQueryBlock; c += 16) {
      const __m512i lo = bf16_lanes32(_mm512_loadu_ps(s + r * kQueryBlock + c));
      const __m512i hi = r + 1 < rows ? bf16_lanes32(_mm512_loadu_ps(s + (r + 1) * kQueryBlock + c))
                                      : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + r * kQueryBlock + 2 * c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

}  // namespace

DotKernels avx512_bf16_dot_kernels() { return {&gemm, &tile_to_bf16, &tile_to_pairs}; }

}  // namespace attn
}  // namespace cpu
}  // namespace fusedlm

#include "cpu/avx512_region_end.h"

#endif  // FUSEDLM_ATTN_X86
