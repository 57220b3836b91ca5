// The fused softmax / loss / gradient pass of the tiled linear cross-entropy on the CPU
// (formulas in softmax_output.h): OpenMP over the rows of a tile, each row's block of columns
// walked by an AVX-512 kernel (chosen at run time) or the portable scalar one. Same formulas;
// the fp32 sums are taken in a different order, so the two agree to rounding.
//
// Memory traffic per row block of `cols` floats (8 KiB at 2048 columns, in L1 between passes):
//   forward:  pass 1 reads z, writes c = softcap(z) in place (only with softcap), takes max and
//             sum(c); pass 2 reads c, takes sum(exp(c - max)); then the row's running stats merge.
//   backward: one pass: reads z, writes dz in place (p = exp(c - lse) from the saved lse).
#include "cpu/softmax_output.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/avx512_math.h"
#include "cpu/layer_norm_rows.h"  // FUSEDLM_X86

#if FUSEDLM_X86
#include <immintrin.h>
#endif

namespace fusedlm {
namespace cpu {
namespace {

// What a row's target means: a column to read, ignored (loss 0), or invalid (never read).
enum class TargetKind { Valid, Ignored, Invalid };

inline TargetKind target_kind(int64_t t, int64_t ignore_index, int64_t vocab) {
  if (t == ignore_index) return TargetKind::Ignored;
  return (t >= 0 && t < vocab) ? TargetKind::Valid : TargetKind::Invalid;
}

inline float cap(float z, float softcap) { return softcap > 0.f ? softcap * std::tanh(z / softcap) : z; }

// loss from the row statistics; c_t is the (soft-capped) target logit.
inline float row_loss(float lse, float c_t, float sum_c, int64_t vocab, const CrossEntropyTileArgs& a) {
  const float eps = a.label_smoothing;  // eps == 0 adds nothing, even where a logit is -inf (sum_c = -inf)
  const float smooth = eps > 0.f ? eps * (lse - sum_c / float(vocab)) : 0.f;
  return (1.f - eps) * (lse - c_t) + smooth + a.z_loss * lse * lse;
}

// --- scalar rows -------------------------------------------------------------------------------

// The block's statistics (max c, sum exp(c - max), sum c); z is replaced by c.
struct BlockStats {
  float max_c, sum_exp, sum_c;
};

BlockStats fwd_row_scalar(float* z, int64_t cols, float softcap) {
  float mx = -std::numeric_limits<float>::infinity(), sc = 0.f;
  for (int64_t v = 0; v < cols; ++v) {
    const float c = cap(z[v], softcap);
    z[v] = c;
    mx = std::max(mx, c);
    sc += c;
  }
  const float shift = mx == -std::numeric_limits<float>::infinity() ? 0.f : mx;  // a block of -inf: sum 0
  float s = 0.f;
  for (int64_t v = 0; v < cols; ++v) s += std::exp(z[v] - shift);
  return {mx, s, sc};
}

void bwd_row_scalar(float* z, int64_t cols, float softcap, float lse, float scale_p, float shift) {
  for (int64_t v = 0; v < cols; ++v) {
    const float c = cap(z[v], softcap);
    float d = scale_p * std::exp(c - lse) - shift;
    if (softcap > 0.f) d *= 1.f - (c / softcap) * (c / softcap);
    z[v] = d;
  }
}

// --- AVX-512 rows --------------------------------------------------------------------------------
#if FUSEDLM_X86
#include "cpu/avx512_region_begin.h"

using avx512::exp16;
using avx512::lanes;

// tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|); below |y| = 1/16 (where 1 - e cancels) its
// odd Taylor series to y^9 (error < 1e-12 relative there).
inline __m512 tanh16(__m512 y) {
  const __m512 ay = _mm512_abs_ps(y);
  const __m512 e = exp16(_mm512_mul_ps(ay, _mm512_set1_ps(-2.f)));
  const __m512 big = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.f), e), _mm512_add_ps(_mm512_set1_ps(1.f), e));
  const __m512 y2 = _mm512_mul_ps(ay, ay);
  __m512 q = _mm512_set1_ps(62.f / 2835.f);
  q = _mm512_fmadd_ps(q, y2, _mm512_set1_ps(-17.f / 315.f));
  q = _mm512_fmadd_ps(q, y2, _mm512_set1_ps(2.f / 15.f));
  q = _mm512_fmadd_ps(q, y2, _mm512_set1_ps(-1.f / 3.f));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(q, y2), ay, ay);
  const __m512 t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ay, _mm512_set1_ps(0.0625f), _CMP_LT_OQ), big, small);
  const __mmask16 neg = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_sub_ps(t, neg, _mm512_setzero_ps(), t);
}

inline __m512 cap16(__m512 z, float softcap) {
  return _mm512_mul_ps(_mm512_set1_ps(softcap), tanh16(_mm512_mul_ps(z, _mm512_set1_ps(1.f / softcap))));
}

BlockStats fwd_row_avx512(float* z, int64_t cols, float softcap) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sc = _mm512_setzero_ps();
  for (int64_t v = 0; v < cols; v += 16) {
    const __mmask16 m = lanes(cols - v);
    __m512 c = _mm512_maskz_loadu_ps(m, z + v);
    if (softcap > 0.f) {
      c = cap16(c, softcap);
      _mm512_mask_storeu_ps(z + v, m, c);
    }
    mx = _mm512_mask_max_ps(mx, m, mx, c);
    sc = _mm512_mask_add_ps(sc, m, sc, c);
  }
  const float row_max = _mm512_reduce_max_ps(mx);
  // a block of -inf logits (a masked vocabulary range): exp(-inf - 0) = 0, not exp(-inf + inf)
  const __m512 vmax = _mm512_set1_ps(row_max == -std::numeric_limits<float>::infinity() ? 0.f : row_max);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();  // two chains in flight
  int64_t v = 0;
  for (; v + 32 <= cols; v += 32) {
    s0 = _mm512_add_ps(s0, exp16(_mm512_sub_ps(_mm512_loadu_ps(z + v), vmax)));
    s1 = _mm512_add_ps(s1, exp16(_mm512_sub_ps(_mm512_loadu_ps(z + v + 16), vmax)));
  }
  for (; v < cols; v += 16) {
    const __mmask16 m = lanes(cols - v);
    s0 = _mm512_mask_add_ps(s0, m, s0, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, z + v), vmax)));
  }
  return {row_max, _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)), _mm512_reduce_add_ps(sc)};
}

void bwd_row_avx512(float* z, int64_t cols, float softcap, float lse, float scale_p, float shift) {
  const __m512 vlse = _mm512_set1_ps(lse), vscale = _mm512_set1_ps(scale_p), vshift = _mm512_set1_ps(shift);
  const __m512 inv_cap = _mm512_set1_ps(softcap > 0.f ? 1.f / softcap : 0.f), one = _mm512_set1_ps(1.f);
  for (int64_t v = 0; v < cols; v += 16) {
    const __mmask16 m = lanes(cols - v);
    __m512 c = _mm512_maskz_loadu_ps(m, z + v);
    if (softcap > 0.f) c = cap16(c, softcap);
    __m512 d = _mm512_fmsub_ps(vscale, exp16(_mm512_sub_ps(c, vlse)), vshift);
    if (softcap > 0.f) {
      const __m512 u = _mm512_mul_ps(c, inv_cap);
      d = _mm512_mul_ps(d, _mm512_fnmadd_ps(u, u, one));
    }
    _mm512_mask_storeu_ps(z + v, m, d);
  }
}

#include "cpu/avx512_region_end.h"
#endif  // FUSEDLM_X86

BlockStats fwd_row(Isa isa, float* z, int64_t cols, float softcap) {
#if FUSEDLM_X86
  if (isa == Isa::Avx512) return fwd_row_avx512(z, cols, softcap);
#endif
  return fwd_row_scalar(z, cols, softcap);
}

void bwd_row(Isa isa, float* z, int64_t cols, float softcap, float lse, float scale_p, float shift) {
#if FUSEDLM_X86
  if (isa == Isa::Avx512) return bwd_row_avx512(z, cols, softcap, lse, scale_p, shift);
#endif
  bwd_row_scalar(z, cols, softcap, lse, scale_p, shift);
}

// Threads for a tile: one below kMinParallelElems (perf on 32 x 1000 tiles: libgomp's share of the
// samples fell from 29% to 12%; the GEMM dominates the wall-clock time there either way). Rows are
// independent: the same bits.
int tile_threads(const CrossEntropyTileArgs& a) {
  return a.rows > 1 && a.rows * a.cols >= kMinParallelElems ? a.num_threads : 1;
}

}  // namespace

void cross_entropy_tile_fwd(const CrossEntropyTileArgs& a) {
  const int64_t cols = a.cols, col0 = a.col0;
  const bool first = col0 == 0, last = col0 + cols == a.vocab;
  const int nt = tile_threads(a);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t r = 0; r < a.rows; ++r) {
    float* z = a.logits + r * cols;
    const int64_t t = a.target[r];
    const TargetKind kind = target_kind(t, a.ignore_index, a.vocab);
    const BlockStats b = fwd_row(a.isa, z, cols, a.softcap);
    CrossEntropyRowStats& st = a.stats[r];
    if (first) {
      st = {b.max_c, b.sum_exp, b.sum_c, 0.f};
    } else {  // online log-sum-exp: rescale both sums to the larger max
      const float mx = std::max(st.max_c, b.max_c);
      if (mx != -std::numeric_limits<float>::infinity()) {  // else both sums are 0
        st.sum_exp = st.sum_exp * std::exp(st.max_c - mx) + b.sum_exp * std::exp(b.max_c - mx);
      }
      st.max_c = mx;
      st.sum_c += b.sum_c;
    }
    if (kind == TargetKind::Valid && t >= col0 && t < col0 + cols) st.c_target = z[t - col0];  // c, after the pass
    if (last) {
      const float lse = st.max_c + std::log(st.sum_exp);
      a.lse[r] = lse;
      if (kind == TargetKind::Valid) {
        a.loss[r] = row_loss(lse, st.c_target, st.sum_c, a.vocab, a);
      } else {
        a.loss[r] = kind == TargetKind::Ignored ? 0.f : std::numeric_limits<float>::quiet_NaN();
      }
    }
  }
}

void cross_entropy_tile_bwd(const CrossEntropyTileArgs& a) {
  const int64_t cols = a.cols, col0 = a.col0;
  const float eps = a.label_smoothing;
  const int nt = tile_threads(a);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t r = 0; r < a.rows; ++r) {
    float* z = a.logits + r * cols;
    const int64_t t = a.target[r];
    if (target_kind(t, a.ignore_index, a.vocab) != TargetKind::Valid) {
      for (int64_t v = 0; v < cols; ++v) z[v] = 0.f;
      continue;
    }
    const float g = a.dloss[r], lse = a.lse[r];
    const bool has_target = t >= col0 && t < col0 + cols;
    const float z_t = has_target ? z[t - col0] : 0.f;
    bwd_row(a.isa, z, cols, a.softcap, lse, g * (1.f + 2.f * a.z_loss * lse), g * eps / float(a.vocab));
    if (!has_target) continue;
    // The one-hot term, through the softcap's derivative at the target.
    float chain = 1.f;
    if (a.softcap > 0.f) {
      const float u = std::tanh(z_t / a.softcap);
      chain = 1.f - u * u;
    }
    z[t - col0] -= g * (1.f - eps) * chain;
  }
}

}  // namespace cpu
}  // namespace fusedlm
