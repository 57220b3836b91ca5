// CUDA implementations of fusedlm::attention_fwd / attention_bwd (schemas and CPU impls:
// attention.cpp; contract: python/fusedlm/ops/attention.py): check the tensors, allocate the
// outputs on the input's device, launch the torch-free kernels of csrc/cuda/attention_*.cu on the
// current stream.
//
// What backend="cuda" takes (the Python wrapper may check these first and raise BackendError):
//   dtypes float16 and bfloat16 (tensor cores) and float32 (CUDA cores), q, k, v of one dtype;
//   head dims 64, 80, 96, 128 (fusedlm::cuda::kAttentionHeadDimsText); any other head dim is a
//   TORCH_CHECK error "attention_fwd: backend 'cuda' takes head dims 64, 80, 96, 128; got 72
//   (backend='triton' covers it)".
// Inputs are read through their strides when the head dim is dense (and, for 16-bit dtypes, every
// row starts 16-byte aligned); otherwise they are copied once. out, dq, dk, dv are contiguous.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS headers, which a CUDA
// toolkit without the math libraries lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda/attention.h"

namespace {

using at::Tensor;
namespace kernels = fusedlm::cuda;
using fusedlm::checks::kernel_dtype;
using fusedlm::checks::shape_str;

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

// A 4-D CUDA tensor (B, H, N, D) of a kernel dtype.
void check_bhnd(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, H, N, D), got shape ", shape_str(t.sizes()));
  kernel_dtype<kernels::DType>(op, name, t);
}

void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref, at::IntArrayRef sizes,
                const char* what) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " (the device of q), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ", ref.scalar_type(),
              " (the dtype of q), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", shape_str(sizes), what, ", got ",
              shape_str(t.sizes()));
}

// The tensor itself when the kernels can read it through its strides, else a dense copy.
Tensor readable(const Tensor& t) {
  const bool wide = t.scalar_type() == at::kFloat;
  const auto aligned = [&] {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
           t.stride(2) % 8 == 0;
  };
  if (t.stride(3) == 1 && (wide || aligned())) return t;
  return t.clone(at::MemoryFormat::Contiguous);  // a fresh allocation: aligned, dense
}

kernels::RowStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Checks q, k, v together; returns the dims the kernels take.
kernels::AttentionDims check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  check_bhnd(op, "q", q);
  check_bhnd(op, "k", k);
  check_like(op, "k", k, q, {q.size(0), k.size(1), k.size(2), q.size(3)}, " (q's batch and head dim)");
  check_like(op, "v", v, q, k.sizes(), " (the shape of k)");
  const int64_t hq = q.size(1), hkv = k.size(1), d = q.size(3);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, op, ": q heads (", std::to_string(hq), ") must be a multiple of k/v heads (",
              std::to_string(hkv), ")");
  TORCH_CHECK(kernels::attention_head_dim_supported(d), op, ": backend 'cuda' takes head dims ",
              kernels::kAttentionHeadDimsText, "; got ", std::to_string(d), " (backend='triton' covers it)");
  // The kernels take scale and scale * log2(e) as float: both must stay finite and above 0 there.
  const float scale_f = static_cast<float>(scale);
  TORCH_CHECK(std::isfinite(scale) && scale_f > 0 && std::isfinite(scale_f * 1.4426950408889634f), op,
              ": scale must be finite and > 0 in float32 (also times log2(e)), got ", std::to_string(scale));
  TORCH_CHECK(q.size(0) <= 65535 && hq <= 65535, op, ": batch and heads must be <= 65535, got q of shape ",
              shape_str(q.sizes()));
  TORCH_CHECK(q.size(2) < (int64_t{1} << 30) && k.size(2) < (int64_t{1} << 30), op,
              ": sequence lengths must be < 2^30, got q ", shape_str(q.sizes()), " and k ", shape_str(k.sizes()));
  return {q.size(0), hq, hkv, q.size(2), k.size(2), d};
}

// lse / dlse: (B, Hq, Nq) float32 on q's device, made contiguous.
Tensor check_rows(const char* op, const char* name, const Tensor& t, const Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(), " (the device of q), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  const at::IntArrayRef rows = q.sizes().slice(0, 3);
  TORCH_CHECK(t.sizes() == rows, op, ": ", name, " must have shape ", shape_str(rows), " (B, Hq, Nq of q), got ",
              shape_str(t.sizes()));
  return t.contiguous();
}

std::tuple<Tensor, Tensor> attention_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                              double scale) {
  constexpr const char* op = "attention_fwd";
  const kernels::AttentionDims dims = check_qkv(op, q_in, k_in, v_in, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({dims.batch, dims.heads_q, dims.n_q}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(op, kernels::attention_fwd(kernel_dtype<kernels::DType>(op, "q", q), q.data_ptr(), k.data_ptr(),
                                          v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(), dims, strides_of(q),
                                          strides_of(k), strides_of(v), static_cast<float>(scale), causal, stream));
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cuda(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                      const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                      const std::optional<Tensor>& dlse_in, bool causal,
                                                      double scale) {
  constexpr const char* op = "attention_bwd";
  const kernels::AttentionDims dims = check_qkv(op, q_in, k_in, v_in, scale);
  check_like(op, "dout", dout_in, q_in, q_in.sizes(), " (the shape of q)");
  check_like(op, "out", out_in, q_in, q_in.sizes(), " (the shape of q)");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor lse = check_rows(op, "lse", lse_in, q_in);
  const std::optional<Tensor> dlse =
      dlse_in.has_value() ? std::optional<Tensor>(check_rows(op, "dlse", *dlse_in, q_in)) : std::nullopt;
  const Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in), dout = readable(dout_in);
  const Tensor out = out_in.contiguous();
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk = at::empty(k.sizes(), k.options());
  Tensor dv = at::empty(v.sizes(), v.options());
  Tensor workspace = at::empty({kernels::attention_bwd_workspace_floats(dims)}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_launch(op, kernels::attention_bwd(kernel_dtype<kernels::DType>(op, "q", q), dout.data_ptr(), q.data_ptr(),
                                          k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                          dlse.has_value() ? dlse->data_ptr<float>() : nullptr, dq.data_ptr(),
                                          dk.data_ptr(), dv.data_ptr(), workspace.data_ptr<float>(), dims,
                                          strides_of(dout), strides_of(q), strides_of(k), strides_of(v),
                                          static_cast<float>(scale), causal, stream));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}
