// AVX-512 pieces shared by the CPU kernels (internal to csrc/cpu): the tail mask of a row, exp
// over 16 float32 lanes, and bf16 <-> float32 for 16 lanes. Each function carries its own target("avx512f"), so it inlines into
// kernels compiled for avx512f and up (a target pragma) while the file around them stays portable;
// call those only after select_isa chose Isa::Avx512.
//
// exp(x) = 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2: e^r by its degree-7 Taylor
// polynomial (truncation error r^8 / 8! < 1e-8 relative, below float32 rounding), 2^n applied by
// scalef. Inputs are clamped to [-104, 88.7]: below, the result underflows cleanly to 0 (exp(-inf)
// = 0, as a masked softmax column needs); above, it would overflow float32 anyway. NaN stays NaN
// (as std::exp): a NaN logit or score makes its row NaN, as in the reference.
#pragma once

#include "cpu/layer_norm_rows.h"  // FUSEDLM_X86

#if FUSEDLM_X86
#include <immintrin.h>

#include <cstdint>

namespace fusedlm {
namespace cpu {
namespace avx512 {

// The mask of the first `left` of 16 lanes (a row's tail); none for left <= 0.
__attribute__((target("avx512f"))) inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
}

__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  // max/min return their second operand when one is NaN: x second, so that NaN stays NaN
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-104.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 = hi + lo, hi exact in 17 bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 values (their bits) widened to float32: exact.
__attribute__((target("avx512f"))) inline __m512 bf16_bits_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Round to nearest even exactly as torch does (bits + 0x7fff + lsb; NaN -> 0x7fc0). Integer ops
// rather than vcvtneps2bf16: they run on every AVX-512 CPU and keep subnormals, which that
// instruction flushes to zero (layernorm_mlp_avx512_bf16.cpp takes the instruction where it pays).
__attribute__((target("avx512f"))) inline __m256i ps_to_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, lsb), _mm512_set1_epi32(0x7fff)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fusedlm
#endif  // FUSEDLM_X86
