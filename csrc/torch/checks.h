// Argument checks shared by the CPU and CUDA bindings. Every message names the op and the
// argument, and prints shapes as Python does: (768,) and (2, 8, 64).
//
// Numbers go through std::to_string, never an ostream: on the GPU machine (torch 2.11, g++ 13)
// formatting a number with an ostream inside the extension segfaults, which turned every shape
// error into a crash. TORCH_CHECK is given only strings, devices and dtypes.
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

#include <optional>
#include <string>

// at::addmm_out with an out_dtype (16-bit inputs, float32 accumulation and output in one cuBLAS
// call) exists from torch 2.9, but a float32 `self` with 16-bit matrices (how the CUDA bindings add
// into float32 weight-gradient sums) is accepted from 2.10 (pytorch PR 167931); before it the
// bindings add a 16-bit GEMM's result instead.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
#define FUSEDLM_ADDMM_OUT_DTYPE 1
#else
#define FUSEDLM_ADDMM_OUT_DTYPE 0
#endif

namespace fusedlm {
namespace checks {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// The kernels' dtype tag (an enum with Float32, BFloat16, Float16) of a floating tensor.
template <typename DType>
DType kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kHalf:
      return DType::Float16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// A contiguous tensor on `device` of exactly `sizes` and `dtype`; `what` explains the shape.
inline void check_arg(const char* op, const char* name, const at::Tensor& t, at::Device device,
                      at::IntArrayRef sizes, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (the device of the first input), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", shape_str(sizes), what, ", got ",
              shape_str(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The (M, N) matrix every other argument is checked against: on a `device_type` device, with columns.
inline void check_matrix(const char* op, const char* name, const at::Tensor& t, at::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, op, ": ", name, " must be a ", at::Device(device_type),
              " tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (M, N), got shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.size(1) > 0, op, ": ", name, " must have at least one column, got shape ", shape_str(t.sizes()));
}

// The vocabulary projection's arguments (linear_cross_entropy, lm_head_softmax): x (N, d), weight
// (V, d) with V, d > 0, bias (V,) or none, one float dtype (fp16 only when allow_half), on one
// device of device_type. Returns x's dtype.
inline at::ScalarType check_projection(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, at::DeviceType device_type,
                                       bool allow_half) {
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ", at::Device(device_type),
              " tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, d), got shape ", shape_str(x.sizes()));
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (V, d), got shape ", shape_str(weight.sizes()));
  const at::ScalarType dt = x.scalar_type();
  if (allow_half) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                ": x must be float32, bfloat16 or float16, got ", dt);
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, op, ": x must be float32 or bfloat16 on the ",
                at::Device(device_type), ", got ", dt);
  }
  const int64_t d = x.size(1), vocab = weight.size(0);
  TORCH_CHECK(vocab > 0 && d > 0, op, ": weight must have shape (V, d) with V, d > 0, got ",
              shape_str(weight.sizes()));
  check_arg(op, "x", x, x.device(), x.sizes(), dt, "");
  check_arg(op, "weight", weight, x.device(), {vocab, d}, dt, " (V, d) with d from x");
  if (bias.has_value()) check_arg(op, "bias", *bias, x.device(), {vocab}, dt, " (V,)");
  return dt;
}

}  // namespace checks
}  // namespace fusedlm
