// Internal to csrc/cpu/attention*.cpp: the fp32 tile kernels the flash drivers (attention.cpp)
// are built from, as a table of function pointers with a portable version (attention.cpp) and an
// AVX-512 one (attention_avx512.cpp), picked at run time.
//
// Score tiles are stored transposed, S^T: one row per key (kKeyBlock rows), one column per query
// (kQueryBlock columns, row stride kQueryBlock). Along a row the queries are the SIMD lanes, so the
// online softmax's per-query max and sum are element-wise across rows (no horizontal reductions),
// and every GEMM of the algorithm is one shape: C (M x N, N dense) (+)= A (M x K, any strides) B
// (K x N, N dense), with A's elements broadcast. Its operands are K or V rows as they lie in
// memory, Q^T / dO^T packed once per query block (forward) or head (backward), and the tiles.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/attention.h"

namespace fusedlm {
namespace cpu {
namespace attn {

constexpr int64_t kQueryBlock = 64;  // queries per tile: 4 AVX-512 vectors of fp32
constexpr int64_t kKeyBlock = 64;    // keys per tile

// C[i][j] (+)= sum_p A[i * a_row + p * a_col] * B[p * ldb + j] for i < m, j < n, p < k.
using GemmFn = void (*)(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                        const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

// Causal mask of a tile whose first key is k0 and first query q0: key row r is hidden from query
// column c iff k0 + r > q0 + c + (Nk - Nq), i.e. c < r + diag with diag = k0 - q0 - (Nk - Nq).
struct TileMask {
  bool on;
  int64_t diag;
};

// One online-softmax step of the forward on the score tile s (nk x nq valid, base-2 units:
// scale * log2(e) is folded into Q^T): m' = max(m, colmax(s)), s := p = exp2(s - m'),
// l := l * exp2(m - m') + colsum(p), and the accumulator rows o[c] (d floats each, row stride d)
// are scaled by exp2(m - m'). Hidden entries become p = 0; a query that has seen no key keeps
// m = -inf and is shifted by 0, so p and the factor are 0, never NaN.
using SoftmaxFwdFn = void (*)(float* s, int64_t nk, int64_t nq, TileMask mask, float* m, float* l, float* o,
                              int64_t d);

// The backward's tile step: s := p = exp2(s - lse2[c]) (lse2 = lse * log2(e), +inf for a query that
// sees no key), dp := ds = p * (dp - delta[c]) * scale; hidden entries give p = ds = 0.
using SoftmaxBwdFn = void (*)(float* s, float* dp, int64_t nk, int64_t nq, TileMask mask, const float* lse2,
                              const float* delta, float scale);

// bf16 bits -> fp32, n values.
using Bf16ToFloatFn = void (*)(const uint16_t* src, float* dst, int64_t n);

// Query blocks of at most this many rows (decode) take attend_row instead of the tiles: with the
// queries as SIMD lanes, a block of one query would use 1 lane in 16.
constexpr int64_t kDecodeRows = 4;

// The forward of one query row q (d floats, scaled by scale * log2(e)) against keys [0, nk): with the
// keys as lanes, s_j = q . k_j (s: nk floats of scratch), m = max s, p = exp2(s - m), l = sum p,
// o = sum_j p_j v_j (not divided by l). nk = 0 gives m = -inf, l = 0, o = 0.
using AttendRowFn = void (*)(const float* q, const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t nk,
                             int64_t d, float* s, float* o, float* m, float* l);

// The same for bf16 K and V (bits), converted to fp32 as they are read.
using AttendRowBf16Fn = void (*)(const float* q, const uint16_t* k, int64_t ldk, const uint16_t* v, int64_t ldv,
                                 int64_t nk, int64_t d, float* s, float* o, float* m, float* l);

struct TileKernels {
  GemmFn gemm;
  SoftmaxFwdFn softmax_fwd;
  SoftmaxBwdFn softmax_bwd;
  Bf16ToFloatFn bf16_to_float;
  AttendRowFn attend_row;            // nullptr: decode blocks take the tile path too
  AttendRowBf16Fn attend_row_bf16;   // nullptr: bf16 decode blocks take attend_row on fp32 copies
};

// bf16 inputs with avx512_bf16 dot products (vdpbf16ps: two bf16 products summed into an fp32 lane).
// Operands hold bf16 pairs along the sum index p, the pair (2p, 2p + 1) adjacent in memory, lower
// address = even index; offsets and strides count 2-byte elements:
//   A: the pair p of row i is at a + i * a_row + p * a_col;
//   B: pair row p is at b + p * ldb and holds (B[2p][j], B[2p + 1][j]) at [2j, 2j + 1], j < n.
// C[i][j] = alpha * sum_p dot2(A pair, B pair) (+ C[i][j] when accumulate), fp32.
using GemmBf16Fn = void (*)(int64_t m, int64_t n, int64_t k2, const uint16_t* a, int64_t a_row, int64_t a_col,
                            const uint16_t* b, int64_t ldb, float* c, int64_t ldc, bool accumulate, float alpha);
// A tile's rows (kQueryBlock fp32 columns) as bf16 rows, rounded to nearest even.
using TileToBf16Fn = void (*)(const float* s, int64_t rows, uint16_t* dst);
// A tile's row pairs interleaved: dst[(r / 2) * 2 kQueryBlock + 2 c + r % 2] = bf16(s[r][c]); with odd
// rows the missing last row is 0. Makes a tile the A operand of a product summed over its rows.
using TileToPairsFn = void (*)(const float* s, int64_t rows, uint16_t* dst);

struct DotKernels {
  GemmBf16Fn gemm;
  TileToBf16Fn to_bf16;
  TileToPairsFn to_pairs;
};

// The bf16 dot-product drivers (attention_bf16.cpp); they need an even head dim (whole pairs).
void attention_fwd_bf16_dot(const AttentionFwdArgs& a, const TileKernels& kt, const DotKernels& dk);
void attention_bwd_bf16_dot(const AttentionBwdArgs& a, const TileKernels& kt, const DotKernels& dk);

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FUSEDLM_ATTN_X86 1
// The AVX-512 kernels (avx512f/bw/vl/dq; call only when the CPU has them).
TileKernels avx512_tile_kernels();
// The avx512_bf16 kernels (call only when the CPU has avx512bf16 too).
DotKernels avx512_bf16_dot_kernels();
#else
#define FUSEDLM_ATTN_X86 0
#endif

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as torch does (NaN stays NaN).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// --- shared by the drivers ---------------------------------------------------------------------

constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// Below this many multiply-adds (B Hq Nq Nk D) a parallel region costs more than it saves.
constexpr double kMinParallelWork = double(1 << 20);

inline int threads_for(int requested, const AttentionShape& s, int64_t tasks) {
  const double work = double(s.batch) * double(s.heads_q) * double(s.n_q) * double(s.n_k) * double(s.head_dim);
  if (requested < 1 || work < kMinParallelWork) return 1;
  return int(std::min<int64_t>(requested, std::max<int64_t>(tasks, 1)));
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Per-thread scratch, allocated before the parallel region (an allocation failure throws there,
// not inside it); each thread's slice starts on a 64-byte boundary.
struct Scratch {
  std::vector<float> storage;
  float* base;
  int64_t per_thread;
  Scratch(int threads, int64_t floats) : storage(size_t(threads) * size_t(round16(floats)) + 16) {
    per_thread = round16(floats);
    const uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
    base = reinterpret_cast<float*>((p + 63) / 64 * 64);
  }
  float* of(int tid) const { return base + tid * per_thread; }
};

}  // namespace attn
}  // namespace cpu
}  // namespace fusedlm
