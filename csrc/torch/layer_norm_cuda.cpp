// CUDA implementations of fusedlm::layer_norm_fwd / layer_norm_bwd (schemas: layer_norm.cpp;
// contract: python/fusedlm/ops/layer_norm.py): check the tensors, allocate the outputs on the
// input's device, launch the torch-free kernels of csrc/cuda on the current stream.
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

#include "cuda/layer_norm.h"
#include "checks.h"

namespace {

using at::Tensor;
namespace kernels = fusedlm::cuda;

using fusedlm::checks::check_arg;
using fusedlm::checks::kernel_dtype;

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                               const std::optional<Tensor>& bias,
                                                               const std::optional<Tensor>& residual, double eps,
                                                               bool rms) {
  constexpr const char* op = "layer_norm_fwd";
  fusedlm::checks::check_matrix(op, "x", x, at::kCUDA);
  const int64_t m = x.size(0), n = x.size(1);
  const kernels::DType dtype = kernel_dtype<kernels::DType>(op, "x", x);
  const at::Device device = x.device();
  check_arg(op, "x", x, device, x.sizes(), x.scalar_type(), "");
  check_arg(op, "weight", weight, device, {n}, x.scalar_type(), " (the columns of x)");
  if (bias.has_value()) check_arg(op, "bias", *bias, device, {n}, x.scalar_type(), " (the columns of x)");
  if (residual.has_value()) {
    check_arg(op, "residual", *residual, device, x.sizes(), x.scalar_type(), " (the shape of x)");
  }
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", std::to_string(eps));

  const c10::cuda::CUDAGuard guard(device);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({m, n}, x.options());
  Tensor h = residual.has_value() ? at::empty({m, n}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : m}, f32);
  Tensor rstd = at::empty({m}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_launch(op, kernels::layer_norm_fwd(dtype, x.data_ptr(), residual.has_value() ? residual->data_ptr() : nullptr,
                                           weight.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr,
                                           y.data_ptr(), residual.has_value() ? h.data_ptr() : nullptr,
                                           rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), m, n,
                                           static_cast<float>(eps), rms, stream));
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& dy, const std::optional<Tensor>& dh,
                                                       const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                       const Tensor& rstd, bool rms, bool has_bias) {
  constexpr const char* op = "layer_norm_bwd";
  fusedlm::checks::check_matrix(op, "h", h, at::kCUDA);
  const int64_t m = h.size(0), n = h.size(1);
  const kernels::DType dtype = kernel_dtype<kernels::DType>(op, "h", h);
  const at::Device device = h.device();
  check_arg(op, "dy", dy, device, h.sizes(), h.scalar_type(), " (the shape of h)");
  if (dh.has_value()) check_arg(op, "dh", *dh, device, h.sizes(), h.scalar_type(), " (the shape of h)");
  check_arg(op, "h", h, device, h.sizes(), h.scalar_type(), "");
  check_arg(op, "weight", weight, device, {n}, h.scalar_type(), " (the columns of h)");
  if (!rms) check_arg(op, "mean", mean, device, {m}, at::kFloat, " (the rows of h)");
  check_arg(op, "rstd", rstd, device, {m}, at::kFloat, " (the rows of h)");

  const c10::cuda::CUDAGuard guard(device);
  Tensor dx = at::empty({m, n}, h.options());
  Tensor dweight = at::empty({n}, weight.options());
  Tensor dbias = at::empty({has_bias ? n : 0}, weight.options());
  // float32 partials of dweight (and dbias), one (N,) row per fixed chunk of rows.
  const int64_t workspace_floats = kernels::layer_norm_bwd_workspace_floats(m, n, has_bias);
  Tensor workspace = at::empty({workspace_floats}, h.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_launch(op, kernels::layer_norm_bwd(dtype, dy.data_ptr(), dh.has_value() ? dh->data_ptr() : nullptr,
                                           h.data_ptr(), weight.data_ptr(), rms ? nullptr : mean.data_ptr<float>(),
                                           rstd.data_ptr<float>(), dx.data_ptr(), dweight.data_ptr(),
                                           has_bias ? dbias.data_ptr() : nullptr, workspace.data_ptr<float>(),
                                           workspace_floats, m, n, rms, stream));
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlm, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}
