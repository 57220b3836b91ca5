// The fusedlm::linear_cross_entropy_fwd / _bwd schemas (the CUDA impl in softmax_output_cuda.cpp
// registers against these) and their CPU implementations: the chunk loop of
// softmax_output_chunks.h with the OpenMP / AVX-512 row pass of csrc/cpu/softmax_output.cpp.
// Contract and math: python/fusedlm/ops/softmax_output.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/softmax_output.h"
#include "softmax_output_chunks.h"

namespace {

using at::Tensor;
namespace cpu = fusedlm::cpu;

cpu::CrossEntropyRowsArgs rows_args(const char* op, Tensor& logits, const Tensor& target, int64_t ignore_index,
                                    double label_smoothing, double z_loss, std::optional<double> softcap) {
  cpu::CrossEntropyRowsArgs a{};
  const char* error = nullptr;
  TORCH_CHECK(cpu::select_isa(&a.isa, &error), op, ": ", error);
  a.logits = logits.data_ptr<float>();
  a.target = target.data_ptr<int64_t>();
  a.rows = logits.size(0);
  a.vocab = logits.size(1);
  a.ignore_index = ignore_index;
  a.label_smoothing = static_cast<float>(label_smoothing);
  a.z_loss = static_cast<float>(z_loss);
  a.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  a.num_threads = at::get_num_threads();
  return a;
}

void check_options(const char* op, double label_smoothing, double z_loss, std::optional<double> softcap) {
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing < 1, op, ": label_smoothing must be in [0, 1), got ",
              std::to_string(label_smoothing));
  TORCH_CHECK(z_loss >= 0, op, ": z_loss must be >= 0, got ", std::to_string(z_loss));
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, op, ": softcap must be > 0 or None");
}

std::tuple<Tensor, Tensor> linear_cross_entropy_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                        const std::optional<Tensor>& bias, const Tensor& target,
                                                        int64_t ignore_index, double label_smoothing, double z_loss,
                                                        std::optional<double> softcap) {
  constexpr const char* op = "linear_cross_entropy_fwd";
  check_options(op, label_smoothing, z_loss, softcap);
  return fusedlm::lce::forward(op, x, weight, bias, target, at::kCPU,
                               [&](Tensor& logits, const Tensor& t, Tensor& loss, Tensor& lse) {
                                 cpu::CrossEntropyRowsArgs a =
                                     rows_args(op, logits, t, ignore_index, label_smoothing, z_loss, softcap);
                                 a.loss = loss.data_ptr<float>();
                                 a.lse = lse.data_ptr<float>();
                                 cpu::cross_entropy_rows_fwd(a);
                               });
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd_cpu(
    const Tensor& dloss, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& target, const Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, bool has_bias) {
  constexpr const char* op = "linear_cross_entropy_bwd";
  check_options(op, label_smoothing, z_loss, softcap);
  return fusedlm::lce::backward(
      op, dloss, x, weight, bias, target, lse, has_bias, at::kCPU,
      [&](Tensor& logits, const Tensor& t, const Tensor& lse_c, const Tensor& dloss_c) {
        cpu::CrossEntropyRowsArgs a = rows_args(op, logits, t, ignore_index, label_smoothing, z_loss, softcap);
        a.lse = const_cast<float*>(lse_c.data_ptr<float>());  // read only in backward
        a.dloss = dloss_c.data_ptr<float>();
        cpu::cross_entropy_rows_bwd(a);
      });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedlm, m) {
  m.def(
      "linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
      "float label_smoothing, float z_loss, float? softcap) -> (Tensor loss, Tensor lse)");
  m.def(
      "linear_cross_entropy_bwd(Tensor dloss, Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor lse, "
      "int ignore_index, float label_smoothing, float z_loss, float? softcap, bool has_bias) "
      "-> (Tensor dx, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(fusedlm, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cpu);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cpu);
}
