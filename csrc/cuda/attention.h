// CUDA fused attention (FlashAttention-2), forward and backward. Torch-free: raw pointers, a
// cudaStream_t, and a cudaError_t back (cudaErrorInvalidValue for arguments the kernels do not
// take, else the launch error, if any). csrc/torch/attention_cuda.cpp checks tensors and calls these.
//
// Shapes: q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D) with Hq % Hkv == 0 (query head h reads kv head
// h / (Hq / Hkv), by index); out, dq (B, Hq, Nq, D) and dk, dv (B, Hkv, Nk, D) contiguous;
// lse, dlse (B, Hq, Nq) float32, contiguous, natural log. Inputs q, k, v, dout are read through
// their batch / head / row strides (elements); their head dim has stride 1.
//
//   s = q k^T * scale (+ causal mask: query i sees key j iff j <= i + Nk - Nq, bottom-right aligned)
//   out = softmax(s) v;  lse = log sum_j exp(s_ij);  a row that sees no key: out 0, lse -inf.
//   backward: delta = rowsum(dO * O) - dlse; P = exp(s - lse); dV = P^T dO; dP = dO V^T;
//             dS = P * (dP - delta); dQ = scale dS K; dK = scale dS^T Q  (dK, dV summed over the
//             query heads of each GQA group, in a fixed order: the same bits on every run).
//
// What the kernels take:
//   bfloat16 / float16 (tensor cores, mma.sync m16n8k16, float32 accumulation): head dims of
//     attention_head_dim_supported(); pointers 16-byte aligned and batch / head / row strides
//     multiples of 8 elements (16-byte cp.async rows).
//   float32 (CUDA-core FFMA, no alignment needs): the same head dims.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace fusedlm {
namespace cuda {

struct AttentionDims {
  int64_t batch, heads_q, heads_kv, n_q, n_k, head_dim;
};

// Element strides of a (B, H, N, D) input whose last dim is dense.
struct RowStrides {
  int64_t batch, head, row;
};

// The head dims the kernels are specialised for, as text for error messages ("64, 80, 96, 128").
constexpr int kAttentionHeadDims[] = {64, 80, 96, 128};
constexpr const char* kAttentionHeadDimsText = "64, 80, 96, 128";
inline bool attention_head_dim_supported(int64_t d) {
  for (int h : kAttentionHeadDims) {
    if (d == h) return true;
  }
  return false;
}

// Forward: out and lse.
cudaError_t attention_fwd(DType dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                          const AttentionDims& dims, RowStrides q_strides, RowStrides k_strides, RowStrides v_strides,
                          float scale, bool causal, cudaStream_t stream);

// Float32 scratch attention_bwd needs: delta and lse in base 2 per query row, each (B, Hq) row of
// them padded to a multiple of kAttentionRowPad (rows past Nq hold delta 0 and lse +inf: P = 0).
constexpr int64_t kAttentionRowPad = 128;
inline int64_t attention_padded_rows(int64_t n_q) { return (n_q + kAttentionRowPad - 1) / kAttentionRowPad * kAttentionRowPad; }
inline int64_t attention_bwd_workspace_floats(const AttentionDims& dims) {
  return 2 * dims.batch * dims.heads_q * attention_padded_rows(dims.n_q);
}

// Backward: dq, dk, dv from dout, the forward's inputs, out and lse; dlse may be null (no
// gradient reaches lse). workspace: attention_bwd_workspace_floats(dims) floats.
cudaError_t attention_bwd(DType dtype, const void* dout, const void* q, const void* k, const void* v, const void* out,
                          const float* lse, const float* dlse, void* dq, void* dk, void* dv, float* workspace,
                          const AttentionDims& dims, RowStrides dout_strides, RowStrides q_strides,
                          RowStrides k_strides, RowStrides v_strides, float scale, bool causal, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedlm
