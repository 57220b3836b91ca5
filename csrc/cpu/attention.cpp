// Flash attention on the CPU: the forward and backward drivers (OpenMP) and the portable tile
// kernels; the AVX-512 tile kernels are in attention_avx512.cpp, the tile layout in attention_tiles.h.
//
// Forward, one task per (batch, query head, block of 64 queries), in fp32, base 2 (c = scale * log2 e
// is folded into the packed Q^T, so exp2 replaces exp):
//     for each block of 64 keys j (causal: only blocks some query of the task sees):
//         S^T = K_j (Q^T c)                       64 x 64 tile, the N x N matrix never exists
//         m' = max(m, colmax S^T);  P^T = exp2(S^T - m');  l = l 2^(m - m') + colsum P^T
//         O = O 2^(m - m') + (P^T)^T V_j
//     out = O / l;  lse = (m + log2 l) ln 2       (l = 0: the query saw no key -> out 0, lse -inf)
// Only blocks crossing the causal diagonal pay for a mask; blocks past it are never visited. Blocks of
// at most 4 queries (decode) take attend_row instead (AVX-512): keys as SIMD lanes, K and V read
// once, in place through their strides, bf16 widened as it is read.
// Extra memory per thread: the Q^T, O and S^T tiles (48 KiB at D = 64) and Nk scores; fp32 K and V
// are read in place through their strides. bf16 inputs take the avx512_bf16 dot products of
// attention_bf16.cpp where the CPU has them and D is even; otherwise the kv head's K and V are
// converted to fp32 once per thread and head (2 Nk D floats), shared by the query blocks and the
// GQA group, and run through the fp32 tiles here.
//
// Backward, one task per (batch, kv head), so that the task owns dK and dV of its kv head and dQ of
// the query heads of its group: every gradient is summed in one fixed order by one thread, without
// atomics, and the bits do not depend on the thread count. The price: B * Hkv tasks, so a batch of
// one MQA head runs on one thread. With P recomputed from lse:
//     delta = rowsum(dO * O) - dlse
//     for each query head g of the group, key block j, query block i (causal: the blocks that see j):
//         P^T = exp2(K_j (Q_i^T c) - lse2_i);  dP^T = V_j dO_i^T;  dS^T = scale P^T (dP^T - delta_i)
//         dV_j += P^T dO_i;  dK_j += dS^T Q_i;  dQ_i += (dS^T)^T K_j
// Five 64 x 64 x D GEMMs per tile pair, the fewest that flash backward needs. Extra memory per
// thread: Q^T and dO^T of one head (2 Nq D floats) and two tiles; for bf16 also fp32 copies of Q, dO,
// K, V and the fp32 sums of dQ, dK, dV (fp32 outputs are summed in place); attention_bf16.cpp keeps
// bf16 pair layouts instead of the copies.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "cpu/attention_tiles.h"

namespace fusedlm {
namespace cpu {
namespace {

using namespace attn;

constexpr int64_t QB = kQueryBlock, KB = kKeyBlock;

// --- portable tile kernels (same math as the AVX-512 ones; std::exp2 instead of a polynomial) ---

void gemm_scalar(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    float* crow = c + i * ldc;
    if (!accumulate) std::fill(crow, crow + n, 0.0f);
    for (int64_t p = 0; p < k; ++p) {
      const float aip = a[i * a_row + p * a_col];
      const float* brow = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) crow[j] += aip * brow[j];
    }
  }
}

inline bool hidden(TileMask mask, int64_t r, int64_t c) { return mask.on && c < r + mask.diag; }

void softmax_fwd_scalar(float* s, int64_t nk, int64_t nq, TileMask mask, float* m, float* l, float* o, int64_t d) {
  for (int64_t c = 0; c < nq; ++c) {
    float mx = -kInf;
    for (int64_t r = 0; r < nk; ++r) {
      float& x = s[r * QB + c];
      if (hidden(mask, r, c)) x = -kInf;
      mx = std::max(mx, x);
    }
    const float m_new = std::max(m[c], mx);
    const float shift = m_new == -kInf ? 0.0f : m_new;
    float sum = 0.0f;
    for (int64_t r = 0; r < nk; ++r) {
      float& x = s[r * QB + c];
      x = std::exp2(x - shift);
      sum += x;
    }
    const float alpha = std::exp2(m[c] - shift);
    l[c] = l[c] * alpha + sum;
    m[c] = m_new;
    if (alpha != 1.0f)
      for (int64_t j = 0; j < d; ++j) o[c * d + j] *= alpha;
  }
}

void softmax_bwd_scalar(float* s, float* dp, int64_t nk, int64_t nq, TileMask mask, const float* lse2,
                        const float* delta, float scale) {
  for (int64_t r = 0; r < nk; ++r)
    for (int64_t c = 0; c < nq; ++c) {
      const int64_t e = r * QB + c;
      const float p = hidden(mask, r, c) ? 0.0f : std::exp2(s[e] - lse2[c]);
      s[e] = p;
      dp[e] = p * scale * (dp[e] - delta[c]);
    }
}

void bf16_to_float_scalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = bf16_bits_to_float(src[j]);
}

TileKernels tile_kernels(Isa isa) {
#if FUSEDLM_ATTN_X86
  if (isa == Isa::Avx512) return avx512_tile_kernels();
#endif
  (void)isa;
  return {&gemm_scalar, &softmax_fwd_scalar, &softmax_bwd_scalar, &bf16_to_float_scalar, nullptr, nullptr};
}

// bf16 inputs take the avx512_bf16 dot products (attention_bf16.cpp) with the AVX-512 kernels on a
// CPU that has them, for an even head dim (whole pairs); otherwise fp32 copies and fp32 tiles.
// FUSEDLM_CPU_BF16=0 forces the fp32 copies (cpu_has_avx512_bf16, layer_norm.h).
bool use_bf16_dot(Isa isa, int64_t head_dim) {
#if FUSEDLM_ATTN_X86
  return isa == Isa::Avx512 && cpu_has_avx512_bf16() && head_dim % 2 == 0;
#else
  (void)isa, (void)head_dim;
  return false;
#endif
}

DotKernels bf16_dot_kernels() {
#if FUSEDLM_ATTN_X86
  return avx512_bf16_dot_kernels();
#else
  return {nullptr, nullptr, nullptr};
#endif
}

// --- element access --------------------------------------------------------------------------

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return bf16_bits_to_float(*p); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = float_to_bf16_bits(v); }

// rows x d elements of T (row stride ld) as fp32 rows of stride d.
template <typename T>
void rows_to_float(const TileKernels& kt, const T* src, int64_t ld, int64_t rows, int64_t d, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    if constexpr (std::is_same_v<T, float>)
      std::copy(src + r * ld, src + r * ld + d, dst + r * d);
    else
      kt.bf16_to_float(src + r * ld, dst + r * d, d);
  }
}

// dst[j * ldt + i] = src[i * ld + j] * c: rows x d rows -> d x rows columns (ldt >= rows).
template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t rows, int64_t d, float c, float* dst, int64_t ldt) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < d; ++j) dst[j * ldt + i] = load(src + i * ld + j) * c;
}

// --- forward ---------------------------------------------------------------------------------

template <typename T>
void fwd_typed(const AttentionFwdArgs& a, const TileKernels& kt) {
  const AttentionShape& sh = a.shape;
  const int64_t nq_all = sh.n_q, nk_all = sh.n_k, d = sh.head_dim;
  const int64_t group = sh.heads_q / sh.heads_kv, off = nk_all - nq_all;
  const int64_t qblocks = (nq_all + QB - 1) / QB;
  const int64_t tasks = sh.batch * sh.heads_q * qblocks;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  const float c = a.scale * kLog2e;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);

  // Blocks of at most kDecodeRows queries take attend_row (bf16: attend_row_bf16, which reads K and V
  // in place); the others the tiles, on fp32 copies of bf16 K and V.
  const bool row_kernel = kt.attend_row != nullptr && (!kConvert || kt.attend_row_bf16 != nullptr);
  const bool copies = kConvert && !(row_kernel && nq_all <= kDecodeRows);
  const int64_t tile_qt = round16(d * QB), tile_o = round16(QB * d), tile_s = KB * QB, kv = round16(nk_all * d);
  const int nt = threads_for(a.num_threads, sh, tasks);
  const Scratch scratch(nt, tile_qt + tile_o + tile_s + 2 * QB + round16(nk_all) + (copies ? 2 * kv : 0));

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* qt = scratch.of(thread_id());
    float* o = qt + tile_qt;
    float* s = o + tile_o;
    float* m = s + tile_s;
    float* l = m + QB;
    float* row_s = l + QB;  // attend_row's scores
    float* kf = row_s + round16(nk_all);  // bf16: the cached kv head, rows [0, cached_rows) converted
    float* vf = kf + kv;
    int64_t cached_head = -1, cached_rows = 0;

    // Query blocks of one head are consecutive tasks (the heads of a GQA group too), last block
    // first: causal blocks near the end have the most keys, so the dynamic schedule ends balanced.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / qblocks, qb = qblocks - 1 - t % qblocks;
      const int64_t b = bh / sh.heads_q, h = bh % sh.heads_q, kvh = h / group;
      const int64_t q0 = qb * QB, nq = std::min(QB, nq_all - q0);
      pack_transposed(q + b * a.q_stride.batch + h * a.q_stride.head + q0 * a.q_stride.row, a.q_stride.row, nq, d, c,
                      qt, QB);
      std::fill(m, m + QB, -kInf);
      std::fill(l, l + QB, 0.0f);
      std::fill(o, o + nq * d, 0.0f);
      const int64_t k_end = a.causal ? std::clamp<int64_t>(q0 + nq + off, 0, nk_all) : nk_all;
      const T* kh = k + b * a.k_stride.batch + kvh * a.k_stride.head;
      const T* vh = v + b * a.v_stride.batch + kvh * a.v_stride.head;

      if (row_kernel && nq <= kDecodeRows) {
        float* qrow = s;  // the block's rows, scaled, in the score tile (unused on this path)
        for (int64_t i = 0; i < nq; ++i)
          for (int64_t j = 0; j < d; ++j) qrow[i * d + j] = qt[j * QB + i];
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t nk = a.causal ? std::clamp<int64_t>(q0 + i + 1 + off, 0, nk_all) : nk_all;
          if constexpr (kConvert)
            kt.attend_row_bf16(qrow + i * d, kh, a.k_stride.row, vh, a.v_stride.row, nk, d, row_s, o + i * d, m + i,
                               l + i);
          else
            kt.attend_row(qrow + i * d, kh, a.k_stride.row, vh, a.v_stride.row, nk, d, row_s, o + i * d, m + i, l + i);
        }
      } else {
        const float* kp;
        const float* vp;
        int64_t ldk, ldv;
        if constexpr (kConvert) {
          const int64_t head = b * sh.heads_kv + kvh;
          if (head != cached_head) cached_head = head, cached_rows = 0;
          if (k_end > cached_rows) {
            const int64_t r0 = cached_rows, rows = k_end - r0;
            rows_to_float(kt, kh + r0 * a.k_stride.row, a.k_stride.row, rows, d, kf + r0 * d);
            rows_to_float(kt, vh + r0 * a.v_stride.row, a.v_stride.row, rows, d, vf + r0 * d);
            cached_rows = k_end;
          }
          kp = kf, vp = vf, ldk = d, ldv = d;
        } else {
          kp = kh, vp = vh, ldk = a.k_stride.row, ldv = a.v_stride.row;
        }
        for (int64_t k0 = 0; k0 < k_end; k0 += KB) {
          const int64_t nk = std::min(KB, k_end - k0);
          kt.gemm(nk, nq, d, kp + k0 * ldk, ldk, 1, qt, QB, s, QB, false);  // S^T = K_j Q^T
          const TileMask mask{a.causal && k0 + nk - 1 > q0 + off, k0 - q0 - off};
          kt.softmax_fwd(s, nk, nq, mask, m, l, o, d);
          kt.gemm(nq, d, nk, s, 1, QB, vp + k0 * ldv, ldv, o, d, true);  // O += P V_j
        }
      }

      T* orow = out + (bh * nq_all + q0) * d;
      float* lse = a.lse + bh * nq_all + q0;
      for (int64_t i = 0; i < nq; ++i) {
        const bool seen = l[i] != 0.0f;  // NaN (a NaN score) counts as seen: out and lse NaN, as the reference
        const float inv = seen ? 1.0f / l[i] : 0.0f;
        for (int64_t j = 0; j < d; ++j) store(orow + i * d + j, o[i * d + j] * inv);
        lse[i] = seen ? (m[i] + std::log2(l[i])) * kLn2 : -kInf;
      }
    }
  }
}

// --- backward --------------------------------------------------------------------------------

template <typename T>
void store_rows(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    (void)src, (void)n, (void)dst;  // summed in place
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16_bits(src[j]);
  }
}

template <typename T>
void bwd_typed(const AttentionBwdArgs& a, const TileKernels& kt) {
  const AttentionShape& sh = a.shape;
  const int64_t nq_all = sh.n_q, nk_all = sh.n_k, d = sh.head_dim;
  const int64_t group = sh.heads_q / sh.heads_kv, off = nk_all - nq_all;
  const int64_t tasks = sh.batch * sh.heads_kv;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  const float c = a.scale * kLog2e;
  const T* dout = static_cast<const T*>(a.dout);
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* out = static_cast<const T*>(a.out);
  T* dq = static_cast<T*>(a.dq);
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);

  const int64_t nq_pad = round16(nq_all), qd = round16(nq_all * d), kd = round16(nk_all * d);
  // Q^T, dO^T, lse2, delta, two tiles; bf16: Q, dO, K, V in fp32 and the fp32 sums of dQ, dK, dV.
  const int64_t floats = 2 * d * nq_pad + 2 * nq_pad + 2 * KB * QB + (kConvert ? 3 * qd + 4 * kd : 0);
  const int nt = threads_for(a.num_threads, sh, tasks);
  const Scratch scratch(nt, floats);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* qt = scratch.of(thread_id());
    float* dot = qt + d * nq_pad;
    float* lse2 = dot + d * nq_pad;
    float* delta = lse2 + nq_pad;
    float* s = delta + nq_pad;
    float* dp = s + KB * QB;
    float* extra = dp + KB * QB;  // bf16 only: qf, dof, dqf (qd each), kf, vf, dkf, dvf (kd each)

#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / sh.heads_kv, kvh = t % sh.heads_kv;
      const T* kh = k + b * a.k_stride.batch + kvh * a.k_stride.head;
      const T* vh = v + b * a.v_stride.batch + kvh * a.v_stride.head;
      T* dkh = dk + t * nk_all * d;
      T* dvh = dv + t * nk_all * d;
      const float *kp, *vp;
      float *dk_sum, *dv_sum;
      int64_t ldk, ldv;
      if constexpr (kConvert) {
        float* kf = extra + 3 * qd;
        float* vf = kf + kd;
        rows_to_float(kt, kh, a.k_stride.row, nk_all, d, kf);
        rows_to_float(kt, vh, a.v_stride.row, nk_all, d, vf);
        kp = kf, vp = vf, ldk = d, ldv = d;
        dk_sum = vf + kd, dv_sum = dk_sum + kd;
      } else {
        kp = kh, vp = vh, ldk = a.k_stride.row, ldv = a.v_stride.row;
        dk_sum = dkh, dv_sum = dvh;
      }
      std::fill(dk_sum, dk_sum + nk_all * d, 0.0f);
      std::fill(dv_sum, dv_sum + nk_all * d, 0.0f);

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g, bh = b * sh.heads_q + h;
        const T* qh = q + b * a.q_stride.batch + h * a.q_stride.head;
        const T* doh = dout + b * a.dout_stride.batch + h * a.dout_stride.head;
        const T* oh = out + b * a.out_stride.batch + h * a.out_stride.head;
        T* dqh = dq + bh * nq_all * d;
        const float *qp, *dop;
        float* dq_sum;
        int64_t ldq, lddo;
        if constexpr (kConvert) {
          float* qf = extra;
          float* dof = qf + qd;
          rows_to_float(kt, qh, a.q_stride.row, nq_all, d, qf);
          rows_to_float(kt, doh, a.dout_stride.row, nq_all, d, dof);
          qp = qf, dop = dof, ldq = d, lddo = d;
          dq_sum = dof + qd;
        } else {
          qp = qh, dop = doh, ldq = a.q_stride.row, lddo = a.dout_stride.row;
          dq_sum = dqh;
        }
        std::fill(dq_sum, dq_sum + nq_all * d, 0.0f);
        pack_transposed(qp, ldq, nq_all, d, c, qt, nq_pad);
        pack_transposed(dop, lddo, nq_all, d, 1.0f, dot, nq_pad);
        const float* lse = a.lse + bh * nq_all;
        const float* dlse = a.dlse != nullptr ? a.dlse + bh * nq_all : nullptr;
        for (int64_t i = 0; i < nq_all; ++i) {
          float acc = 0.0f;
          for (int64_t j = 0; j < d; ++j) acc += dop[i * lddo + j] * load(oh + i * a.out_stride.row + j);
          delta[i] = acc - (dlse != nullptr ? dlse[i] : 0.0f);
          lse2[i] = lse[i] == -kInf ? kInf : lse[i] * kLog2e;  // no key seen: P = exp2(-inf) = 0
        }
        std::fill(lse2 + nq_all, lse2 + nq_pad, kInf);
        std::fill(delta + nq_all, delta + nq_pad, 0.0f);

        for (int64_t k0 = 0; k0 < nk_all; k0 += KB) {
          const int64_t nk = std::min(KB, nk_all - k0);
          const float* kj = kp + k0 * ldk;
          const float* vj = vp + k0 * ldv;
          // causal: query i sees key k0 iff i >= k0 - off
          const int64_t first_q = a.causal ? std::max<int64_t>(0, k0 - off) : 0;
          for (int64_t q0 = first_q / QB * QB; q0 < nq_all; q0 += QB) {
            const int64_t nq = std::min(QB, nq_all - q0);
            kt.gemm(nk, nq, d, kj, ldk, 1, qt + q0, nq_pad, s, QB, false);    // S^T
            kt.gemm(nk, nq, d, vj, ldv, 1, dot + q0, nq_pad, dp, QB, false);  // dP^T = V_j dO_i^T
            const TileMask mask{a.causal && k0 + nk - 1 > q0 + off, k0 - q0 - off};
            kt.softmax_bwd(s, dp, nk, nq, mask, lse2 + q0, delta + q0, a.scale);
            kt.gemm(nk, d, nq, s, QB, 1, dop + q0 * lddo, lddo, dv_sum + k0 * d, d, true);  // dV_j += P^T dO_i
            kt.gemm(nk, d, nq, dp, QB, 1, qp + q0 * ldq, ldq, dk_sum + k0 * d, d, true);    // dK_j += dS^T Q_i
            kt.gemm(nq, d, nk, dp, 1, QB, kj, ldk, dq_sum + q0 * d, d, true);               // dQ_i += dS K_j
          }
        }
        store_rows(dq_sum, nq_all * d, dqh);
      }
      store_rows(dk_sum, nk_all * d, dkh);
      store_rows(dv_sum, nk_all * d, dvh);
    }
  }
}

}  // namespace

void attention_fwd(const AttentionFwdArgs& args) {
  const TileKernels kt = tile_kernels(args.isa);
  if (args.dtype != DType::BFloat16) return fwd_typed<float>(args, kt);
  // Blocks of a few queries (decode) take attend_row on fp32 copies; the dot products need pairs.
  if (use_bf16_dot(args.isa, args.shape.head_dim) && args.shape.n_q > kDecodeRows)
    return attention_fwd_bf16_dot(args, kt, bf16_dot_kernels());
  fwd_typed<uint16_t>(args, kt);
}

void attention_bwd(const AttentionBwdArgs& args) {
  const TileKernels kt = tile_kernels(args.isa);
  if (args.dtype != DType::BFloat16) return bwd_typed<float>(args, kt);
  if (use_bf16_dot(args.isa, args.shape.head_dim)) return attention_bwd_bf16_dot(args, kt, bf16_dot_kernels());
  bwd_typed<uint16_t>(args, kt);
}

}  // namespace cpu
}  // namespace fusedlm
