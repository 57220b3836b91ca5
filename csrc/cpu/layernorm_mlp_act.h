// Internal to csrc/cpu/layernorm_mlp*.cpp: the activation math and the row loops of the
// element-wise passes, written once over an ISA class K and included by three files:
// layernorm_mlp.cpp (K = ScalarIsa, V = float), layernorm_mlp_avx512.cpp and
// layernorm_mlp_avx512_bf16.cpp (K = Avx512Isa of layernorm_mlp_avx512_isa.h, V = __m512, 16
// columns per step, the last step masked), which include it under their AVX-512 target pragma.
// Everything here has internal linkage, so the copies never meet.
//
// K provides: V; Mask; W (columns per step); mask(left); load(const T*, Mask) -> V (fp32);
// loadf(const float*, Mask); store(T*, V, Mask) -> V rounded to T; round(const T*, V) -> V
// rounded to T; add_to(float*, V, Mask) (+= into fp32 column sums); prefetch(const void*) (a
// hint, never faults: addresses past the last row are fine). The math functions,
// overloaded on V, must be declared before this header is included (V is no class, so the
// templates find them only by ordinary lookup): vexp, vabs, vrelu, vstep (relu's f', 1 at NaN),
// vsign_of(u, v) (v >= 0 with the sign of u), vrcp(x) (1 / x for x >= 1, within an ulp),
// vclamp_abs(x, c) (x clamped to [-c, c], NaN kept), vat_least(x, c) (max(x, c), NaN kept), and
// those that bf16 results take (their error, below 2^-13 relative, is far under bf16's half ulp
// of 2^-9): vexp2_lowp(x) (2^x), vexp2_lowp_within_126(x) (the same for |x| <= 126 only) and
// vrcp_lowp(x) (1 / x, x >= 1).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu/layer_norm_rows.h"
#include "cpu/layernorm_mlp.h"

namespace fusedlm {
namespace cpu {
namespace mlp {

// Arguments of one pass over `rows` rows, as the drivers hand them to the row loops (each thread a
// contiguous range of rows, its pointers at its first row). bias: fp32 (converted once per call) or
// nullptr; cols = fc_out is the row stride of pre and dpre; act (and dact) rows are h wide.
struct ActRows {
  const void* pre;
  const float* bias;
  void* act;          // fwd: act out; bwd: in d(act), out act
  void* dpre;         // bwd only
  int64_t rows;
  int64_t h;
  int64_t cols;
};

using FwdRowsFn = void (*)(const ActRows&);
using BwdRowsFn = void (*)(const ActRows&, float* cs);

// Rows per partial column sum of the backward pass (act_bwd_rows): the fc-bias gradient is summed
// in partials of kSumRows rows each, which the driver adds in order. A thread's range of rows
// starts at a multiple of kSumRows, so the partials, and the bits of the sum, do not depend on
// the number of threads.
constexpr int64_t kSumRows = 64;

// cs[j - c0] += sum_i x[i, j] over columns [c0, c1) of a (rows, cols) block, in fp32, in an order
// fixed by the rows alone (four at a time; the same bits in every instance and for any thread count).
using SumColsFn = void (*)(const void* x, int64_t rows, int64_t cols, int64_t c0, int64_t c1, float* cs);

// add_rows below: y += bias + res over rows [r0, r1).
using AddRowsFn = void (*)(void* y, const void* res, const float* bias, int64_t cols, int64_t r0, int64_t r1);

#if FUSEDLM_X86
// The AVX-512 instances (layernorm_mlp_avx512.cpp), for T = float and rows::bf16.
template <typename T>
FwdRowsFn avx512_fwd_rows(Activation a);
template <typename T>
BwdRowsFn avx512_bwd_rows(Activation a);
template <typename T>
SumColsFn avx512_sum_cols();
template <typename T>
AddRowsFn avx512_add_rows();
// The bf16 instances with vcvtneps2bf16 (layernorm_mlp_avx512_bf16.cpp), for CPUs with avx512_bf16.
FwdRowsFn avx512_bf16_fwd_rows(Activation a);
BwdRowsFn avx512_bf16_bwd_rows(Activation a);
#endif

namespace {

constexpr float kSqrt1_2 = 0.70710678118654752f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kTanhK = 0.79788456080286536f;        // sqrt(2 / pi)
constexpr float kTanhC = 0.044715f;

// terms()' exp and 1 / x: the exact ones, or the bf16 ones (kLowp; exp in base 2).
template <bool kLowp, class V>
inline __attribute__((always_inline)) V exp_or_exp2_lowp(V x) {
  if constexpr (kLowp) return vexp2_lowp(x);
  else return vexp(x);
}
template <bool kLowp, class V>
inline __attribute__((always_inline)) V rcp_or_rcp_lowp(V x) {
  if constexpr (kLowp) return vrcp_lowp(x);
  else return vrcp(x);
}

// f(u) and f'(u) of the elementwise activation (the gate of the gated ones). With inlining, a
// caller that only uses f drops the derivative's arithmetic. kLowp (bf16 elements): exp and 1 / x
// to about 2^-14 relative (vexp2_lowp, vrcp_lowp) instead of to an ulp: about a quarter fewer vector
// instructions in these compute-bound passes; the fp32 instances keep the exact ones. Either
// way 1 - sigmoid(z) is computed as e sigmoid(z) (e = exp(-z)), free of cancellation as s -> 1.
template <Activation A, bool kLowp, class V>
inline __attribute__((always_inline)) void terms(V u, V* f, V* df) {
  // exp(x) = 2^(x log2 e) on the lowp path, whose callers fold log2 e (kL) into their constants.
  constexpr float kL = kLowp ? 1.44269504088896341f : 1.0f;
  if constexpr (A == Activation::Gelu || A == Activation::Geglu) {
    // Phi(u) = (1 + erf(u / sqrt 2)) / 2; erf by Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7, the
    // same formula as ATen's vectorised erf), whose exp(-z^2) is also phi's exp(-u^2 / 2).
    const V e = exp_or_exp2_lowp<kLowp>(u * u * (-0.5f * kL));
    const V z = vabs(u) * kSqrt1_2;
    const V t = rcp_or_rcp_lowp<kLowp>(1.0f + 0.3275911f * z);
    const V poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const V erf = vsign_of(u, 1.0f - poly * e);
    const V phi_cdf = 0.5f + 0.5f * erf;
    *f = u * phi_cdf;
    *df = phi_cdf + u * e * kInvSqrt2Pi;
  } else if constexpr (A == Activation::GeluTanh) {
    // s = 0.5 (1 + tanh(z / 2)) = sigmoid(z), z = 2 k (u + c u^3): no cancellation near 0, one exp.
    // f' = s + t, t = u s (1 - s) z', z' = 2 k (1 + 3 c u^2), 1 - s = e s for e = exp(-z).
    // z, e and t are taken at u clamped to [-10, 10]: that keeps e = exp(uc (a + b uc^2))
    // (a = -2 k kL, b = c a) within 2^+-126 (the lowp exp needs no clamp of its own) and t free of
    // 0 * inf (u^2 = inf past |u| = 1.8e19); beyond, t is below 1e-30 and s is 1 (u > 10) or
    // s(-10) = 1.2e-38 (u < -10, where the true s is smaller still). f = max(u, -10) s: u s would
    // grow with |u| there (-3.6 at u = -3e38); this is within 1.2e-37 of the true 0.
    constexpr float kA = -2.0f * kTanhK * kL, kB = kTanhC * kA;
    const V uc = vclamp_abs(u, 10.0f);
    const V u2 = uc * uc;
    V e;
    if constexpr (kLowp) e = vexp2_lowp_within_126(uc * (kA + kB * u2));
    else e = vexp(uc * (kA + kB * u2));
    const V s = rcp_or_rcp_lowp<kLowp>(1.0f + e);
    *f = vat_least(u, -10.0f) * s;
    *df = s + uc * (e * s) * s * ((2.0f * kTanhK) + (6.0f * kTanhK * kTanhC) * u2);
  } else if constexpr (A == Activation::Relu) {
    *f = vrelu(u);
    *df = vstep(u);
  } else {  // Silu, Swiglu
    // Taken at max(u, -87): e = exp(-u) stays finite (below 2^126) and s above 1.6e-38, where
    // at smaller u f = u s and f' would grow with |u| from the saturated exp; the result is within
    // 1.4e-36 of the true 0 there.
    const V ul = vat_least(u, -87.0f);
    const V e = exp_or_exp2_lowp<kLowp>(ul * -kL);
    const V s = rcp_or_rcp_lowp<kLowp>(1.0f + e);
    *f = ul * s;
    *df = s * (1.0f + ul * (e * s));  // s (1 + u (1 - s))
  }
}

// body(i0, R) over the rows [0, rows) in groups of R = kRowGroup consecutive rows, then one row at
// a time for the rest; R arrives as a std::integral_constant, so each group's loop over its rows
// unrolls. Four rows give the out-of-order core four independent chains through terms() (one
// row per step was bound by that chain's latency, not by throughput). The loops over a group
// prefetch (K::prefetch) the same columns of the next group's rows: a thread's part of a row is
// a short run (h / threads columns) that the hardware prefetcher alone picks up too late, and the
// (block, h) arrays outgrow the cache. At 4096 x 3072 bf16 (two threads, gelu_tanh) that took the
// forward pass from 3.3-3.7 to 2.0 ms and the backward pass from 5.3-5.9 to 2.7-4.1 ms (the
// backward's range is the machine's load; prefetching two rows or two groups ahead was slower).
constexpr int kRowGroup = 4;

// Prefetch columns [j, j + W) of the rows kRowGroup below these ones of pre (both halves when
// gated) and act, and of dpre unless it is nullptr.
template <class K, bool kGated, typename T>
inline __attribute__((always_inline)) void prefetch_next_group(const ActRows& p, const T* pre, const T* dpre,
                                                               const T* act, int64_t j) {
  const int64_t below = kRowGroup * p.cols;
  K::prefetch(pre + below + j);
  if constexpr (kGated) K::prefetch(pre + below + p.h + j);
  if (dpre != nullptr) {
    K::prefetch(dpre + below + j);
    if constexpr (kGated) K::prefetch(dpre + below + p.h + j);
  }
  K::prefetch(act + kRowGroup * p.h + j);
}

template <typename Body>
inline __attribute__((always_inline)) void for_row_groups(int64_t rows, Body&& body) {
  int64_t i = 0;
  for (; i + kRowGroup <= rows; i += kRowGroup) body(i, std::integral_constant<int, kRowGroup>{});
  for (; i < rows; ++i) body(i, std::integral_constant<int, 1>{});
}

// Forward over every row and column of p: u = pre + bias in fp32, act = f(u) (gated:
// f(u_a) u_b); rows in groups of four (for_row_groups). pre is only read: the forward saves pre_act
// without its bias, and the backward takes f and f' at u rounded to T (the value a GEMM with the
// bias in its epilogue would have stored). Not writing u back saves a third of this pass's memory
// traffic (4096 x 768 x 3072 bf16, two threads, paired with the six GEMMs: forward 1.3 ms faster);
// in bf16 the forward's act and the one the backward recomputes for the proj weight gradient may
// differ in the last bit, each f of the pre-activation to within bf16 rounding.
template <class K, typename T, Activation A>
void act_fwd_rows(const ActRows& p) {
  using V = typename K::V;
  constexpr bool kGated = is_gated(A);
  for_row_groups(p.rows, [&](int64_t i0, auto rows) {
    constexpr int R = decltype(rows)::value;
    for (int64_t j = 0; j < p.h; j += K::W) {
      const auto m = K::mask(p.h - j);
      for (int r = 0; r < R; ++r) {
        const T* pre = static_cast<const T*>(p.pre) + (i0 + r) * p.cols;
        T* act = static_cast<T*>(p.act) + (i0 + r) * p.h;
        if constexpr (R == kRowGroup) prefetch_next_group<K, kGated, T>(p, pre, nullptr, act, j);
        V a = K::load(pre + j, m);
        if (p.bias != nullptr) a = a + K::loadf(p.bias + j, m);
        V f, df;
        terms<A, std::is_same_v<T, rows::bf16>>(a, &f, &df);
        if constexpr (kGated) {
          V b = K::load(pre + p.h + j, m);
          if (p.bias != nullptr) b = b + K::loadf(p.bias + p.h + j, m);
          f = f * b;
        }
        K::store(act + j, f, m);
      }
    }
  });
}

// One step of the backward for R consecutive rows at columns [j, j + W) (mask m): reads pre (+ bias,
// rounded as the forward stored it) and g = d(act); writes act over g and d(pre); returns the
// rows' d(pre) summed in row order in *da_sum (gated: the b half's in *db_sum).
template <class K, typename T, Activation A, int R>
inline __attribute__((always_inline)) void act_bwd_step(const ActRows& p, int64_t i0, int64_t j,
                                                        typename K::Mask m, typename K::V* da_sum,
                                                        typename K::V* db_sum) {
  using V = typename K::V;
  constexpr bool kGated = is_gated(A);
  for (int r = 0; r < R; ++r) {
    const T* pre = static_cast<const T*>(p.pre) + (i0 + r) * p.cols;
    T* dpre = static_cast<T*>(p.dpre) + (i0 + r) * p.cols;
    T* act = static_cast<T*>(p.act) + (i0 + r) * p.h;
    if constexpr (R == kRowGroup) prefetch_next_group<K, kGated, T>(p, pre, dpre, act, j);
    V a = K::load(pre + j, m);
    if (p.bias != nullptr) a = K::round(pre, a + K::loadf(p.bias + j, m));
    const V g = K::load(act + j, m);
    V f, df;
    terms<A, std::is_same_v<T, rows::bf16>>(a, &f, &df);
    V da, db;
    if constexpr (kGated) {
      V b = K::load(pre + p.h + j, m);
      if (p.bias != nullptr) b = K::round(pre, b + K::loadf(p.bias + p.h + j, m));
      K::store(act + j, f * b, m);
      da = g * b * df;
      db = g * f;
      K::store(dpre + j, da, m);
      K::store(dpre + p.h + j, db, m);
    } else {
      K::store(act + j, f, m);
      da = g * df;
      K::store(dpre + j, da, m);
    }
    *da_sum = r == 0 ? da : *da_sum + da;
    if constexpr (kGated) *db_sum = r == 0 ? db : *db_sum + db;
  }
}

// Backward over every row and column of p (act_bwd_step), rows in groups of four
// (for_row_groups): their d(pre) summed in registers, then added to the partial column sums of
// their kSumRows rows when cs is set: partial k, of rows [k kSumRows, (k + 1) kSumRows) of p, at
// cs + k s, s = h (gated: 2h, the b half after the a half), a quarter of the read-modify-writes
// of one row per step. Within a partial the order is fixed by the rows alone. (4096 x 3072 bf16,
// gelu_tanh, two threads: 4.5 ms with one row per step, 2.8 with four.)
// pre and dpre may be one buffer (d(pre) written over a recomputed pre): each step loads pre[j]
// (and pre[h + j]) before it stores dpre[j] (and dpre[h + j]), and no other step or thread touches
// those positions; keep that order, and no __restrict__ on the two.
template <class K, typename T, Activation A>
void act_bwd_rows(const ActRows& p, float* cs) {
  static_assert(kSumRows % kRowGroup == 0, "a row group must not straddle two partial sums");
  using V = typename K::V;
  const int64_t stride = is_gated(A) ? 2 * p.h : p.h;
  for_row_groups(p.rows, [&](int64_t i0, auto rows) {
    constexpr int R = decltype(rows)::value;
    float* const part = cs != nullptr ? cs + (i0 / kSumRows) * stride : nullptr;
    for (int64_t j = 0; j < p.h; j += K::W) {
      const auto m = K::mask(p.h - j);
      V da, db;
      act_bwd_step<K, T, A, R>(p, i0, j, m, &da, &db);
      if (part != nullptr) {
        K::add_to(part + j, da, m);
        if constexpr (is_gated(A)) K::add_to(part + p.h + j, db, m);
      }
    }
  });
}

// Rows in groups of four (for_row_groups), summed in registers before they are added to cs.
template <class K, typename T>
void sum_cols(const void* x, int64_t rows, int64_t cols, int64_t c0, int64_t c1, float* cs) {
  const T* base = static_cast<const T*>(x);
  for_row_groups(rows, [&](int64_t i0, auto group) {
    constexpr int R = decltype(group)::value;
    for (int64_t j = c0; j < c1; j += K::W) {
      const auto m = K::mask(c1 - j);
      if constexpr (R == kRowGroup)
        for (int r = 0; r < R; ++r) K::prefetch(base + (i0 + R + r) * cols + j);
      typename K::V v = K::load(base + i0 * cols + j, m);
      for (int r = 1; r < R; ++r) v = v + K::load(base + (i0 + r) * cols + j, m);
      K::add_to(cs + (j - c0), v, m);
    }
  });
}

// y[i, j] += bias[j] + res[i, j] over rows [r0, r1) of (rows, cols) y and res, in fp32, rounded once
// to T; bias (fp32) and res may each be nullptr.
template <class K, typename T>
void add_rows(void* y, const void* res, const float* bias, int64_t cols, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    T* yr = static_cast<T*>(y) + i * cols;
    const T* rr = res != nullptr ? static_cast<const T*>(res) + i * cols : nullptr;
    for (int64_t j = 0; j < cols; j += K::W) {
      const auto m = K::mask(cols - j);
      typename K::V v = K::load(yr + j, m);
      if (bias != nullptr) v = v + K::loadf(bias + j, m);
      if (rr != nullptr) v = v + K::load(rr + j, m);
      K::store(yr + j, v, m);
    }
  }
}

template <class K, typename T>
FwdRowsFn fwd_rows_fn(Activation a) {
  switch (a) {
    case Activation::Gelu: return act_fwd_rows<K, T, Activation::Gelu>;
    case Activation::GeluTanh: return act_fwd_rows<K, T, Activation::GeluTanh>;
    case Activation::Relu: return act_fwd_rows<K, T, Activation::Relu>;
    case Activation::Silu: return act_fwd_rows<K, T, Activation::Silu>;
    case Activation::Swiglu: return act_fwd_rows<K, T, Activation::Swiglu>;
    case Activation::Geglu: return act_fwd_rows<K, T, Activation::Geglu>;
  }
  return nullptr;
}

template <class K, typename T>
BwdRowsFn bwd_rows_fn(Activation a) {
  switch (a) {
    case Activation::Gelu: return act_bwd_rows<K, T, Activation::Gelu>;
    case Activation::GeluTanh: return act_bwd_rows<K, T, Activation::GeluTanh>;
    case Activation::Relu: return act_bwd_rows<K, T, Activation::Relu>;
    case Activation::Silu: return act_bwd_rows<K, T, Activation::Silu>;
    case Activation::Swiglu: return act_bwd_rows<K, T, Activation::Swiglu>;
    case Activation::Geglu: return act_bwd_rows<K, T, Activation::Geglu>;
  }
  return nullptr;
}

}  // namespace
}  // namespace mlp
}  // namespace cpu
}  // namespace fusedlm
