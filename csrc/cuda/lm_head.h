// The row pass of lm_head_softmax on CUDA: one block per row of logits. Torch-free: raw pointers,
// a cudaStream_t, and the launch error back. csrc/torch/lm_head_cuda.cpp runs the projection
// (cuBLAS through ATen) and calls this on the same stream. Contract: python/fusedlm/ops/lm_head.py.
//
// logits: (rows, V) of float32, bfloat16 or float16, row r at logits + r * logits_stride elements;
// probs: (rows, V) float32 contiguous, may alias float32 logits (in place, logits_stride == V).
// p_v = exp(z_v / T - m) / sum_u exp(z_u / T - m), m = max_v z_v / T.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedlm {
namespace cuda {

enum class LogitsType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

cudaError_t lm_head_softmax_rows(const void* logits, LogitsType type, int64_t logits_stride, float* probs,
                                 int64_t rows, int64_t vocab, float inv_temperature, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedlm
