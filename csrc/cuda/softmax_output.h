// The fused part of the linear cross-entropy on CUDA, over one vocabulary slab of logits: all N
// tokens x the columns [col0, col0 + cols) of the V logits, row-major with row stride cols, in the
// input dtype (the GEMM's output, as F.linear gives it). One block per row. Torch-free: raw
// pointers, a cudaStream_t, and the launch error back. csrc/torch/softmax_output_cuda.cpp runs the
// GEMMs (cuBLAS through ATen) and calls these once per slab, slabs in order col0 = 0, cols, ...
//
// Math (same as csrc/cpu/softmax_output.h): c = softcap ? softcap tanh(z / softcap) : z,
// lse = log sum exp(c), loss = (1 - eps)(lse - c_t) + eps (lse - mean c) + z_loss lse^2;
// ignored rows: loss 0; a target outside [0, V) that is not ignore_index is never read (loss NaN,
// gradient 0). softcap <= 0 means none. Arithmetic in float32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace fusedlm {
namespace cuda {

// Running statistics of one token over the slabs seen so far: (max c, sum exp(c - max), sum c,
// c_t once the slab holding t was seen); 4 floats a row.
constexpr int kCrossEntropyStats = 4;

// Forward over one slab: merges the slab's (max, sum exp, sum c, c_t) into each row's stats (the
// slab at col0 == 0 sets them); the last slab (col0 + cols == vocab) writes lse and loss.
cudaError_t cross_entropy_slab_fwd(DType dtype, const void* logits, const int64_t* target, float* stats,
                                   float* loss, float* lse, int64_t rows, int64_t cols, int64_t col0,
                                   int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                                   float softcap, cudaStream_t stream);

// Backward, in place, in the slab's dtype: z := dloss_r * (a p - (1 - eps) onehot(t) - eps / V) *
// softcap'(z), a = 1 + 2 z_loss lse, p = exp(c - lse) from the saved lse (so slabs are independent).
cudaError_t cross_entropy_slab_bwd(DType dtype, void* logits, const int64_t* target, const float* lse,
                                   const float* dloss, int64_t rows, int64_t cols, int64_t col0, int64_t vocab,
                                   int64_t ignore_index, float label_smoothing, float z_loss, float softcap,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedlm
