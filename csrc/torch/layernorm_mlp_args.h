// Argument checks of fusedlm::layernorm_mlp_fwd / _bwd and the forward's token-block loop, shared
// by the CPU binding (layernorm_mlp.cpp) and the CUDA one (layernorm_mlp_cuda.cpp). The op
// contract is in python/fusedlm/ops/layernorm_mlp.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "checks.h"

namespace fusedlm {
namespace layernorm_mlp {

// Activation names in the order of the kernels' Activation enums (csrc/cpu/layernorm_mlp.h,
// csrc/cuda/layernorm_mlp.h), which cast the index.
constexpr const char* kActivations[] = {"gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"};
constexpr int kNumActivations = 6;
constexpr bool gated_index(int a) { return a == 4 || a == 5; }

struct Dims {
  int64_t m, d, fc_out, h;
  int activation;  // index into kActivations
  bool gated;
};

inline int activation_index(const char* op, const std::string& activation) {
  for (int i = 0; i < kNumActivations; ++i)
    if (activation == kActivations[i]) return i;
  TORCH_CHECK(false, op, ": activation must be one of gelu, gelu_tanh, relu, silu, swiglu, geglu, got '", activation,
              "'");
}

// x (M, d) on a `device_type` device, and every parameter against it; returns the dimensions.
inline Dims check_params(const char* op, const at::Tensor& x, const at::Tensor& norm_weight,
                         const std::optional<at::Tensor>& norm_bias, const at::Tensor& fc_weight,
                         const std::optional<at::Tensor>& fc_bias, const at::Tensor& proj_weight,
                         const std::optional<at::Tensor>& proj_bias, double eps, bool rms,
                         const std::string& activation, at::DeviceType device_type) {
  using checks::check_arg;
  using checks::shape_str;
  checks::check_matrix(op, "x", x, device_type);
  Dims dims{};
  dims.m = x.size(0);
  dims.d = x.size(1);
  dims.activation = activation_index(op, activation);
  dims.gated = gated_index(dims.activation);
  const at::Device device = x.device();
  const at::ScalarType dtype = x.scalar_type();
  check_arg(op, "x", x, device, x.sizes(), dtype, "");
  check_arg(op, "norm_weight", norm_weight, device, {dims.d}, dtype, " (the columns of x)");
  if (norm_bias.has_value()) {
    TORCH_CHECK(!rms, op, ": rmsnorm takes no norm_bias, got one of shape ", shape_str(norm_bias->sizes()));
    check_arg(op, "norm_bias", *norm_bias, device, {dims.d}, dtype, " (the columns of x)");
  }
  TORCH_CHECK(fc_weight.dim() == 2 && fc_weight.size(1) == dims.d, op, ": fc_weight must have shape (h, ",
              std::to_string(dims.d), "), got ", shape_str(fc_weight.sizes()));
  dims.fc_out = fc_weight.size(0);
  TORCH_CHECK(!dims.gated || dims.fc_out % 2 == 0, op, ": a gated activation (", activation,
              ") needs fc_weight of height 2h, got odd height ", std::to_string(dims.fc_out));
  dims.h = dims.gated ? dims.fc_out / 2 : dims.fc_out;
  TORCH_CHECK(dims.h > 0, op, ": fc_weight must have at least one row, got shape ", shape_str(fc_weight.sizes()));
  check_arg(op, "fc_weight", fc_weight, device, fc_weight.sizes(), dtype, "");
  if (fc_bias.has_value()) check_arg(op, "fc_bias", *fc_bias, device, {dims.fc_out}, dtype, " (the height of fc_weight)");
  check_arg(op, "proj_weight", proj_weight, device, {dims.d, dims.h}, dtype, " (d, h)");
  if (proj_bias.has_value()) check_arg(op, "proj_bias", *proj_bias, device, {dims.d}, dtype, " (d,)");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", std::to_string(eps));
  return dims;
}

// The tensors the backward adds to the forward's inputs: dy (M, d) and pre_act (the backward
// recomputes the norm statistics from x). Returns true when pre_act has shape (0,): recompute it.
inline bool check_saved(const char* op, const Dims& dims, const at::Tensor& x, const at::Tensor& dy,
                        const at::Tensor& pre_act) {
  using checks::check_arg;
  const at::Device device = x.device();
  check_arg(op, "dy", dy, device, x.sizes(), x.scalar_type(), " (the shape of x)");
  const bool recompute = pre_act.dim() == 1 && pre_act.size(0) == 0;
  if (!recompute) {
    check_arg(op, "pre_act", pre_act, device, {dims.m, dims.fc_out}, x.scalar_type(),
              " (rows of x, height of fc_weight), or (0,) to recompute it");
  }
  return recompute;
}

// pre = xn fc_w^T (+ bias, in the GEMM's epilogue: cuBLASLt's on CUDA), into `pre`. The forward and
// the CUDA backward's recompute both call this, so a recomputed pre_act has the forward's bits.
inline void fc_pre(at::Tensor& pre, const at::Tensor& xn, const at::Tensor& fc_wt,
                   const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(pre, *bias, xn, fc_wt);
  } else {
    at::mm_out(pre, xn, fc_wt);
  }
}

// The forward over blocks of `block` token rows; the devices differ only in their norm and
// activation kernels and in how y gets the residual and the proj bias, passed in as
//   norm_rows(r0, rows, xn, mean or nullptr (rmsnorm), rstd): xn = norm(x[r0 : r0 + rows]) and its statistics
//   act_fwd(pre_b, act, rows): act[:rows] = act(pre_b (+ fc_bias, unless gemm_bias holds it))
//   add_rows(y_b, r0): y_b += proj_bias + x[r0 : r0 + rows] (either as the call has them), after
//     y_b = act_b proj_w^T; or nullptr: then y starts as x (+ proj_bias) for all rows in one pass
//     and each block's proj GEMM adds into its rows (beta = 1, free in a GPU GEMM's epilogue; on
//     the CPU a beta = 1 GEMM plus ATen's add cost more than one pass over the block's rows).
// pre = xn fc_w^T (+ gemm_bias: the fc bias in the GEMM's epilogue, cuBLASLt on CUDA; the CPU
// passes add the bias where they read pre) is kept for backward (pre_act) or, with recompute,
// lives in a block buffer.
template <typename NormRows, typename ActFwd, typename AddRows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& fc_weight, const std::optional<at::Tensor>& gemm_bias,
    const at::Tensor& proj_weight, const std::optional<at::Tensor>& proj_bias, const Dims& dims, bool rms,
    bool residual, bool recompute, int64_t block, NormRows norm_rows, ActFwd act_fwd, AddRows add_rows) {
  using at::Tensor;
  constexpr bool kInitY = std::is_same_v<AddRows, std::nullptr_t>;
  const int64_t m = dims.m, d = dims.d, fc_out = dims.fc_out, h = dims.h;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor y = at::empty({m, d}, x.options());
  Tensor mean = at::empty({rms ? 0 : m}, f32);
  Tensor rstd = at::empty({m}, f32);
  Tensor pre_act = at::empty(recompute ? at::IntArrayRef{0} : at::IntArrayRef{m, fc_out}, x.options());
  Tensor xn = at::empty({block, d}, x.options());
  Tensor pre_buf = recompute ? at::empty({block, fc_out}, x.options()) : Tensor();
  Tensor act = at::empty({block, h}, x.options());
  const Tensor fc_wt = fc_weight.t(), proj_wt = proj_weight.t();

  const bool add_to_y = residual || proj_bias.has_value();
  if constexpr (kInitY) {
    if (residual && proj_bias.has_value()) {
      at::add_out(y, x, *proj_bias);
    } else if (residual) {
      y.copy_(x);
    } else if (proj_bias.has_value()) {
      y.copy_(proj_bias->expand({m, d}));
    }
  }
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t rows = std::min(block, m - r0);
    norm_rows(r0, rows, xn, rms ? nullptr : mean.data_ptr<float>() + r0, rstd.data_ptr<float>() + r0);
    Tensor pre_b = recompute ? pre_buf.narrow(0, 0, rows) : pre_act.narrow(0, r0, rows);
    fc_pre(pre_b, xn.narrow(0, 0, rows), fc_wt, gemm_bias);
    act_fwd(pre_b, act, rows);
    Tensor y_b = y.narrow(0, r0, rows);
    const Tensor act_b = act.narrow(0, 0, rows);
    if (kInitY && add_to_y) {
      y_b.addmm_(act_b, proj_wt);
    } else {
      at::mm_out(y_b, act_b, proj_wt);
      if constexpr (!kInitY) {
        if (add_to_y) add_rows(y_b, r0);
      }
    }
  }
  return {y, mean, rstd, pre_act};
}

}  // namespace layernorm_mlp
}  // namespace fusedlm
