// The element-wise passes of the CPU LayerNorm + feed-forward op, over raw pointers. No torch
// headers: csrc/torch/layernorm_mlp.cpp runs the norm (the layer_norm row kernels), the GEMMs
// (ATen) and these passes over one block of tokens at a time. The math is in
// python/fusedlm/ops/layernorm_mlp.py.
//
// Element type fp32 or bf16 (bf16 carried as its bits); all math in fp32. Activations:
//   gelu       f(u) = u Phi(u)                       f'(u) = Phi(u) + u phi(u)
//   gelu_tanh  f(u) = u s, s = sigmoid(2 k (u + c u^3))     (= 0.5 u (1 + tanh(k (u + c u^3))))
//              f'(u) = s + 2 k u s (1 - s) (1 + 3 c u^2),   k = sqrt(2 / pi), c = 0.044715
//   relu       f(u) = max(u, 0)                      f'(u) = [u > 0]
//   silu       f(u) = u s, s = sigmoid(u)            f'(u) = s (1 + u (1 - s))
//   swiglu     act = silu(a) b, geglu act = gelu(a) b, u = [a | b] (gate a = columns [0, h),
//              up b = columns [h, 2h)): da = g b f'(a), db = g f(a) for g = d(act).
#pragma once

#include <cstdint>

#include "cpu/layer_norm.h"

namespace fusedlm {
namespace cpu {

enum class Activation : int { Gelu = 0, GeluTanh = 1, Relu = 2, Silu = 3, Swiglu = 4, Geglu = 5 };

// The activation named `name` ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"); false
// when the name is unknown.
bool parse_activation(const char* name, Activation* out);
constexpr bool is_gated(Activation a) { return a == Activation::Swiglu || a == Activation::Geglu; }

// One block of rows after the fc GEMM. pre: (rows, fc_out) with fc_out = 2h when gated, else h;
// act: (rows, h). Both row-major and contiguous.
struct MlpActFwdArgs {
  const void* pre;     // in: xn fc_w^T of the block, without the bias (the saved pre_act); only read
  const void* bias;    // (fc_out,) or nullptr
  void* act;           // out: act(pre + bias), pre + bias in fp32 (never rounded here)
  int64_t rows;
  int64_t h;
  Activation activation;
  DType dtype;         // Float32 or BFloat16
  Isa isa;
  int num_threads;
};

// The backward of the activation over one block, in one pass: reads pre and d(act), writes
// d(pre) and the recomputed act (over d(act), which it no longer needs: the proj weight
// gradient is d(y)^T act). Column sums of d(pre) (the fc bias gradient) are added in fp32 to
// dbias_acc, in an order fixed by the rows (four rows summed, then added to a partial sum of 64
// rows; the partials added in order): the same bits for any thread count.
struct MlpActBwdArgs {
  const void* pre;     // (rows, fc_out); may be dpre itself (the backward's recompute path): see act_bwd_rows
  const void* bias;    // (fc_out,) or nullptr: u = pre + bias rounded to the element type (as one
                       // GEMM with the bias would have stored it): pre is saved and recomputed without it
  void* dact_act;      // (rows, h) in: d(act); out: act
  void* dpre;          // (rows, fc_out) out
  float* dbias_acc;    // (fc_out,) fp32, or nullptr
  int64_t rows;
  int64_t h;
  Activation activation;
  DType dtype;
  Isa isa;
  int num_threads;
};

void mlp_act_fwd(const MlpActFwdArgs& args);
void mlp_act_bwd(const MlpActBwdArgs& args);

// acc[j] += sum_i x[i, j] over a (rows, cols) block, in fp32, in an order fixed by the rows (the
// proj bias gradient, sum of d(y)); the same bits for any thread count.
void column_sum_acc(const void* x, int64_t rows, int64_t cols, DType dtype, float* acc, Isa isa, int num_threads);

// y (rows, cols) += bias (cols,) + res (rows, cols), in fp32, rounded once to the element type: the
// proj bias and the residual added to one block's proj GEMM output. bias and res may be nullptr.
struct MlpAddRowsArgs {
  void* y;
  const void* res;
  const void* bias;
  int64_t rows;
  int64_t cols;
  DType dtype;
  Isa isa;
  int num_threads;
};
void mlp_add_rows(const MlpAddRowsArgs& args);

// The bf16 weight-gradient GEMM results x0 (n0 elements) and x1 (n1) of one token block folded
// into their fp32 sums acc0, acc1, in one parallel region. First: acc = x; Middle: acc += x;
// Last: x = bf16(acc + x), the finished gradient written over the block's result. (One block in
// all needs none: its GEMM, fp32 inside, already gives the gradient.)
enum class FoldStep { First, Middle, Last };
void fold_bf16_block(void* x0, float* acc0, int64_t n0, void* x1, float* acc1, int64_t n1, FoldStep step,
                     int num_threads);

// dst (cols, rows) = src^T for a contiguous (rows, cols) src of 2- or 4-byte elements (bits moved
// as they are): a weight gradient computed in the other orientation (layernorm_mlp_bwd) put in place.
void transpose(const void* src, int64_t rows, int64_t cols, int64_t elem_bytes, void* dst, int num_threads);

}  // namespace cpu
}  // namespace fusedlm
