// AVX-512 row kernels of the CPU LayerNorm / RMSNorm (the math and the drivers are in
// layer_norm.cpp). Compiled for AVX-512 (the region of avx512_region_begin.h) and called only after
// the run-time CPU check, so the library still loads and runs on CPUs without AVX-512.
//
// A row is walked in 16-column steps. The main loop takes four steps at a time, each feeding
// its own accumulator (four add/fma chains in flight instead of one: at N = 768 a single
// chain would cost more than the row's memory traffic); the steps past the last multiple of
// 64 use the first accumulator, the very last one masked, so any N works without a scalar tail.
// Masked-off lanes load 0 and are kept out of every sum.
#include "cpu/layer_norm_rows.h"

#if FUSEDLM_X86
#include <immintrin.h>

#include "cpu/avx512_math.h"

#include "cpu/avx512_region_begin.h"

#define FUSEDLM_INLINE inline __attribute__((always_inline))

namespace fusedlm {
namespace cpu {
namespace rows {
namespace {

constexpr __mmask16 kAll = 0xffff;

using avx512::lanes;

// body(acc, j, mask) for every 16-column step j of a row of n columns (see the top). The four
// accumulators are separate locals (not an array) so that they stay in registers.
template <typename Acc, typename Body>
FUSEDLM_INLINE void for_each_step(int64_t n, Acc& a0, Acc& a1, Acc& a2, Acc& a3, Body&& body) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    body(a0, j, kAll);
    body(a1, j + 16, kAll);
    body(a2, j + 32, kAll);
    body(a3, j + 48, kAll);
  }
  for (; j < n; j += 16) body(a0, j, lanes(n - j));
}

// Two running sums per accumulator.
struct Sums2 {
  __m512 s, t;
};

FUSEDLM_INLINE float hsum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4e));  // + the other 256-bit half
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));  // + the neighbouring 128-bit lane
  __m128 x = _mm512_castps512_ps128(v);
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
FUSEDLM_INLINE float hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  return hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// --- conversions, loads and stores per element type ---

using avx512::bf16_bits_to_ps;
using avx512::ps_to_bf16_bits;  // torch's rounding (a handful of ops per 16 values, lost in the memory time)
FUSEDLM_INLINE __m256i ps_to_fp16_bits(__m512 v) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

FUSEDLM_INLINE __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
FUSEDLM_INLINE __m512 load(const bf16* p, __mmask16 m) { return bf16_bits_to_ps(_mm256_maskz_loadu_epi16(m, p)); }
FUSEDLM_INLINE __m512 load(const fp16* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

FUSEDLM_INLINE void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// v rounded to T: the value h takes once stored (identity for fp32).
FUSEDLM_INLINE __m512 rounded(const float*, __m512 v) { return v; }
FUSEDLM_INLINE __m512 rounded(const bf16*, __m512 v) { return bf16_bits_to_ps(ps_to_bf16_bits(v)); }
FUSEDLM_INLINE __m512 rounded(const fp16*, __m512 v) { return _mm512_cvtph_ps(ps_to_fp16_bits(v)); }

// Output stores. kStream writes whole aligned vectors past the caches (vmovntps / vmovntdq):
// a normal store first reads the line it overwrites (read for ownership) and evicts the
// inputs from the last-level cache; a streamed one does neither. The drivers choose it only
// for outputs too large to stay cached for their reader anyway.
template <bool kStream>
FUSEDLM_INLINE void store_out(float* p, __m512 v, __mmask16 m) {
  if constexpr (kStream) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}
template <bool kStream>
FUSEDLM_INLINE void store_bits(uint16_t* p, __m256i bits, __mmask16 m) {
  if constexpr (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits);
  } else {
    _mm256_mask_storeu_epi16(p, m, bits);
  }
}
// Stores v rounded to T and returns the rounded value.
template <bool kStream>
FUSEDLM_INLINE __m512 store_out_rounded(float* p, __m512 v, __mmask16 m) {
  store_out<kStream>(p, v, m);
  return v;
}
template <bool kStream>
FUSEDLM_INLINE __m512 store_out_rounded(bf16* p, __m512 v, __mmask16 m) {
  const __m256i bits = ps_to_bf16_bits(v);
  store_bits<kStream>(&p->bits, bits, m);
  return bf16_bits_to_ps(bits);
}
template <bool kStream>
FUSEDLM_INLINE __m512 store_out_rounded(fp16* p, __m512 v, __mmask16 m) {
  const __m256i bits = ps_to_fp16_bits(v);
  store_bits<kStream>(&p->bits, bits, m);
  return _mm512_cvtph_ps(bits);
}

// --- the row kernels ---

template <typename T, bool kRms, bool kRes, bool kStream>
void fwd_row(const T* x, const T* res, const float* w, const float* b, T* y, T* h, int64_t n, float eps, float* mean_out,
             float* rstd_out) {
  // h at step j, from L1 after pass 1. A streamed h is in no cache, so then it is recomputed
  // from x and res (which are).
  auto load_h = [&](int64_t j, __mmask16 m) __attribute__((always_inline)) {
    if constexpr (kRes && kStream) {
      return rounded(x, _mm512_add_ps(load(x + j, m), load(res + j, m)));
    } else if constexpr (kRes) {
      return load(h + j, m);
    } else {
      return load(x + j, m);
    }
  };
  // Pass 1 (from memory): h = round(x + res) is stored; sum h, or h^2 for rmsnorm.
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for_each_step(n, a0, a1, a2, a3, [&](__m512& a, int64_t j, __mmask16 m) __attribute__((always_inline)) {
    __m512 v;
    if constexpr (kRes) {
      v = store_out_rounded<kStream>(h + j, _mm512_add_ps(load(x + j, m), load(res + j, m)), m);
    } else {
      v = load(x + j, m);
    }
    a = kRms ? _mm512_fmadd_ps(v, v, a) : _mm512_add_ps(a, v);
  });
  float mean = 0.0f, rstd;
  if constexpr (kRms) {
    rstd = 1.0f / std::sqrt(hsum4(a0, a1, a2, a3) / float(n) + eps);
  } else {
    // Pass 2 (L1): the centred sums; maskz_sub keeps the masked lanes at 0 instead of -mean0.
    const float mean0 = hsum4(a0, a1, a2, a3) / float(n);
    const __m512 mean0v = _mm512_set1_ps(mean0);
    Sums2 c0{_mm512_setzero_ps(), _mm512_setzero_ps()}, c1 = c0, c2 = c0, c3 = c0;  // sum(d), sum(d^2)
    for_each_step(n, c0, c1, c2, c3, [&](Sums2& c, int64_t j, __mmask16 m) __attribute__((always_inline)) {
      const __m512 d = _mm512_maskz_sub_ps(m, load_h(j, m), mean0v);
      c.s = _mm512_add_ps(c.s, d);
      c.t = _mm512_fmadd_ps(d, d, c.t);
    });
    finish_stats(mean0, hsum4(c0.s, c1.s, c2.s, c3.s), hsum4(c0.t, c1.t, c2.t, c3.t), n, eps, &mean, &rstd);
  }
  if (mean_out != nullptr) *mean_out = mean;
  *rstd_out = rstd;
  // Pass 3 (L1): y = (h - mean) * rstd * w + b.
  const __m512 meanv = _mm512_set1_ps(mean), rstdv = _mm512_set1_ps(rstd);
  int none = 0;
  for_each_step(n, none, none, none, none, [&](int&, int64_t j, __mmask16 m) __attribute__((always_inline)) {
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load_h(j, m), meanv), rstdv);
    const __m512 out = b != nullptr ? _mm512_fmadd_ps(xhat, load(w + j, m), load(b + j, m))
                                    : _mm512_mul_ps(xhat, load(w + j, m));
    store_out_rounded<kStream>(y + j, out, m);
  });
}

template <typename T, bool kRms, bool kStream>
void bwd_row(const T* dy, const T* dh, const T* h, const float* w, float mean, float rstd, T* dx, float* dwp, float* dbp,
             int64_t n) {
  const __m512 meanv = _mm512_set1_ps(mean), rstdv = _mm512_set1_ps(rstd);
  // Pass 1 (from memory): the row sums of g and g * xhat, and the chunk partials. Masked-off
  // lanes have dy = 0, so g = 0 and every product with them is 0.
  Sums2 a0{_mm512_setzero_ps(), _mm512_setzero_ps()}, a1 = a0, a2 = a0, a3 = a0;  // sum(g), sum(g * xhat)
  for_each_step(n, a0, a1, a2, a3, [&](Sums2& a, int64_t j, __mmask16 m) __attribute__((always_inline)) {
    const __m512 d = load(dy + j, m);
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load(h + j, m), meanv), rstdv);
    const __m512 g = _mm512_mul_ps(d, load(w + j, m));
    if constexpr (!kRms) a.s = _mm512_add_ps(a.s, g);
    a.t = _mm512_fmadd_ps(g, xhat, a.t);
    store(dwp + j, _mm512_fmadd_ps(d, xhat, load(dwp + j, m)), m);
    if (dbp != nullptr) store(dbp + j, _mm512_add_ps(d, load(dbp + j, m)), m);
  });
  const __m512 c1v = _mm512_set1_ps(kRms ? 0.0f : hsum4(a0.s, a1.s, a2.s, a3.s) / float(n));
  const __m512 c2v = _mm512_set1_ps(hsum4(a0.t, a1.t, a2.t, a3.t) / float(n));
  // Pass 2 (L1): dx = rstd * ((g - <g>) - xhat * <g xhat>) + dh.
  int none = 0;
  for_each_step(n, none, none, none, none, [&](int&, int64_t j, __mmask16 m) __attribute__((always_inline)) {
    const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(load(h + j, m), meanv), rstdv);
    const __m512 g = _mm512_mul_ps(load(dy + j, m), load(w + j, m));
    __m512 v = _mm512_mul_ps(rstdv, _mm512_fnmadd_ps(xhat, c2v, _mm512_sub_ps(g, c1v)));
    if (dh != nullptr) v = _mm512_add_ps(v, load(dh + j, m));
    store_out_rounded<kStream>(dx + j, v, m);
  });
}

}  // namespace

template <typename T>
FwdRowFn<T> avx512_fwd_row(bool rms, bool residual, bool stream) {
  // Index bits: rms, residual, stream.
  static const FwdRowFn<T> table[8] = {
      fwd_row<T, false, false, false>, fwd_row<T, false, false, true>, fwd_row<T, false, true, false>,
      fwd_row<T, false, true, true>,   fwd_row<T, true, false, false>, fwd_row<T, true, false, true>,
      fwd_row<T, true, true, false>,   fwd_row<T, true, true, true>,
  };
  return table[(rms ? 4 : 0) | (residual ? 2 : 0) | (stream ? 1 : 0)];
}

template <typename T>
BwdRowFn<T> avx512_bwd_row(bool rms, bool stream) {
  static const BwdRowFn<T> table[4] = {bwd_row<T, false, false>, bwd_row<T, false, true>, bwd_row<T, true, false>,
                                       bwd_row<T, true, true>};
  return table[(rms ? 2 : 0) | (stream ? 1 : 0)];
}

void avx512_stream_fence() { _mm_sfence(); }

template FwdRowFn<float> avx512_fwd_row<float>(bool, bool, bool);
template FwdRowFn<bf16> avx512_fwd_row<bf16>(bool, bool, bool);
template FwdRowFn<fp16> avx512_fwd_row<fp16>(bool, bool, bool);
template BwdRowFn<float> avx512_bwd_row<float>(bool, bool);
template BwdRowFn<bf16> avx512_bwd_row<bf16>(bool, bool);
template BwdRowFn<fp16> avx512_bwd_row<fp16>(bool, bool);

}  // namespace rows
}  // namespace cpu
}  // namespace fusedlm

#include "cpu/avx512_region_end.h"

#endif  // FUSEDLM_X86
