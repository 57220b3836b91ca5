// The argument checks of fusedlm::linear_cross_entropy_fwd / _bwd shared by the CPU binding
// (softmax_output.cpp) and the CUDA binding (softmax_output_cuda.cpp). Contract and math:
// python/fusedlm/ops/softmax_output.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

#include "checks.h"

namespace fusedlm {
namespace lce {

using at::Tensor;

struct Problem {
  int64_t n, d, vocab;
  bool low_precision;
};

inline Problem check_inputs(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                            const Tensor& target, at::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ", at::Device(device_type),
              " tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, d), got shape ", checks::shape_str(x.sizes()));
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (V, d), got shape ", checks::shape_str(weight.sizes()));
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", dt);
  const int64_t n = x.size(0), d = x.size(1), vocab = weight.size(0);
  TORCH_CHECK(vocab > 0 && d > 0, op, ": weight must have shape (V, d) with V, d > 0, got ",
              checks::shape_str(weight.sizes()));
  const at::Device dev = x.device();
  checks::check_arg(op, "x", x, dev, x.sizes(), dt, "");
  checks::check_arg(op, "weight", weight, dev, {vocab, d}, dt, " (V, d) with d from x");
  if (bias.has_value()) checks::check_arg(op, "bias", *bias, dev, {vocab}, dt, " (V,)");
  checks::check_arg(op, "target", target, dev, {n}, at::kLong, " (the rows of x)");
  return {n, d, vocab, dt != at::kFloat};
}

inline void check_options(const char* op, double label_smoothing, double z_loss, std::optional<double> softcap) {
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing < 1, op, ": label_smoothing must be in [0, 1), got ",
              std::to_string(label_smoothing));
  TORCH_CHECK(z_loss >= 0, op, ": z_loss must be >= 0, got ", std::to_string(z_loss));
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, op, ": softcap must be > 0 or None");
}

}  // namespace lce
}  // namespace fusedlm
