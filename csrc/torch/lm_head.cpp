// The fusedlm::lm_head_softmax schema (the CUDA impl in lm_head_cuda.cpp registers against it)
// and its CPU implementation: the driver of lm_head_chunks.h with the OpenMP / AVX-512 row pass
// of csrc/cpu/lm_head.cpp. Contract and math: python/fusedlm/ops/lm_head.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "cpu/lm_head.h"
#include "lm_head_chunks.h"

namespace {

using at::Tensor;
namespace cpu = fusedlm::cpu;

// The bf16 path's logits buffer: 64 MiB, 667 rows at V = 50304 and 261 at V = 128256. Every chunk's
// GEMM streams all of W (196 MiB at 50304 x 2048 in bf16), so chunks of a few hundred rows keep that
// re-reading small beside the GEMM's 2 T V d flops; the float32 output (4 V bytes a row) dwarfs it.
constexpr int64_t kCpuChunkBytes = int64_t(64) << 20;

Tensor lm_head_softmax_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                           double temperature) {
  constexpr const char* op = "lm_head_softmax";
  return fusedlm::lm_head::forward(
      op, x, weight, bias, temperature, at::kCPU, /*allow_half=*/false, kCpuChunkBytes,
      [&](const Tensor& logits, Tensor& probs, float inv_t) {
        cpu::LmHeadRowsArgs a{};
        const char* error = nullptr;
        TORCH_CHECK(cpu::select_isa(&a.isa, &error), op, ": ", error);
        a.logits = logits.data_ptr();
        a.probs = probs.data_ptr<float>();
        a.rows = probs.size(0);
        a.vocab = probs.size(1);
        a.logits_stride = logits.stride(0);
        a.inv_temperature = inv_t;
        a.dtype = logits.scalar_type() == at::kBFloat16 ? cpu::DType::BFloat16 : cpu::DType::Float32;
        a.num_threads = at::get_num_threads();
        cpu::lm_head_softmax_rows(a);
      });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedlm, m) {
  m.def("lm_head_softmax(Tensor x, Tensor weight, Tensor? bias, float temperature) -> Tensor probs");
}

TORCH_LIBRARY_IMPL(fusedlm, CPU, m) { m.impl("lm_head_softmax", &lm_head_softmax_cpu); }
