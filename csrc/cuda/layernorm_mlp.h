// CUDA element-wise kernels of the LayerNorm + feed-forward op. Torch-free: raw pointers, a
// cudaStream_t, and the launch error back. csrc/torch/layernorm_mlp_cuda.cpp runs the norm (the
// layer_norm kernels), the GEMMs (cuBLAS through ATen) and these per block of tokens.
//
// Shapes (row-major, contiguous): pre, dpre (rows, fc_out) with fc_out = 2h for the gated
// activations (gate a = columns [0, h), up b = [h, 2h)), else h; act, dact (rows, h). Element
// type `dtype` everywhere except the float32 sums; all math in float32. f and f' of each
// activation: csrc/cpu/layernorm_mlp.h (the same formulas, with erff / expf).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/layer_norm.h"

namespace fusedlm {
namespace cuda {

// The order of fusedlm::layernorm_mlp::kActivations (csrc/torch/layernorm_mlp_args.h).
enum class Activation : int { Gelu = 0, GeluTanh = 1, Relu = 2, Silu = 3, Swiglu = 4, Geglu = 5 };

// Rows per partial sum of the column reductions: a (ceil(rows / kSumRows), cols) float32 buffer of
// partial sums, reduced in chunk order (deterministic, no atomics).
constexpr int64_t kSumRows = 64;
inline int64_t sum_chunks(int64_t rows) { return (rows + kSumRows - 1) / kSumRows; }

// act = f(pre) (gated: f(a) * b); pre holds the fc bias already (added in the fc GEMM).
cudaError_t mlp_act_fwd(DType dtype, Activation activation, const void* pre, void* act, int64_t rows, int64_t h,
                        cudaStream_t stream);

// Reads pre and d(act) from dact_act; writes d(pre) and act (over d(act)). dbias_partial
// (sum_chunks(rows) x fc_out floats, or null): the column sums of d(pre) per chunk of kSumRows rows.
cudaError_t mlp_act_bwd(DType dtype, Activation activation, const void* pre, void* dact_act, void* dpre,
                        float* dbias_partial, int64_t rows, int64_t h, cudaStream_t stream);

// partial[c, j] = sum of x[i, j] over the rows i of chunk c (sum_chunks(rows) x cols floats).
cudaError_t column_sum_partials(DType dtype, const void* x, float* partial, int64_t rows, int64_t cols,
                                cudaStream_t stream);

// acc[j] += sum over c = 0, 1, ... of partial[c, j], in that order.
cudaError_t reduce_partials(const float* partial, int64_t chunks, int64_t cols, float* acc, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedlm
