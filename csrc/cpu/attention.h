// Flash attention forward and backward on the CPU, over raw pointers (no torch headers):
// csrc/torch/attention.cpp checks tensors, allocates and calls these. The op contract is in
// python/fusedlm/ops/attention.py; the algorithm and its memory traffic in attention.cpp.
//
// q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D), Hq % Hkv == 0: query head h reads kv head h / (Hq / Hkv).
// Inputs are read through their strides (batch, head, row; the head dim must be dense), outputs are
// contiguous. Elements are fp32 or bf16 (bf16 as its raw bits); sums, scores and softmax statistics are
// fp32 (bf16 with avx512_bf16 also rounds P and dS to bf16 for their products, attention_bf16.cpp). Any D >= 1,
// any Nq, Nk >= 0. causal: query i sees key j iff j <= i + Nk - Nq (bottom-right aligned); a query
// that sees no key gets out = 0 and lse = -inf.
#pragma once

#include <cstdint>

#include "cpu/layer_norm.h"  // DType, Isa, select_isa (FUSEDLM_CPU_ISA)

namespace fusedlm {
namespace cpu {

// Element strides of a (B, H, N, D) tensor whose last dimension is dense.
struct AttnStrides {
  int64_t batch, head, row;
};

struct AttentionShape {
  int64_t batch, heads_q, heads_kv, n_q, n_k, head_dim;
};

struct AttentionFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  AttnStrides q_stride, k_stride, v_stride;
  void* out;   // (B, Hq, Nq, D) contiguous, q's dtype
  float* lse;  // (B, Hq, Nq) contiguous, natural log
  AttentionShape shape;
  bool causal;
  float scale;
  DType dtype;  // Float32 or BFloat16
  Isa isa;
  int num_threads;
};

struct AttentionBwdArgs {
  const void* dout;  // (B, Hq, Nq, D)
  const void* q;
  const void* k;
  const void* v;
  const void* out;  // the forward's output
  AttnStrides dout_stride, q_stride, k_stride, v_stride, out_stride;
  const float* lse;   // (B, Hq, Nq) contiguous
  const float* dlse;  // (B, Hq, Nq) contiguous gradient of lse, or nullptr
  void* dq;           // (B, Hq, Nq, D) contiguous out
  void* dk;           // (B, Hkv, Nk, D) contiguous out, summed over the query heads of a group
  void* dv;
  AttentionShape shape;
  bool causal;
  float scale;
  DType dtype;
  Isa isa;
  int num_threads;
};

void attention_fwd(const AttentionFwdArgs& args);

// Deterministic: one thread owns a (batch, kv head) and sums every gradient in a fixed order, so
// the same inputs give the same bits for any num_threads.
void attention_bwd(const AttentionBwdArgs& args);

}  // namespace cpu
}  // namespace fusedlm
