// Internal to csrc/cpu/layernorm_mlp*.cpp: the activation math and the column-range loops of the
// element-wise passes, written once over an ISA class K and included by three files:
// layernorm_mlp.cpp (K = ScalarIsa, V = float), layernorm_mlp_avx512.cpp and
// layernorm_mlp_avx512_bf16.cpp (K = Avx512Isa of layernorm_mlp_avx512_isa.h, V = __m512, 16
// columns per step, the last step masked), which include it under their AVX-512 target pragma.
// Everything here has internal linkage, so the copies never meet.
//
// K provides: V; Mask; W (columns per step); mask(left); load(const T*, Mask) -> V (fp32);
// loadf(const float*, Mask); store(T*, V, Mask) -> V rounded to T; round(const T*, V) -> V
// rounded to T; add_to(float*, V, Mask) (+= into fp32 column sums). The math functions,
// overloaded on V, must be declared before this header is included (V is no class, so the
// templates find them only by ordinary lookup): vexp, vabs, vrelu, vstep, vsign_of(u, v) (v >= 0
// with the sign of u), vrcp(x) (1 / x for x >= 1, within an ulp).
#pragma once

#include <cstdint>

#include "cpu/layer_norm_rows.h"
#include "cpu/layernorm_mlp.h"

namespace fusedlm {
namespace cpu {
namespace mlp {

// Arguments of one pass, as the drivers hand them to the column-range loops. bias: fp32 (converted
// once per call) or nullptr; cols = fc_out is the row stride of pre and dpre; act (and dact) rows
// are h wide.
struct ActCols {
  void* pre;
  const float* bias;
  void* act;          // fwd: act out; bwd: in d(act), out act
  void* dpre;         // bwd only
  int64_t rows;
  int64_t h;
  int64_t cols;
};

using FwdColsFn = void (*)(const ActCols&, int64_t c0, int64_t c1);
using BwdColsFn = void (*)(const ActCols&, int64_t c0, int64_t c1, float* cs);

#if FUSEDLM_X86
// The AVX-512 instances (layernorm_mlp_avx512.cpp), for T = float and rows::bf16.
template <typename T>
FwdColsFn avx512_fwd_cols(Activation a);
template <typename T>
BwdColsFn avx512_bwd_cols(Activation a);
// The bf16 instances with vcvtneps2bf16 (layernorm_mlp_avx512_bf16.cpp), for CPUs with avx512_bf16.
FwdColsFn avx512_bf16_fwd_cols(Activation a);
BwdColsFn avx512_bf16_bwd_cols(Activation a);
#endif

namespace {

constexpr float kSqrt1_2 = 0.70710678118654752f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kTanhK = 0.79788456080286536f;        // sqrt(2 / pi)
constexpr float kTanhC = 0.044715f;

// f(u) and f'(u) of the elementwise activation (the gate of the gated ones). With inlining, a
// caller that only uses f drops the derivative's arithmetic.
template <Activation A, class V>
inline __attribute__((always_inline)) void terms(V u, V* f, V* df) {
  if constexpr (A == Activation::Gelu || A == Activation::Geglu) {
    // Phi(u) = (1 + erf(u / sqrt 2)) / 2; erf by Abramowitz-Stegun 7.1.26 (|error| <= 1.5e-7, the
    // same formula as ATen's vectorised erf), whose exp(-z^2) is also phi's exp(-u^2 / 2).
    const V e = vexp(u * u * -0.5f);
    const V z = vabs(u) * kSqrt1_2;
    const V t = vrcp(1.0f + 0.3275911f * z);
    const V poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const V erf = vsign_of(u, 1.0f - poly * e);
    const V phi_cdf = 0.5f + 0.5f * erf;
    *f = u * phi_cdf;
    *df = phi_cdf + u * e * kInvSqrt2Pi;
  } else if constexpr (A == Activation::GeluTanh) {
    // 0.5 (1 + tanh(y)) = sigmoid(2 y): no cancellation near 0, one exp.
    const V u2 = u * u;
    const V s = vrcp(1.0f + vexp(u * (1.0f + kTanhC * u2) * (-2.0f * kTanhK)));
    *f = u * s;
    *df = s + (2.0f * kTanhK) * u * s * (1.0f - s) * (1.0f + (3.0f * kTanhC) * u2);
  } else if constexpr (A == Activation::Relu) {
    *f = vrelu(u);
    *df = vstep(u);
  } else {  // Silu, Swiglu
    const V s = vrcp(1.0f + vexp(-u));
    *f = u * s;
    *df = s * (1.0f + u * (1.0f - s));
  }
}

// Forward over columns [c0, c1) of act for every row: pre (+= bias, stored), act = f(pre)
// (gated: f(a) * b).
template <class K, typename T, Activation A>
void act_fwd_cols(const ActCols& p, int64_t c0, int64_t c1) {
  using V = typename K::V;
  constexpr bool kGated = is_gated(A);
  for (int64_t i = 0; i < p.rows; ++i) {
    T* pre = static_cast<T*>(p.pre) + i * p.cols;
    T* act = static_cast<T*>(p.act) + i * p.h;
    for (int64_t j = c0; j < c1; j += K::W) {
      const auto m = K::mask(c1 - j);
      V a = K::load(pre + j, m);
      if (p.bias != nullptr) a = K::store(pre + j, a + K::loadf(p.bias + j, m), m);
      V f, df;
      terms<A>(a, &f, &df);
      if constexpr (kGated) {
        V b = K::load(pre + p.h + j, m);
        if (p.bias != nullptr) b = K::store(pre + p.h + j, b + K::loadf(p.bias + p.h + j, m), m);
        f = f * b;
      }
      K::store(act + j, f, m);
    }
  }
}

// Backward over columns [c0, c1) of act for every row: reads pre (+ bias, rounded as the forward
// stored it) and g = d(act); writes act over g and d(pre); adds d(pre) to the column sums
// cs[0, c1 - c0) (gated: the b half to cs[c1 - c0, 2 (c1 - c0))) when cs is set.
// pre and dpre may be one buffer (d(pre) written over a recomputed pre): each step loads pre[j]
// (and pre[h + j]) before it stores dpre[j] (and dpre[h + j]), and no other step or thread touches
// those positions; keep that order, and no __restrict__ on the two.
template <class K, typename T, Activation A>
void act_bwd_cols(const ActCols& p, int64_t c0, int64_t c1, float* cs) {
  using V = typename K::V;
  constexpr bool kGated = is_gated(A);
  const int64_t width = c1 - c0;
  for (int64_t i = 0; i < p.rows; ++i) {
    const T* pre = static_cast<const T*>(p.pre) + i * p.cols;
    T* dpre = static_cast<T*>(p.dpre) + i * p.cols;
    T* act = static_cast<T*>(p.act) + i * p.h;
    for (int64_t j = c0; j < c1; j += K::W) {
      const auto m = K::mask(c1 - j);
      V a = K::load(pre + j, m);
      if (p.bias != nullptr) a = K::round(pre, a + K::loadf(p.bias + j, m));
      const V g = K::load(act + j, m);
      V f, df;
      terms<A>(a, &f, &df);
      if constexpr (kGated) {
        V b = K::load(pre + p.h + j, m);
        if (p.bias != nullptr) b = K::round(pre, b + K::loadf(p.bias + p.h + j, m));
        K::store(act + j, f * b, m);
        const V da = g * b * df, db = g * f;
        K::store(dpre + j, da, m);
        K::store(dpre + p.h + j, db, m);
        if (cs != nullptr) {
          K::add_to(cs + (j - c0), da, m);
          K::add_to(cs + width + (j - c0), db, m);
        }
      } else {
        K::store(act + j, f, m);
        const V da = g * df;
        K::store(dpre + j, da, m);
        if (cs != nullptr) K::add_to(cs + (j - c0), da, m);
      }
    }
  }
}

template <class K, typename T>
FwdColsFn fwd_cols_fn(Activation a) {
  switch (a) {
    case Activation::Gelu: return act_fwd_cols<K, T, Activation::Gelu>;
    case Activation::GeluTanh: return act_fwd_cols<K, T, Activation::GeluTanh>;
    case Activation::Relu: return act_fwd_cols<K, T, Activation::Relu>;
    case Activation::Silu: return act_fwd_cols<K, T, Activation::Silu>;
    case Activation::Swiglu: return act_fwd_cols<K, T, Activation::Swiglu>;
    case Activation::Geglu: return act_fwd_cols<K, T, Activation::Geglu>;
  }
  return nullptr;
}

template <class K, typename T>
BwdColsFn bwd_cols_fn(Activation a) {
  switch (a) {
    case Activation::Gelu: return act_bwd_cols<K, T, Activation::Gelu>;
    case Activation::GeluTanh: return act_bwd_cols<K, T, Activation::GeluTanh>;
    case Activation::Relu: return act_bwd_cols<K, T, Activation::Relu>;
    case Activation::Silu: return act_bwd_cols<K, T, Activation::Silu>;
    case Activation::Swiglu: return act_bwd_cols<K, T, Activation::Swiglu>;
    case Activation::Geglu: return act_bwd_cols<K, T, Activation::Geglu>;
  }
  return nullptr;
}

}  // namespace
}  // namespace mlp
}  // namespace cpu
}  // namespace fusedlm
