// The fusedlm::layer_norm_fwd / layer_norm_bwd schemas (the CUDA impl in layer_norm_cuda.cpp
// registers against these) and their CPU implementations: check the tensors, allocate the
// outputs, call the torch-free kernels of csrc/cpu/layer_norm.cpp. The op contract is in
// python/fusedlm/ops/layer_norm.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/layer_norm.h"
#include "checks.h"

namespace {

using at::Tensor;
namespace cpu = fusedlm::cpu;
using fusedlm::checks::check_matrix;
using fusedlm::checks::kernel_dtype;

// A CPU, contiguous tensor of exactly `sizes` and `dtype`.
void check_arg(const char* op, const char* name, const Tensor& t, at::IntArrayRef sizes, at::ScalarType dtype,
               const char* what) {
  fusedlm::checks::check_arg(op, name, t, at::Device(at::kCPU), sizes, dtype, what);
}

cpu::Isa kernel_isa(const char* op) {
  cpu::Isa isa;
  const char* error = nullptr;
  TORCH_CHECK(cpu::select_isa(&isa, &error), op, ": ", error);
  return isa;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                              const std::optional<Tensor>& bias,
                                                              const std::optional<Tensor>& residual, double eps,
                                                              bool rms) {
  constexpr const char* op = "layer_norm_fwd";
  check_matrix(op, "x", x, at::kCPU);
  const int64_t m = x.size(0), n = x.size(1);
  const cpu::DType dtype = kernel_dtype<cpu::DType>(op, "x", x);
  check_arg(op, "x", x, x.sizes(), x.scalar_type(), "");
  check_arg(op, "weight", weight, {n}, x.scalar_type(), " (the columns of x)");
  if (bias.has_value()) check_arg(op, "bias", *bias, {n}, x.scalar_type(), " (the columns of x)");
  if (residual.has_value()) check_arg(op, "residual", *residual, x.sizes(), x.scalar_type(), " (the shape of x)");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", std::to_string(eps));

  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({m, n}, x.options());
  Tensor h = residual.has_value() ? at::empty({m, n}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({rms ? 0 : m}, f32);
  Tensor rstd = at::empty({m}, f32);

  cpu::LayerNormFwdArgs args{};
  args.x = x.data_ptr();
  args.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  args.weight = weight.data_ptr();
  args.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.h = residual.has_value() ? h.data_ptr() : nullptr;
  args.mean = rms ? nullptr : mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.rows = m;
  args.cols = n;
  args.eps = static_cast<float>(eps);
  args.rms = rms;
  args.dtype = dtype;
  args.isa = kernel_isa(op);
  args.num_threads = at::get_num_threads();
  cpu::layer_norm_fwd(args);
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cpu(const Tensor& dy, const std::optional<Tensor>& dh,
                                                      const Tensor& h, const Tensor& weight, const Tensor& mean,
                                                      const Tensor& rstd, bool rms, bool has_bias) {
  constexpr const char* op = "layer_norm_bwd";
  check_matrix(op, "h", h, at::kCPU);
  const int64_t m = h.size(0), n = h.size(1);
  const cpu::DType dtype = kernel_dtype<cpu::DType>(op, "h", h);
  check_arg(op, "h", h, h.sizes(), h.scalar_type(), "");
  check_arg(op, "dy", dy, h.sizes(), h.scalar_type(), " (the shape of h)");
  if (dh.has_value()) check_arg(op, "dh", *dh, h.sizes(), h.scalar_type(), " (the shape of h)");
  check_arg(op, "weight", weight, {n}, h.scalar_type(), " (the columns of h)");
  if (!rms) check_arg(op, "mean", mean, {m}, at::kFloat, " (the rows of h)");
  check_arg(op, "rstd", rstd, {m}, at::kFloat, " (the rows of h)");

  Tensor dx = at::empty({m, n}, h.options());
  Tensor dweight = at::empty({n}, weight.options());
  Tensor dbias = at::empty({has_bias ? n : 0}, weight.options());
  // fp32 partial sums of dweight/dbias per row chunk (a few hundred KiB for 8192 x 768).
  Tensor workspace = at::empty({cpu::layer_norm_bwd_workspace_floats(m, n)}, h.options().dtype(at::kFloat));

  cpu::LayerNormBwdArgs args{};
  args.dy = dy.data_ptr();
  args.dh = dh.has_value() ? dh->data_ptr() : nullptr;
  args.h = h.data_ptr();
  args.weight = weight.data_ptr();
  args.mean = rms ? nullptr : mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.dx = dx.data_ptr();
  args.dweight = dweight.data_ptr();
  args.dbias = has_bias ? dbias.data_ptr() : nullptr;
  args.workspace = workspace.data_ptr<float>();
  args.rows = m;
  args.cols = n;
  args.rms = rms;
  args.dtype = dtype;
  args.isa = kernel_isa(op);
  args.num_threads = at::get_num_threads();
  cpu::layer_norm_bwd(args);
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedlm, m) {
  m.def(
      "layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps, bool rms) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor mean, Tensor rstd, bool rms, "
      "bool has_bias) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(fusedlm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cpu);
}
