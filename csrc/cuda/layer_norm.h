// CUDA LayerNorm / RMSNorm kernels, optionally with the residual add before the norm.
// Torch-free: raw pointers, a cudaStream_t, and a cudaError_t back (the launch error, if any).
//
// Shapes (all row-major and contiguous): x, residual, y, h, dy, dh, dx: (M, N);
// weight, bias, dweight, dbias: (N,); mean, rstd: (M,) float32. Element type: `dtype` for
// every (M, N) and (N,) array. The math is in python/fusedlm/ops/layer_norm.py.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace fusedlm {
namespace cuda {

// Forward. residual and bias may be null; h is written only when residual is given
// (h = x + residual rounded to dtype; the statistics are those of the stored h);
// mean is written only when !rms (may be null then).
cudaError_t layer_norm_fwd(DType dtype, const void* x, const void* residual, const void* weight, const void* bias,
                           void* y, void* h, float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms,
                           cudaStream_t stream);

// Float32 scratch that layer_norm_bwd needs: one (N,) partial of dweight (and of dbias) per
// fixed chunk of rows. Depends only on M, N and has_bias.
int64_t layer_norm_bwd_workspace_floats(int64_t M, int64_t N, bool has_bias);

// Backward. dh and dbias may be null (dbias null: no bias gradient); mean is ignored when rms.
// dx = dnorm/dh (+ dh); dweight, dbias are reduced over rows in float32 in a fixed order
// (deterministic, no atomics). workspace: at least layer_norm_bwd_workspace_floats(...) floats.
cudaError_t layer_norm_bwd(DType dtype, const void* dy, const void* dh, const void* h, const void* weight,
                           const float* mean, const float* rstd, void* dx, void* dweight, void* dbias,
                           float* workspace, int64_t workspace_floats, int64_t M, int64_t N, bool rms,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedlm
