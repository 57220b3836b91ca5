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
  const at::ScalarType dt = checks::check_projection(op, x, weight, bias, device_type, /*allow_half=*/true);
  const int64_t n = x.size(0), d = x.size(1), vocab = weight.size(0);
  checks::check_arg(op, "target", target, x.device(), {n}, at::kLong, " (the rows of x)");
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
