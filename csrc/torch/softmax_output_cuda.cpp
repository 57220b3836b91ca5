// CUDA implementations of fusedlm::linear_cross_entropy_fwd / _bwd (schemas: softmax_output.cpp;
// contract: python/fusedlm/ops/softmax_output.py): the chunk loop of softmax_output_chunks.h, its
// GEMMs on cuBLAS through ATen on the current stream, and the torch-free row kernels of
// csrc/cuda/softmax_output.cu on the same stream.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS headers, which a CUDA
// toolkit without the math libraries lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cuda/softmax_output.h"
#include "softmax_output_chunks.h"

namespace {

using at::Tensor;
namespace kernels = fusedlm::cuda;

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

std::tuple<Tensor, Tensor> linear_cross_entropy_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                         const std::optional<Tensor>& bias, const Tensor& target,
                                                         int64_t ignore_index, double label_smoothing, double z_loss,
                                                         std::optional<double> softcap) {
  constexpr const char* op = "linear_cross_entropy_fwd";
  const c10::cuda::CUDAGuard guard(x.device());
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  return fusedlm::lce::forward(op, x, weight, bias, target, at::kCUDA,
                               [&](Tensor& logits, const Tensor& t, Tensor& loss, Tensor& lse) {
                                 check_launch(op, kernels::cross_entropy_rows_fwd(
                                                      logits.data_ptr<float>(), t.data_ptr<int64_t>(),
                                                      loss.data_ptr<float>(), lse.data_ptr<float>(), logits.size(0),
                                                      logits.size(1), ignore_index,
                                                      static_cast<float>(label_smoothing),
                                                      static_cast<float>(z_loss), cap, stream_of(logits)));
                               });
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd_cuda(
    const Tensor& dloss, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& target, const Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, bool has_bias) {
  constexpr const char* op = "linear_cross_entropy_bwd";
  const c10::cuda::CUDAGuard guard(x.device());
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  return fusedlm::lce::backward(
      op, dloss, x, weight, bias, target, lse, has_bias, at::kCUDA,
      [&](Tensor& logits, const Tensor& t, const Tensor& lse_c, const Tensor& dloss_c) {
        check_launch(op, kernels::cross_entropy_rows_bwd(
                             logits.data_ptr<float>(), t.data_ptr<int64_t>(), lse_c.data_ptr<float>(),
                             dloss_c.data_ptr<float>(), logits.size(0), logits.size(1), ignore_index,
                             static_cast<float>(label_smoothing), static_cast<float>(z_loss), cap,
                             stream_of(logits)));
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlm, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
}
