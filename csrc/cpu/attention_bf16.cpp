// Flash attention drivers for bf16 inputs on CPUs with avx512_bf16: the algorithm of attention.cpp
// (same tasks, tiles, online softmax and summation order), with every GEMM on bf16 pairs through
// vdpbf16ps (attention_avx512_bf16.cpp) instead of fp32 FMAs on converted copies.
//
// What is rounded to bf16 beyond the inputs: P before P V and P^T dO, and dS before dS^T Q and dS K
// (as FlashAttention does on GPUs); scores, softmax statistics and every sum stay fp32. The scale
// c = scale * log2(e) multiplies the fp32 scores (alpha of the GEMM) rather than Q, which stays exact.
//
// Operand layouts (pairs along the sum index, see attention_tiles.h):
//   S^T = K Q^T      A: K rows as they lie (pairs along d);  B: Q^T pair rows (d/2 x 2 queries)
//   O  += P V        A: P^T tile as row pairs (tile_to_pairs); B: V pair rows (keys/2 x 2 d)
//   dP^T = V dO^T    A: V rows;  B: dO^T pair rows
//   dV += P^T dO     A: P^T tile in bf16 (pairs along queries);  B: dO pair rows (queries/2 x 2 d)
//   dK += dS^T Q     A: dS^T tile in bf16;  B: Q pair rows
//   dQ += dS K       A: dS^T tile as row pairs;  B: K pair rows (keys/2 x 2 d)
// Packing is O(N D) per head (V's pairs once per thread and kv head in the forward); odd counts of
// queries or keys pad the last pair with 0 on both sides, so nothing outside the inputs is read.
#include <algorithm>
#include <cmath>

#include "cpu/attention_tiles.h"

namespace fusedlm {
namespace cpu {
namespace attn {
namespace {

constexpr int64_t QB = kQueryBlock, KB = kKeyBlock;

// Floats that hold n 2-byte values, rounded up to 64 bytes.
int64_t floats_for_u16(int64_t n) { return round16((n + 1) / 2); }

// Rows [r0, r1) of `rows` rows (row stride ld, r0 even) as pair rows: dst[(r / 2) * 2d + 2e + r % 2]
// = src[r][e]; the partner of the last row of an odd count is 0.
void pack_row_pairs(const uint16_t* src, int64_t ld, int64_t r0, int64_t r1, int64_t rows, int64_t d,
                    uint16_t* dst) {
  for (int64_t r = r0; r < r1; r += 2) {
    uint16_t* out = dst + r * d;  // pair row r / 2 starts at (r / 2) * 2d
    const uint16_t* a = src + r * ld;
    const uint16_t* b = r + 1 < rows ? src + (r + 1) * ld : nullptr;
    for (int64_t e = 0; e < d; ++e) {
      out[2 * e] = a[e];
      out[2 * e + 1] = b != nullptr ? b[e] : uint16_t(0);
    }
  }
}

// rows x d (row stride ld) as d/2 pair rows of `cols` columns: dst[(e / 2) * 2 cols + 2 i + e % 2] = src[i][e].
void pack_transposed_pairs(const uint16_t* src, int64_t ld, int64_t rows, int64_t d, int64_t cols, uint16_t* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t e = 0; e < d; ++e) dst[(e / 2) * 2 * cols + 2 * i + (e & 1)] = src[i * ld + e];
}

}  // namespace

void attention_fwd_bf16_dot(const AttentionFwdArgs& a, const TileKernels& kt, const DotKernels& dk) {
  const AttentionShape& sh = a.shape;
  const int64_t nq_all = sh.n_q, nk_all = sh.n_k, d = sh.head_dim;
  const int64_t group = sh.heads_q / sh.heads_kv, off = nk_all - nq_all;
  const int64_t qblocks = (nq_all + QB - 1) / QB;
  const int64_t tasks = sh.batch * sh.heads_q * qblocks;
  const float c = a.scale * kLog2e;
  const uint16_t* q = static_cast<const uint16_t*>(a.q);
  const uint16_t* k = static_cast<const uint16_t*>(a.k);
  const uint16_t* v = static_cast<const uint16_t*>(a.v);
  uint16_t* out = static_cast<uint16_t*>(a.out);

  const int64_t f_q2 = floats_for_u16(d * QB), f_o = round16(QB * d), f_s = KB * QB;
  const int64_t f_p = floats_for_u16(KB * QB), f_v2 = floats_for_u16((nk_all + 1) * d);
  const int nt = threads_for(a.num_threads, sh, tasks);
  const Scratch scratch(nt, f_q2 + f_o + f_s + f_p + 2 * QB + f_v2);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    uint16_t* q2 = reinterpret_cast<uint16_t*>(scratch.of(thread_id()));
    float* o = reinterpret_cast<float*>(q2) + f_q2;
    float* s = o + f_o;
    uint16_t* pp = reinterpret_cast<uint16_t*>(s + f_s);
    float* m = reinterpret_cast<float*>(pp) + f_p;
    float* l = m + QB;
    uint16_t* v2 = reinterpret_cast<uint16_t*>(l + QB);  // V pair rows of the cached kv head
    int64_t cached_head = -1, cached_rows = 0;

#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bh = t / qblocks, qb = qblocks - 1 - t % qblocks;
      const int64_t b = bh / sh.heads_q, h = bh % sh.heads_q, kvh = h / group;
      const int64_t q0 = qb * QB, nq = std::min(QB, nq_all - q0);
      pack_transposed_pairs(q + b * a.q_stride.batch + h * a.q_stride.head + q0 * a.q_stride.row, a.q_stride.row, nq,
                            d, QB, q2);
      std::fill(m, m + QB, -kInf);
      std::fill(l, l + QB, 0.0f);
      std::fill(o, o + nq * d, 0.0f);
      const int64_t k_end = a.causal ? std::clamp<int64_t>(q0 + nq + off, 0, nk_all) : nk_all;
      const uint16_t* kh = k + b * a.k_stride.batch + kvh * a.k_stride.head;
      const int64_t ldk = a.k_stride.row;
      const int64_t head = b * sh.heads_kv + kvh;
      if (head != cached_head) cached_head = head, cached_rows = 0;
      if (k_end > cached_rows) {  // whole key blocks, so that a later extension starts on a pair
        const int64_t r1 = std::min(nk_all, (k_end + KB - 1) / KB * KB);
        pack_row_pairs(v + b * a.v_stride.batch + kvh * a.v_stride.head, a.v_stride.row, cached_rows, r1, nk_all, d,
                       v2);
        cached_rows = r1;
      }

      for (int64_t k0 = 0; k0 < k_end; k0 += KB) {
        const int64_t nk = std::min(KB, k_end - k0);
        dk.gemm(nk, nq, d / 2, kh + k0 * ldk, ldk, 2, q2, 2 * QB, s, QB, false, c);  // S^T = c K_j Q^T
        const TileMask mask{a.causal && k0 + nk - 1 > q0 + off, k0 - q0 - off};
        kt.softmax_fwd(s, nk, nq, mask, m, l, o, d);
        dk.to_pairs(s, nk, pp);
        dk.gemm(nq, d, (nk + 1) / 2, pp, 2, 2 * QB, v2 + k0 * d, 2 * d, o, d, true, 1.0f);  // O += P V_j
      }

      uint16_t* orow = out + (bh * nq_all + q0) * d;
      float* lse = a.lse + bh * nq_all + q0;
      for (int64_t i = 0; i < nq; ++i) {
        const bool seen = l[i] > 0.0f;
        const float inv = seen ? 1.0f / l[i] : 0.0f;
        for (int64_t j = 0; j < d; ++j) orow[i * d + j] = float_to_bf16_bits(o[i * d + j] * inv);
        lse[i] = seen ? (m[i] + std::log2(l[i])) * kLn2 : -kInf;
      }
    }
  }
}

void attention_bwd_bf16_dot(const AttentionBwdArgs& a, const TileKernels& kt, const DotKernels& dk) {
  const AttentionShape& sh = a.shape;
  const int64_t nq_all = sh.n_q, nk_all = sh.n_k, d = sh.head_dim;
  const int64_t group = sh.heads_q / sh.heads_kv, off = nk_all - nq_all;
  const int64_t tasks = sh.batch * sh.heads_kv;
  const float c = a.scale * kLog2e;
  const uint16_t* dout = static_cast<const uint16_t*>(a.dout);
  const uint16_t* q = static_cast<const uint16_t*>(a.q);
  const uint16_t* k = static_cast<const uint16_t*>(a.k);
  const uint16_t* v = static_cast<const uint16_t*>(a.v);
  const uint16_t* out = static_cast<const uint16_t*>(a.out);

  const int64_t nq_pad = round16(nq_all);
  const int64_t f_t = floats_for_u16(d * nq_pad);                 // Q^T or dO^T pair rows
  const int64_t f_qp = floats_for_u16((nq_all + 1) * d);          // Q or dO pair rows
  const int64_t f_kp = floats_for_u16((nk_all + 1) * d);          // K pair rows
  const int64_t f_tile16 = floats_for_u16(KB * QB);
  const int64_t f_qd = round16(nq_all * d), f_kd = round16(nk_all * d);
  const int64_t floats = 2 * f_t + 2 * f_qp + f_kp + 2 * nq_pad + 2 * KB * QB + 3 * f_tile16 + f_qd + 2 * f_kd;
  const int nt = threads_for(a.num_threads, sh, tasks);
  const Scratch scratch(nt, floats);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* w = scratch.of(thread_id());
    auto take = [&w](int64_t n) {
      float* p = w;
      w += n;
      return p;
    };
    uint16_t* qt2 = reinterpret_cast<uint16_t*>(take(f_t));
    uint16_t* dot2 = reinterpret_cast<uint16_t*>(take(f_t));
    uint16_t* qp = reinterpret_cast<uint16_t*>(take(f_qp));
    uint16_t* dop = reinterpret_cast<uint16_t*>(take(f_qp));
    uint16_t* kp = reinterpret_cast<uint16_t*>(take(f_kp));
    float* lse2 = take(nq_pad);
    float* delta = take(nq_pad);
    float* s = take(KB * QB);
    float* dp = take(KB * QB);
    uint16_t* p16 = reinterpret_cast<uint16_t*>(take(f_tile16));
    uint16_t* ds16 = reinterpret_cast<uint16_t*>(take(f_tile16));
    uint16_t* dsp = reinterpret_cast<uint16_t*>(take(f_tile16));
    float* dq_sum = take(f_qd);
    float* dk_sum = take(f_kd);
    float* dv_sum = take(f_kd);

#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / sh.heads_kv, kvh = t % sh.heads_kv;
      const uint16_t* kh = k + b * a.k_stride.batch + kvh * a.k_stride.head;
      const uint16_t* vh = v + b * a.v_stride.batch + kvh * a.v_stride.head;
      const int64_t ldk = a.k_stride.row, ldv = a.v_stride.row;
      pack_row_pairs(kh, ldk, 0, nk_all, nk_all, d, kp);
      std::fill(dk_sum, dk_sum + nk_all * d, 0.0f);
      std::fill(dv_sum, dv_sum + nk_all * d, 0.0f);

      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kvh * group + g, bh = b * sh.heads_q + h;
        const uint16_t* qh = q + b * a.q_stride.batch + h * a.q_stride.head;
        const uint16_t* doh = dout + b * a.dout_stride.batch + h * a.dout_stride.head;
        const uint16_t* oh = out + b * a.out_stride.batch + h * a.out_stride.head;
        const int64_t ldq = a.q_stride.row, lddo = a.dout_stride.row;
        pack_transposed_pairs(qh, ldq, nq_all, d, nq_pad, qt2);
        pack_transposed_pairs(doh, lddo, nq_all, d, nq_pad, dot2);
        pack_row_pairs(qh, ldq, 0, nq_all, nq_all, d, qp);
        pack_row_pairs(doh, lddo, 0, nq_all, nq_all, d, dop);
        std::fill(dq_sum, dq_sum + nq_all * d, 0.0f);
        const float* lse = a.lse + bh * nq_all;
        const float* dlse = a.dlse != nullptr ? a.dlse + bh * nq_all : nullptr;
        for (int64_t i = 0; i < nq_all; ++i) {
          float acc = 0.0f;
          for (int64_t j = 0; j < d; ++j)
            acc += bf16_bits_to_float(doh[i * lddo + j]) * bf16_bits_to_float(oh[i * a.out_stride.row + j]);
          delta[i] = acc - (dlse != nullptr ? dlse[i] : 0.0f);
          lse2[i] = lse[i] == -kInf ? kInf : lse[i] * kLog2e;
        }
        std::fill(lse2 + nq_all, lse2 + nq_pad, kInf);
        std::fill(delta + nq_all, delta + nq_pad, 0.0f);

        for (int64_t k0 = 0; k0 < nk_all; k0 += KB) {
          const int64_t nk = std::min(KB, nk_all - k0);
          const int64_t first_q = a.causal ? std::max<int64_t>(0, k0 - off) : 0;
          for (int64_t q0 = first_q / QB * QB; q0 < nq_all; q0 += QB) {
            const int64_t nq = std::min(QB, nq_all - q0);
            dk.gemm(nk, nq, d / 2, kh + k0 * ldk, ldk, 2, qt2 + 2 * q0, 2 * nq_pad, s, QB, false, c);
            dk.gemm(nk, nq, d / 2, vh + k0 * ldv, ldv, 2, dot2 + 2 * q0, 2 * nq_pad, dp, QB, false, 1.0f);
            const TileMask mask{a.causal && k0 + nk - 1 > q0 + off, k0 - q0 - off};
            kt.softmax_bwd(s, dp, nk, nq, mask, lse2 + q0, delta + q0, a.scale);  // columns >= nq -> 0
            dk.to_bf16(s, nk, p16);
            dk.to_bf16(dp, nk, ds16);
            dk.to_pairs(dp, nk, dsp);
            const int64_t nq2 = (nq + 1) / 2;
            dk.gemm(nk, d, nq2, p16, QB, 2, dop + q0 * d, 2 * d, dv_sum + k0 * d, d, true, 1.0f);  // dV += P^T dO
            dk.gemm(nk, d, nq2, ds16, QB, 2, qp + q0 * d, 2 * d, dk_sum + k0 * d, d, true, 1.0f);  // dK += dS^T Q
            dk.gemm(nq, d, (nk + 1) / 2, dsp, 2, 2 * QB, kp + k0 * d, 2 * d, dq_sum + q0 * d, d, true, 1.0f);
          }
        }
        uint16_t* dqh = static_cast<uint16_t*>(a.dq) + bh * nq_all * d;
        for (int64_t j = 0; j < nq_all * d; ++j) dqh[j] = float_to_bf16_bits(dq_sum[j]);
      }
      uint16_t* dkh = static_cast<uint16_t*>(a.dk) + t * nk_all * d;
      uint16_t* dvh = static_cast<uint16_t*>(a.dv) + t * nk_all * d;
      for (int64_t j = 0; j < nk_all * d; ++j) dkh[j] = float_to_bf16_bits(dk_sum[j]);
      for (int64_t j = 0; j < nk_all * d; ++j) dvh[j] = float_to_bf16_bits(dv_sum[j]);
    }
  }
}

}  // namespace attn
}  // namespace cpu
}  // namespace fusedlm
