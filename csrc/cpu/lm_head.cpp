// The row pass of lm_head_softmax on the CPU (contract in lm_head.h): OpenMP over rows, each row
// walked by an AVX-512 kernel (chosen at run time) or the portable scalar one. Same formula; the
// float32 sums run in a different order, so the two agree to rounding.
//
// Three passes over a row of V values (200 KiB of float32 at V = 50304, which stays in L2
// between passes): (1) read z, take m = max(z); (2) read z again, write e = exp((z - m) / T) into
// probs and sum it; (3) scale probs by 1 / sum in place. The max is subtracted before the scaling:
// the largest logit gives exactly exp(0) = 1, however small T is (scaling first, z / T - m / T
// leaves it the rounding error of z / T, thousands at T = 1e-10, where every exp of a row could
// underflow and the row become 0 / 0), and the exponent's error is that of z - m, not of z / T. Traffic per row: 2 reads of the logits, one
// read and two writes of the float32 row, against the GEMM that made the row (2 d flops per value).
#include "cpu/lm_head.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/avx512_math.h"
#include "cpu/layer_norm_rows.h"  // FUSEDLM_X86

namespace fusedlm {
namespace cpu {
namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// --- scalar rows -------------------------------------------------------------------------------

template <typename Load>
void row_scalar(Load load, float* p, int64_t vocab, float inv_t) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, load(v));
  float s = 0.f;
  for (int64_t v = 0; v < vocab; ++v) {
    const float e = std::exp((load(v) - mx) * inv_t);
    p[v] = e;
    s += e;
  }
  const float inv_s = 1.f / s;
  for (int64_t v = 0; v < vocab; ++v) p[v] *= inv_s;
}

void row_scalar(const void* z, DType dtype, float* p, int64_t vocab, float inv_t) {
  if (dtype == DType::BFloat16) {
    const uint16_t* zb = static_cast<const uint16_t*>(z);
    row_scalar([zb](int64_t v) { return bf16_to_float(zb[v]); }, p, vocab, inv_t);
  } else {
    const float* zf = static_cast<const float*>(z);
    row_scalar([zf](int64_t v) { return zf[v]; }, p, vocab, inv_t);
  }
}

// --- AVX-512 rows --------------------------------------------------------------------------------
#if FUSEDLM_X86
#include "cpu/avx512_region_begin.h"

using avx512::lanes;

inline __m512 load16(const float* z, __mmask16 m) { return _mm512_maskz_loadu_ps(m, z); }
inline __m512 load16(const uint16_t* z, __mmask16 m) {
  return avx512::bf16_bits_to_ps(_mm256_maskz_loadu_epi16(m, z));
}

// Masked-off lanes load 0 and are kept out of the max and the sum by the masked operations.
template <typename T>
void row_avx512(const T* z, float* p, int64_t vocab, float inv_t) {
  __m512 mx0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), mx1 = mx0;
  int64_t v = 0;
  for (; v + 32 <= vocab; v += 32) {  // two chains in flight
    mx0 = _mm512_max_ps(mx0, load16(z + v, 0xffff));
    mx1 = _mm512_max_ps(mx1, load16(z + v + 16, 0xffff));
  }
  for (; v < vocab; v += 16) {
    const __mmask16 m = lanes(vocab - v);
    mx0 = _mm512_mask_max_ps(mx0, m, mx0, load16(z + v, m));
  }
  const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1)));
  const __m512 vt = _mm512_set1_ps(inv_t);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (v = 0; v + 32 <= vocab; v += 32) {
    const __m512 e0 = avx512::exp16(_mm512_mul_ps(_mm512_sub_ps(load16(z + v, 0xffff), vm), vt));
    const __m512 e1 = avx512::exp16(_mm512_mul_ps(_mm512_sub_ps(load16(z + v + 16, 0xffff), vm), vt));
    _mm512_storeu_ps(p + v, e0);
    _mm512_storeu_ps(p + v + 16, e1);
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  for (; v < vocab; v += 16) {
    const __mmask16 m = lanes(vocab - v);
    const __m512 e = avx512::exp16(_mm512_mul_ps(_mm512_sub_ps(load16(z + v, m), vm), vt));
    _mm512_mask_storeu_ps(p + v, m, e);
    s0 = _mm512_mask_add_ps(s0, m, s0, e);
  }
  const __m512 inv_s = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)));
  for (v = 0; v < vocab; v += 16) {
    const __mmask16 m = lanes(vocab - v);
    _mm512_mask_storeu_ps(p + v, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + v), inv_s));
  }
}

void row_avx512(const void* z, DType dtype, float* p, int64_t vocab, float inv_t) {
  if (dtype == DType::BFloat16) {
    row_avx512(static_cast<const uint16_t*>(z), p, vocab, inv_t);
  } else {
    row_avx512(static_cast<const float*>(z), p, vocab, inv_t);
  }
}

#include "cpu/avx512_region_end.h"
#endif  // FUSEDLM_X86

size_t element_bytes(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

}  // namespace

void lm_head_softmax_rows(const LmHeadRowsArgs& a) {
  const char* logits = static_cast<const char*>(a.logits);
  const size_t row_bytes = size_t(a.logits_stride) * element_bytes(a.dtype);
  // One thread for one row (a decode step) or below kMinParallelElems logits. Rows are independent,
  // so the bits do not depend on it.
  const int nt = a.rows > 1 && a.rows * a.vocab >= kMinParallelElems ? a.num_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t r = 0; r < a.rows; ++r) {
    const void* z = logits + size_t(r) * row_bytes;
    float* p = a.probs + r * a.vocab;
#if FUSEDLM_X86
    if (a.isa == Isa::Avx512) {
      row_avx512(z, a.dtype, p, a.vocab, a.inv_temperature);
      continue;
    }
#endif
    row_scalar(z, a.dtype, p, a.vocab, a.inv_temperature);
  }
}

}  // namespace cpu
}  // namespace fusedlm
