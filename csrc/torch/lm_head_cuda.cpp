// CUDA implementation of fusedlm::lm_head_softmax (schema: lm_head.cpp; contract:
// python/fusedlm/ops/lm_head.py): the driver of lm_head_chunks.h, its GEMM on cuBLAS through ATen
// on the current stream, and the torch-free row kernel of csrc/cuda/lm_head.cu on the same stream.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS headers, which a CUDA
// toolkit without the math libraries lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/lm_head.h"
#include "lm_head_chunks.h"

namespace {

using at::Tensor;
namespace kernels = fusedlm::cuda;

// The 16-bit path's logits buffer: 256 MiB, 1046 rows at V = 128256. Each chunk's GEMM streams all
// of W (500 MiB at 128256 x 2048 in bf16), so on a GPU the chunks must be long for the GEMM to stay
// compute-bound; beside the (N, V) float32 output (4 V bytes a row) the buffer is at most half.
constexpr int64_t kCudaChunkBytes = int64_t(256) << 20;

kernels::LogitsType logits_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return kernels::LogitsType::BFloat16;
    case at::kHalf:
      return kernels::LogitsType::Float16;
    default:
      return kernels::LogitsType::Float32;
  }
}

Tensor lm_head_softmax_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            double temperature) {
  constexpr const char* op = "lm_head_softmax";
  const c10::cuda::CUDAGuard guard(x.device());
  return fusedlm::lm_head::forward(
      op, x, weight, bias, temperature, at::kCUDA, /*allow_half=*/true, kCudaChunkBytes,
      [&](const Tensor& logits, Tensor& probs, float inv_t) {
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(probs.device().index()).stream();
        const cudaError_t err =
            kernels::lm_head_softmax_rows(logits.data_ptr(), logits_type(logits), logits.stride(0),
                                          probs.data_ptr<float>(), probs.size(0), probs.size(1), inv_t, stream);
        TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
                    cudaGetErrorString(err), ")");
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlm, CUDA, m) { m.impl("lm_head_softmax", &lm_head_softmax_cuda); }
