// Internal to layernorm_mlp_avx512.cpp and layernorm_mlp_avx512_bf16.cpp: the AVX-512 math and
// the ISA class K (Avx512Isa) that layernorm_mlp_act.h's loops are written over; 16 columns per
// step in fp32, the last step masked, so any width works without a scalar tail. Each of the two
// files includes this inside its AVX-512 region, then layernorm_mlp_act.h: two instances of the
// same loops that differ only in how fp32 becomes bf16.
//
//   layernorm_mlp_avx512.cpp       integer round-to-nearest-even (bits + 0x7fff + lsb): bit-exact
//                                  with torch's rounding, NaN -> 0x7fc0; any AVX-512 CPU.
//   layernorm_mlp_avx512_bf16.cpp  (FUSEDLM_AVX512_REGION_BF16 defined) vcvtneps2bf16, one
//                                  instruction for those eight: the same round-to-nearest-even,
//                                  except that fp32 denormals (|v| < 1.2e-38) become a signed 0
//                                  and a NaN stays a quiet NaN with its sign and top payload bits
//                                  (not 0x7fc0). CPUs with avx512_bf16, bf16 tensors only.
// perf's samples in the two passes over 25 forward+backward steps at 4096 x 768 x 3072 bf16, two
// runs each: 3689 and 3108 with the integer rounding, 3316 and 2556 with vcvtneps2bf16 (about 15%
// fewer); the op's wall-clock time moved by less than this machine's run-to-run noise (3%).
//
// exp is avx512::exp16 and the bf16 loads and integer rounding are avx512_math.h's.
// No include guard: one inclusion per file, inside its region.

#define FUSEDLM_INLINE inline __attribute__((always_inline))

namespace fusedlm {
namespace cpu {
namespace mlp {
namespace {

using rows::bf16;

FUSEDLM_INLINE __m512 vexp(__m512 x) { return avx512::exp16(x); }
FUSEDLM_INLINE __m512 vabs(__m512 x) { return _mm512_abs_ps(x); }
// max(0, x), NaN kept (maxps returns its second operand, x, when one is NaN), as torch.relu
FUSEDLM_INLINE __m512 vrelu(__m512 x) { return _mm512_max_ps(_mm512_setzero_ps(), x); }
// f'(u) of relu: 0 where u <= 0, else 1; NaN gives 1 (passes the gradient on), as torch's threshold_backward
FUSEDLM_INLINE __m512 vstep(__m512 x) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NLE_UQ), _mm512_set1_ps(1.0f));
}
// x clamped to [-c, c]; NaN kept (max and min return their second operand, x, when one is NaN)
FUSEDLM_INLINE __m512 vclamp_abs(__m512 x, float c) {
  return _mm512_min_ps(_mm512_set1_ps(c), _mm512_max_ps(_mm512_set1_ps(-c), x));
}
// max(x, c); NaN kept
FUSEDLM_INLINE __m512 vat_least(__m512 x, float c) { return _mm512_max_ps(_mm512_set1_ps(c), x); }
FUSEDLM_INLINE __m512 vsign_of(__m512 u, __m512 v) {
  return _mm512_mask_sub_ps(v, _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps(), v);
}

// 1 / x for x >= 1 without a division (vdivps was the hottest instruction of these passes in perf's
// samples): rcp14's estimate (relative error < 2^-14) and one Newton step r + r (1 - x r), which
// squares the error to below float32 rounding (within an ulp of 1 / x up to FLT_MAX). An infinite x
// is first capped to FLT_MAX, so that it gives a tiny r rather than the step's inf * 0 = NaN; NaN stays
// NaN (minps returns its second operand then).
FUSEDLM_INLINE __m512 vrcp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(0x1.fffffep127f), x);
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0f)), r);
}

// 2^x to 2.7e-6 relative for results rounded to bf16 (terms' kLowp), |x| <= 126: x = n + f,
// |f| <= 1/2, 2^f by a degree-4 polynomial (a relative-error fit on [-1/2, 1/2]), scaled by 2^n.
FUSEDLM_INLINE __m512 vexp2_lowp_within_126(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0x1.399744p-7f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.ca1444p-5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.ec06dep-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.62e0dcp-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.ffffe8p-1f));
  return _mm512_scalef_ps(p, n);
}
// The same for any x, clamped to [-150, 127] first (NaN kept), so the result is finite: 0 below
// 2^-150, at most 2^127 * 1.42.
FUSEDLM_INLINE __m512 vexp2_lowp(__m512 x) {
  return vexp2_lowp_within_126(_mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-150.0f), x)));
}
// 1 / x to 2^-14 relative (rcp14's estimate alone), for results rounded to bf16.
FUSEDLM_INLINE __m512 vrcp_lowp(__m512 x) { return _mm512_rcp14_ps(x); }

using avx512::bf16_bits_to_ps;
#if defined(FUSEDLM_AVX512_REGION_BF16)
FUSEDLM_INLINE __m256i ps_to_bf16_bits(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
#else
using avx512::ps_to_bf16_bits;  // torch's rounding, in integer ops
#endif

struct Avx512Isa {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int W = 16;
  static FUSEDLM_INLINE Mask mask(int64_t left) { return left >= 16 ? Mask(0xffff) : Mask((1u << left) - 1u); }
  static FUSEDLM_INLINE V load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static FUSEDLM_INLINE V load(const bf16* p, Mask m) { return bf16_bits_to_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static FUSEDLM_INLINE V loadf(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static FUSEDLM_INLINE V store(float* p, V v, Mask m) {
    _mm512_mask_storeu_ps(p, m, v);
    return v;
  }
  static FUSEDLM_INLINE V store(bf16* p, V v, Mask m) {
    const __m256i bits = ps_to_bf16_bits(v);
    _mm256_mask_storeu_epi16(p, m, bits);
    return bf16_bits_to_ps(bits);
  }
  static FUSEDLM_INLINE V round(const float*, V v) { return v; }
  static FUSEDLM_INLINE V round(const bf16*, V v) { return bf16_bits_to_ps(ps_to_bf16_bits(v)); }
  static FUSEDLM_INLINE void add_to(float* p, V v, Mask m) {
    _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), v));
  }
  static FUSEDLM_INLINE void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

}  // namespace
}  // namespace mlp
}  // namespace cpu
}  // namespace fusedlm
