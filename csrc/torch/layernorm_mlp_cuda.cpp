// CUDA implementations of fusedlm::layernorm_mlp_fwd / layernorm_mlp_bwd (schemas:
// layernorm_mlp.cpp; contract and math: python/fusedlm/ops/layernorm_mlp.py). The scheme of the
// CPU op over token blocks: the norm with the layer_norm CUDA kernels, the GEMMs with cuBLAS
// through ATen (at::mm_out / addmm_ into block views; the fc bias in the fc GEMM, cuBLASLt's bias
// epilogue), and the element-wise kernels of csrc/cuda/layernorm_mlp.cu (activation forward;
// activation derivative with deterministic fc-bias partial sums backward). Blocks are large here
// (about 128 MiB of (block, fc_out) intermediate, up to 16384 rows: one block at 16384 x 3072 in
// bf16, so the GEMMs are the sub-block's own six): they bound the memory, not a cache.
//
// Backward: the d(xn) of every block is kept in one (M, d) buffer and the layer_norm backward
// runs once over all rows at the end, so the norm's weight gradients come out of its own
// deterministic fp32 reduction. Weight gradients of the GEMMs accumulate in fp32 across blocks:
// fp32 inputs with addmm_; bf16 / fp16 through cuBLAS with fp32 output where ATen has it
// (addmm's out_dtype, torch >= 2.9), else a GEMM per block in the input dtype added to the sum.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS headers, which a CUDA
// toolkit without the math libraries lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda/layer_norm.h"
#include "cuda/layernorm_mlp.h"
#include "layernorm_mlp_args.h"

namespace {

using at::Tensor;
namespace kernels = fusedlm::cuda;
namespace lm = fusedlm::layernorm_mlp;
using fusedlm::checks::kernel_dtype;

constexpr int64_t kBlockBytes = int64_t(128) << 20;

// Rows per token block (see the top); FUSEDLM_LNMLP_BLOCK_ROWS forces one, as on the CPU.
int64_t token_block(int64_t m, int64_t fc_out, int64_t elem_bytes) {
  const char* force = std::getenv("FUSEDLM_LNMLP_BLOCK_ROWS");
  if (force != nullptr && std::atoll(force) > 0) return std::max<int64_t>(1, std::min<int64_t>(m, std::atoll(force)));
  int64_t rows = kBlockBytes / std::max<int64_t>(1, fc_out * elem_bytes);
  rows = std::min<int64_t>(16384, std::max<int64_t>(1024, rows / 256 * 256));
  return m <= rows + rows / 2 ? std::max<int64_t>(m, 1) : rows;
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

const void* ptr_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void* row_ptr(const Tensor& t, int64_t r) {
  return static_cast<char*>(t.data_ptr()) + r * t.size(1) * int64_t(t.element_size());
}

void norm_rows(const char* op, const Tensor& x, int64_t r0, int64_t rows, const Tensor& norm_weight,
               const std::optional<Tensor>& norm_bias, const Tensor& xn, float* mean, float* rstd, double eps,
               bool rms, kernels::DType dtype, cudaStream_t stream) {
  check_launch(op, kernels::layer_norm_fwd(dtype, row_ptr(x, r0), nullptr, norm_weight.data_ptr(),
                                           ptr_or_null(norm_bias), xn.data_ptr(), nullptr, rms ? nullptr : mean, rstd,
                                           rows, x.size(1), static_cast<float>(eps), rms, stream));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layernorm_mlp_fwd_cuda(
    const Tensor& x, const Tensor& norm_weight, const std::optional<Tensor>& norm_bias, const Tensor& fc_weight,
    const std::optional<Tensor>& fc_bias, const Tensor& proj_weight, const std::optional<Tensor>& proj_bias,
    double eps, bool rms, c10::string_view activation_name, bool residual, bool recompute) {
  constexpr const char* op = "layernorm_mlp_fwd";
  const std::string activation(activation_name.data(), activation_name.size());
  const lm::Dims dims = lm::check_params(op, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps,
                                         rms, activation, at::kCUDA);
  const kernels::DType dtype = kernel_dtype<kernels::DType>(op, "x", x);
  const kernels::Activation act_kind = static_cast<kernels::Activation>(dims.activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  // The fc bias rides in the fc GEMM (addmm: cuBLASLt's bias epilogue), so the activation kernel
  // only reads pre_act.
  return lm::forward(
      x, fc_weight, fc_bias, proj_weight, proj_bias, dims, rms, residual, recompute,
      token_block(dims.m, dims.fc_out, x.element_size()),
      [&](int64_t r0, int64_t rows, const Tensor& xn, float* mean, float* rstd) {
        norm_rows(op, x, r0, rows, norm_weight, norm_bias, xn, mean, rstd, eps, rms, dtype, stream);
      },
      [&](const Tensor& pre_b, const Tensor& act, int64_t rows) {
        check_launch(op, kernels::mlp_act_fwd(dtype, act_kind, pre_b.data_ptr(), act.data_ptr(), rows, dims.h, stream));
      },
      nullptr);
}

// acc (fp32) += a b with fp32 accumulation across calls (see the top).
void gemm_accumulate(Tensor& acc, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
    return;
  }
#if FUSEDLM_ADDMM_OUT_DTYPE
  at::addmm_out(acc, acc, a, b, at::kFloat);
#else
  acc.add_(at::mm(a, b));
#endif
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_mlp_bwd_cuda(
    const Tensor& dy, const Tensor& x, const Tensor& norm_weight, const std::optional<Tensor>& norm_bias,
    const Tensor& fc_weight, const std::optional<Tensor>& fc_bias, const Tensor& proj_weight,
    const std::optional<Tensor>& proj_bias, const Tensor& pre_act, double eps, bool rms,
    c10::string_view activation_name, bool residual) {
  constexpr const char* op = "layernorm_mlp_bwd";
  const std::string activation(activation_name.data(), activation_name.size());
  const lm::Dims dims = lm::check_params(op, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps,
                                         rms, activation, at::kCUDA);
  const bool recompute = lm::check_saved(op, dims, x, dy, pre_act);
  const kernels::DType dtype = kernel_dtype<kernels::DType>(op, "x", x);
  const kernels::Activation act_kind = static_cast<kernels::Activation>(dims.activation);
  const int64_t m = dims.m, d = dims.d, fc_out = dims.fc_out, h = dims.h;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();

  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({m, d}, x.options());
  Tensor dnorm_w = at::empty({d}, x.options());
  Tensor dnorm_b = at::empty({norm_bias.has_value() ? d : 0}, x.options());
  Tensor dfc_w = at::zeros({fc_out, d}, f32);
  Tensor dfc_b = at::zeros({fc_bias.has_value() ? fc_out : 0}, f32);
  Tensor dproj_w = at::zeros({d, h}, f32);
  Tensor dproj_b = at::zeros({proj_bias.has_value() ? d : 0}, f32);

  const int64_t block = token_block(m, fc_out, x.element_size());
  Tensor xn = at::empty({block, d}, x.options());
  Tensor dxn = at::empty({m, d}, x.options());  // every block's d(xn), for one norm backward at the end
  Tensor pre_buf = recompute ? at::empty({block, fc_out}, x.options()) : Tensor();
  Tensor dact = at::empty({block, h}, x.options());  // d(act), then act
  Tensor dpre = at::empty({block, fc_out}, x.options());
  // mean (M) and rstd (M), recomputed block by block by the forward's kernel (the same bits): the
  // forward does not save them.
  Tensor stats = at::empty({2 * m}, f32);
  float* const mean = stats.data_ptr<float>();
  float* const rstd = mean + m;
  // Column-sum partials of one block (d(pre) for the fc bias, dy for the proj bias), reduced in
  // chunk order, then block order: deterministic.
  Tensor partial = at::empty({kernels::sum_chunks(block) * std::max(fc_out, d)}, f32);

  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t rows = std::min(block, m - r0);
    norm_rows(op, x, r0, rows, norm_weight, norm_bias, xn, mean + r0, rstd + r0, eps, rms, dtype, stream);
    const Tensor xn_b = xn.narrow(0, 0, rows);
    Tensor pre_b;
    if (recompute) {  // as the forward made it, bias in the GEMM (the same bits)
      pre_b = pre_buf.narrow(0, 0, rows);
      lm::fc_pre(pre_b, xn_b, fc_weight.t(), fc_bias);
    } else {
      pre_b = pre_act.narrow(0, r0, rows);
    }
    const Tensor dy_b = dy.narrow(0, r0, rows);
    Tensor dact_b = dact.narrow(0, 0, rows);
    Tensor dpre_b = dpre.narrow(0, 0, rows);
    at::mm_out(dact_b, dy_b, proj_weight);
    float* fc_partial = fc_bias.has_value() ? partial.data_ptr<float>() : nullptr;
    check_launch(op, kernels::mlp_act_bwd(dtype, act_kind, pre_b.data_ptr(), dact_b.data_ptr(), dpre_b.data_ptr(),
                                          fc_partial, rows, h, stream));
    if (fc_bias.has_value()) {
      check_launch(op, kernels::reduce_partials(fc_partial, kernels::sum_chunks(rows), fc_out,
                                                dfc_b.data_ptr<float>(), stream));
    }
    if (proj_bias.has_value()) {  // per block: the partials' grid stays within CUDA's 65535 rows of chunks
      check_launch(op,
                   kernels::column_sum_partials(dtype, dy_b.data_ptr(), partial.data_ptr<float>(), rows, d, stream));
      check_launch(op, kernels::reduce_partials(partial.data_ptr<float>(), kernels::sum_chunks(rows), d,
                                                dproj_b.data_ptr<float>(), stream));
    }
    gemm_accumulate(dproj_w, dy_b.t(), dact_b);   // dproj_w += dy^T act
    gemm_accumulate(dfc_w, dpre_b.t(), xn_b);     // dfc_w += d(pre)^T xn
    Tensor dxn_b = dxn.narrow(0, r0, rows);
    at::mm_out(dxn_b, dpre_b, fc_weight);         // d(xn) = d(pre) fc_w
  }

  const int64_t ws_floats = kernels::layer_norm_bwd_workspace_floats(m, d, norm_bias.has_value());
  Tensor ws = at::empty({ws_floats}, f32);
  check_launch(op, kernels::layer_norm_bwd(dtype, dxn.data_ptr(), residual ? dy.data_ptr() : nullptr, x.data_ptr(),
                                           norm_weight.data_ptr(), rms ? nullptr : mean, rstd, dx.data_ptr(),
                                           dnorm_w.data_ptr(),
                                           norm_bias.has_value() ? dnorm_b.data_ptr() : nullptr,
                                           ws.data_ptr<float>(), ws_floats, m, d, rms, stream));
  const auto out = [&](const Tensor& acc) { return acc.to(x.scalar_type()); };
  return {dx, dnorm_w, dnorm_b, out(dfc_w), out(dfc_b), out(dproj_w), out(dproj_b)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlm, CUDA, m) {
  m.impl("layernorm_mlp_fwd", &layernorm_mlp_fwd_cuda);
  m.impl("layernorm_mlp_bwd", &layernorm_mlp_bwd_cuda);
}
