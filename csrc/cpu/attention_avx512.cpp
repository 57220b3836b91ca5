// AVX-512 tile kernels of the CPU flash attention (the drivers and the math are in attention.cpp,
// the tile layout in attention_tiles.h). Compiled for AVX-512 (the region of avx512_region_begin.h) and
// called only after the run-time CPU check.
//
// The GEMM micro-kernel keeps a 6 x 64 block of C in 24 zmm accumulators: per step p it loads 4
// vectors of B's row p and broadcasts 6 elements of A's column p, 24 FMAs for 10 loads, so it runs
// at the FMA rate from L1/L2. Tails: fewer rows take a smaller instantiation, the last vector of
// a row is masked, so any m, n, k works and nothing past n is read or written.
#include "cpu/attention_tiles.h"

#if FUSEDLM_ATTN_X86
#include <immintrin.h>

#include "cpu/avx512_math.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

#include "cpu/avx512_region_begin.h"

#define FUSEDLM_INLINE inline __attribute__((always_inline))

namespace fusedlm {
namespace cpu {
namespace attn {
namespace {

constexpr int kRows = 6;  // micro-kernel rows of C
constexpr int kVecs = 4;  // micro-kernel vectors (16 floats) per row of C
constexpr __mmask16 kAll = 0xffff;

using avx512::lanes;

template <int MR, int NV, bool kAcc>
void micro_kernel(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c,
                  int64_t ldc, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = kAcc ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : kAll, c + r * ldc + 16 * v) : _mm512_setzero_ps();
  int64_t off[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) off[r] = r * a_row;
  for (int64_t p = 0; p < k; ++p) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, b + 16 * v) : _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 ar = _mm512_set1_ps(a[off[r]]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
    a += a_col;
    b += ldb;
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, v == NV - 1 ? last : kAll, acc[r][v]);
}

using MicroFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, __mmask16);

template <bool kAcc, int MR, int... NV>
constexpr auto row_of(std::integer_sequence<int, NV...>) {
  return std::array<MicroFn, sizeof...(NV)>{&micro_kernel<MR, NV + 1, kAcc>...};
}

template <bool kAcc, int... MR>
constexpr auto table_of(std::integer_sequence<int, MR...>) {
  return std::array<std::array<MicroFn, kVecs>, sizeof...(MR)>{
      row_of<kAcc, MR + 1>(std::make_integer_sequence<int, kVecs>{})...};
}

// [accumulate][rows - 1][vectors - 1]
const std::array<std::array<MicroFn, kVecs>, kRows> kMicro[2] = {
    table_of<false>(std::make_integer_sequence<int, kRows>{}),
    table_of<true>(std::make_integer_sequence<int, kRows>{})};

void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate) {
  // B's 64-column panel stays in L1 while every 6-row block of A streams past it.
  for (int64_t n0 = 0; n0 < n; n0 += 16 * kVecs) {
    const int64_t width = std::min<int64_t>(16 * kVecs, n - n0);
    const int64_t nv = (width + 15) / 16;
    const __mmask16 last = lanes(width - 16 * (nv - 1));
    for (int64_t m0 = 0; m0 < m; m0 += kRows) {
      const int64_t mr = std::min<int64_t>(kRows, m - m0);
      kMicro[accumulate][mr - 1][nv - 1](k, a + m0 * a_row, a_row, a_col, b + n0, ldb, c + m0 * ldc + n0, ldc, last);
    }
  }
}

// 2^x for x <= 0 (and x = -inf -> 0): x = n + f with n = round(x), |f| <= 1/2; 2^f by its degree-7
// Taylor polynomial (truncation below 1e-8 relative), times 2^n by vscalefps (which flushes to 0
// below the fp32 range). The clamp at -200 keeps -inf out of the arithmetic (2^-200 is 0 in fp32);
// NaN passes it (maxps returns its second operand, x, when one is NaN), so that a NaN score (NaN or
// inf in q or k) makes its query's row NaN, as in the reference.
FUSEDLM_INLINE __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252734e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Lanes of query columns c0..c0+15 that key row r may see: c >= r + diag.
FUSEDLM_INLINE __mmask16 visible(TileMask mask, int64_t r, int64_t c0) {
  if (!mask.on) return kAll;
  const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(int32_t(c0)), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8,
                                                                                          9, 10, 11, 12, 13, 14, 15));
  const int64_t first = std::clamp<int64_t>(r + mask.diag, -1, kQueryBlock + 1);
  return _mm512_cmpge_epi32_mask(cols, _mm512_set1_epi32(int32_t(first)));
}

constexpr int kTileVecs = int(kQueryBlock / 16);

void softmax_fwd(float* s, int64_t nk, int64_t nq, TileMask mask, float* m, float* l, float* o, int64_t d) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int nv = int((nq + 15) / 16);
  for (int v = 0; v < nv; ++v) {
    __m512 mx = neg_inf;
    for (int64_t r = 0; r < nk; ++r) {
      float* row = s + r * kQueryBlock + 16 * v;
      const __mmask16 vis = visible(mask, r, 16 * v);
      const __m512 x = _mm512_mask_loadu_ps(neg_inf, vis, row);
      if (mask.on) _mm512_storeu_ps(row, x);
      mx = _mm512_max_ps(mx, x);
    }
    const __m512 m_old = _mm512_loadu_ps(m + 16 * v);
    const __m512 m_new = _mm512_max_ps(m_old, mx);
    // shift by 0 where nothing was seen yet: exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN
    const __m512 shift = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m_new, neg_inf, _CMP_EQ_OQ), m_new,
                                              _mm512_setzero_ps());
    __m512 sum = _mm512_setzero_ps();
    for (int64_t r = 0; r < nk; ++r) {
      float* row = s + r * kQueryBlock + 16 * v;
      const __m512 p = exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(row), shift));
      _mm512_storeu_ps(row, p);
      sum = _mm512_add_ps(sum, p);
    }
    const __m512 alpha = exp2_ps(_mm512_sub_ps(m_old, shift));
    _mm512_storeu_ps(l + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(l + 16 * v), alpha, sum));
    _mm512_storeu_ps(m + 16 * v, m_new);
    alignas(64) float factor[16];
    _mm512_store_ps(factor, alpha);
    const int64_t cols = std::min<int64_t>(16, nq - 16 * v);
    for (int64_t c = 0; c < cols; ++c) {
      if (factor[c] == 1.0f) continue;  // the max did not move: most columns after the first tiles
      float* row = o + (16 * v + c) * d;
      const __m512 f = _mm512_set1_ps(factor[c]);
      for (int64_t j = 0; j < d; j += 16) {
        const __mmask16 mk = lanes(d - j);
        _mm512_mask_storeu_ps(row + j, mk, _mm512_mul_ps(f, _mm512_maskz_loadu_ps(mk, row + j)));
      }
    }
  }
}

void softmax_bwd(float* s, float* dp, int64_t nk, int64_t nq, TileMask mask, const float* lse2, const float* delta,
                 float scale) {
  const int nv = int((nq + 15) / 16);
  const __m512 sc = _mm512_set1_ps(scale);
  for (int v = 0; v < nv; ++v) {
    const __m512 shift = _mm512_loadu_ps(lse2 + 16 * v);
    const __m512 dl = _mm512_loadu_ps(delta + 16 * v);
    for (int64_t r = 0; r < nk; ++r) {
      float* srow = s + r * kQueryBlock + 16 * v;
      float* dprow = dp + r * kQueryBlock + 16 * v;
      // columns past nq become 0 too: the bf16 products pair column nq - 1 with column nq
      const __mmask16 vis = visible(mask, r, 16 * v) & lanes(nq - 16 * v);
      const __m512 p = _mm512_maskz_mov_ps(vis, exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(srow), shift)));
      _mm512_storeu_ps(srow, p);
      _mm512_storeu_ps(dprow, _mm512_maskz_mul_ps(vis, _mm512_mul_ps(p, sc), _mm512_sub_ps(_mm512_loadu_ps(dprow), dl)));
    }
  }
}

void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = lanes(n - j);
    _mm512_mask_storeu_ps(dst + j, mk, avx512::bf16_bits_to_ps(_mm256_maskz_loadu_epi16(mk, src + j)));
  }
}

// Decode streams K and V from memory once each (at B 4, H 12, 4096 keys, D 64: 100 MB, far past
// the caches), so it runs at the speed of the loads, and the hardware prefetcher alone keeps too
// few of them in flight: every line is prefetched kPrefetchRows rows ahead (prefetches never fault,
// so running past the last row is harmless). This doubled the fp32 decode speed on a 2-core EPYC.
constexpr int64_t kPrefetchRows = 16;
constexpr int64_t kValueBlock = 128;  // keys per pass over the column strips of V (L1/L2-resident)

// The cache lines of width elements of a row.
template <typename T>
FUSEDLM_INLINE void prefetch_row(const T* row, int64_t width) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t e = 0; e < width; e += kLine) _mm_prefetch(reinterpret_cast<const char*>(row + e), _MM_HINT_T0);
}

// Up to 16 elements of K or V as fp32 (bf16: widened as they are read).
FUSEDLM_INLINE __m512 load16(__mmask16 mk, const float* p) { return _mm512_maskz_loadu_ps(mk, p); }
FUSEDLM_INLINE __m512 load16(__mmask16 mk, const uint16_t* p) {
  return avx512::bf16_bits_to_ps(_mm256_maskz_loadu_epi16(mk, p));
}

// Lane r of the result = the sum of the 16 lanes of a[r]: the horizontal sums of 16 dot products
// in 15 adds and 30 shuffles (16 separate reductions take 64 of each). Each level halves the
// vectors and doubles the keys a vector holds: unpack pairs of floats, then of doubles, then
// 128-bit quarters twice.
FUSEDLM_INLINE __m512 sum_lanes16(const __m512 (&a)[16]) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

// s[j] = q . k_j for all nk keys: 16 keys at a time (16 independent FMA chains over d), then one
// key at a time for the tail.
template <typename T>
void row_scores(const float* q, const T* k, int64_t ldk, int64_t nk, int64_t d, float* s) {
  int64_t j = 0;
  for (; j + 16 <= nk; j += 16) {
    __m512 acc[16];
    for (auto& x : acc) x = _mm512_setzero_ps();
    const T* kj = k + j * ldk;
    for (int64_t e = 0; e < d; e += 16) {
      const __mmask16 mk = lanes(d - e);
      const __m512 qe = _mm512_maskz_loadu_ps(mk, q + e);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(kj + (r + kPrefetchRows) * ldk + e), _MM_HINT_T0);
        acc[r] = _mm512_fmadd_ps(qe, load16(mk, kj + r * ldk + e), acc[r]);
      }
    }
    _mm512_storeu_ps(s + j, sum_lanes16(acc));
  }
  for (; j < nk; ++j) {
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t e = 0; e < d; e += 16) {
      const __mmask16 mk = lanes(d - e);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + e), load16(mk, k + j * ldk + e), a0);
    }
    s[j] = _mm512_reduce_add_ps(a0);
  }
}

// o += sum_j p[j] v_j over keys [j0, j1), for the column strip [e0, e0 + 64) of o: two keys per step
// into two accumulator sets (8 independent FMA chains).
template <typename T>
FUSEDLM_INLINE void add_weighted_rows(const float* p, const T* v, int64_t ldv, int64_t j0, int64_t j1, int64_t e0,
                                      int64_t d, float* o) {
  const int64_t width = std::min<int64_t>(64, d - e0);
  const __mmask16 mk[4] = {lanes(width), lanes(width - 16), lanes(width - 32), lanes(width - 48)};
  __m512 x[4], y[4];
  for (int u = 0; u < 4; ++u) x[u] = _mm512_maskz_loadu_ps(mk[u], o + e0 + 16 * u), y[u] = _mm512_setzero_ps();
  const T* vj = v + j0 * ldv + e0;
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2, vj += 2 * ldv) {
    prefetch_row(vj + kPrefetchRows * ldv, width);
    prefetch_row(vj + (kPrefetchRows + 1) * ldv, width);
    const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      x[u] = _mm512_fmadd_ps(p0, load16(mk[u], vj + 16 * u), x[u]);
      y[u] = _mm512_fmadd_ps(p1, load16(mk[u], vj + ldv + 16 * u), y[u]);
    }
  }
  if (j < j1) {
    const __m512 p0 = _mm512_set1_ps(p[j]);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) x[u] = _mm512_fmadd_ps(p0, load16(mk[u], vj + 16 * u), x[u]);
  }
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u) _mm512_mask_storeu_ps(o + e0 + 16 * u, mk[u], _mm512_add_ps(x[u], y[u]));
}

// Decode: one query row against nk keys in two streaming passes, scores (keys 16 at a time, d the
// lanes of the dot products), then the softmax over the scores (keys the lanes) and P V (d the
// lanes), blocks of kValueBlock keys at a time so that each block's rows stay cached while the
// column strips of a wide head pass over them. bf16 K and V are widened as they are read (no fp32
// copy: half the bytes to stream).
template <typename T>
void attend_row(const float* q, const T* k, int64_t ldk, const T* v, int64_t ldv, int64_t nk, int64_t d, float* s,
                float* o, float* m_out, float* l_out) {
  std::fill(o, o + d, 0.0f);
  *m_out = -std::numeric_limits<float>::infinity();
  *l_out = 0.0f;
  if (nk <= 0) return;
  row_scores(q, k, ldk, nk, d, s);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 mx = neg_inf;
  for (int64_t j = 0; j < nk; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, lanes(nk - j), s + j));
  const float m = _mm512_reduce_max_ps(mx);
  const __m512 shift = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < nk; j += 16) {
    const __mmask16 mk = lanes(nk - j);
    const __m512 p = _mm512_maskz_mov_ps(mk, exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + j), shift)));
    _mm512_mask_storeu_ps(s + j, mk, p);
    sum = _mm512_add_ps(sum, p);
  }
  *m_out = m;
  *l_out = _mm512_reduce_add_ps(sum);
  for (int64_t j0 = 0; j0 < nk; j0 += kValueBlock)
    for (int64_t e0 = 0; e0 < d; e0 += 64) add_weighted_rows(s, v, ldv, j0, std::min(nk, j0 + kValueBlock), e0, d, o);
}

}  // namespace

TileKernels avx512_tile_kernels() {
  return {&gemm, &softmax_fwd, &softmax_bwd, &bf16_to_float, &attend_row<float>, &attend_row<uint16_t>};
}

}  // namespace attn
}  // namespace cpu
}  // namespace fusedlm

#include "cpu/avx512_region_end.h"

#endif  // FUSEDLM_ATTN_X86
