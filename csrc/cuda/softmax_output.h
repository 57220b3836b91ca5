// The fused part of the chunked linear cross-entropy on CUDA: one block per row of a float32
// logits chunk. Torch-free: raw pointers, a cudaStream_t, and the launch error back.
// csrc/torch/softmax_output_cuda.cpp runs the GEMMs (cuBLAS through ATen) and calls these.
//
// logits: (rows, V) float32, row-major; target: (rows,) int64; loss, lse, dloss: (rows,) float32.
// Math (same as csrc/cpu/softmax_output.h): c = softcap ? softcap tanh(z / softcap) : z,
// lse = log sum exp(c), loss = (1 - eps)(lse - c_t) + eps (lse - mean c) + z_loss lse^2;
// ignored rows: loss 0; a target outside [0, V) that is not ignore_index is never read (loss NaN,
// gradient 0). softcap <= 0 means none.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fusedlm {
namespace cuda {

// Forward: loss and lse per row; the logits are clobbered (soft-capped in place).
cudaError_t cross_entropy_rows_fwd(float* logits, const int64_t* target, float* loss, float* lse, int64_t rows,
                                   int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                                   float softcap, cudaStream_t stream);

// Backward, in place: logits := dloss_r * (a p - (1 - eps) onehot(t) - eps / V) * softcap'(z),
// a = 1 + 2 z_loss lse, p = exp(c - lse) from the saved lse.
cudaError_t cross_entropy_rows_bwd(float* logits, const int64_t* target, const float* lse, const float* dloss,
                                   int64_t rows, int64_t vocab, int64_t ignore_index, float label_smoothing,
                                   float z_loss, float softcap, cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedlm
