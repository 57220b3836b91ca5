// CUDA implementations of fusedlm::linear_cross_entropy_fwd / _bwd (schemas: softmax_output.cpp;
// contract and math: python/fusedlm/ops/softmax_output.py): cuBLAS GEMMs through ATen on the
// current stream, and the torch-free row passes of csrc/cuda/softmax_output.cu, over vocabulary
// slabs. A slab is all N tokens x C vocabulary columns [v0, v0 + C) of the logits, held in one
// (N, C) buffer of x's dtype (the only V-sized activation; Wb, bb = rows [v0, v0 + C) of W, b):
//
//   forward, per slab in order:  L = x Wb^T + bb  (as F.linear: x's dtype);  merge L's max, sum
//     exp, sum c and c_t into each token's running stats; the last slab writes lse and loss
//   backward, per slab:  L = x Wb^T + bb (the forward's logits);  L := dz in place (saved lse);
//     dWb = L^T x  (one GEMM, K = N: written once, straight into dW);  dx += L Wb;  db_b = sum_rows L
//
// Why slabs of the vocabulary with every token, and not chunks of tokens over all of V (this
// driver's first scheme): a token chunk makes dW a sum over chunks, so each chunk read and wrote
// a float32 V x d dW (1 GB at 128256 x 2048) and streamed all of W with a short GEMM. On an H200
// at 16384 x 2048 x 128256 bf16 that scheme, with its 64 MiB buffer (86 tokens a chunk), took
// 424 ms against eager's 60. Here each GEMM has two long dimensions (N and C, or N and d), dW needs
// no float32 copy (cuBLAS accumulates the K = N sum in float32 and rounds once, as eager's
// autograd), and what is summed across slabs is dx: a float32 N x d buffer for 16-bit inputs
// (134 MB at 16384 x 2048), read and written once per slab.
//
// dz is rounded to x's dtype before the gradient GEMMs, as autograd of F.linear sees it. The
// same bits on every run: fixed slab order, no atomics; no host sync.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS headers, which a CUDA
// toolkit without the math libraries lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda/softmax_output.h"
#include "softmax_output_args.h"

namespace {

using at::Tensor;
namespace kernels = fusedlm::cuda;
namespace lce = fusedlm::lce;

// The (N, C) slab buffer's bytes: large enough that every GEMM stays in cuBLAS's efficient range
// (C = 8192 at N = 16384 in bf16), small against eager's N x V logits (4.2 GB there).
constexpr int64_t kSlabBytes = int64_t(256) << 20;
constexpr int64_t kSlabAlign = 128;  // columns: keeps the buffer's rows 256-byte aligned

// Columns per slab: a multiple of kSlabAlign within kSlabBytes, at least kSlabAlign, at most V.
// FUSEDLM_LCE_SLAB_COLS forces a width (tests use it to cover several slabs on small shapes).
int64_t slab_cols(int64_t n, int64_t vocab, int64_t elem_bytes) {
  const char* force = std::getenv("FUSEDLM_LCE_SLAB_COLS");
  if (force != nullptr && std::atoll(force) > 0) return std::min<int64_t>(vocab, std::atoll(force));
  const int64_t cols = kSlabBytes / (std::max<int64_t>(n, 1) * elem_bytes) / kSlabAlign * kSlabAlign;
  return std::min(vocab, std::max(cols, kSlabAlign));
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

struct Slabs {
  int64_t cols;
  Tensor buffer;  // (N * cols,) x's dtype

  Slabs(const lce::Problem& p, const Tensor& x)
      : cols(slab_cols(p.n, p.vocab, x.element_size())), buffer(at::empty({p.n * cols}, x.options())) {}

  // L (N, c) = x Wb^T + bb for the slab at v0 of c columns, contiguous, in x's dtype.
  Tensor logits(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, int64_t v0, int64_t c) {
    Tensor out = buffer.narrow(0, 0, x.size(0) * c).view({x.size(0), c});
    const Tensor wb = weight.narrow(0, v0, c).t();
    if (bias.has_value()) {
      at::addmm_out(out, bias->narrow(0, v0, c), x, wb);
    } else {
      at::mm_out(out, x, wb);
    }
    return out;
  }
};

std::tuple<Tensor, Tensor> linear_cross_entropy_fwd_cuda(const Tensor& x, const Tensor& weight,
                                                         const std::optional<Tensor>& bias, const Tensor& target,
                                                         int64_t ignore_index, double label_smoothing, double z_loss,
                                                         std::optional<double> softcap) {
  constexpr const char* op = "linear_cross_entropy_fwd";
  lce::check_options(op, label_smoothing, z_loss, softcap);
  const lce::Problem p = lce::check_inputs(op, x, weight, bias, target, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor loss = at::empty({p.n}, f32), lse = at::empty({p.n}, f32);
  if (p.n == 0) return {loss, lse};
  const kernels::DType dtype = fusedlm::checks::kernel_dtype<kernels::DType>(op, "x", x);
  Slabs slabs(p, x);
  Tensor stats = at::empty({p.n, kernels::kCrossEntropyStats}, f32);
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  for (int64_t v0 = 0; v0 < p.vocab; v0 += slabs.cols) {
    const int64_t c = std::min(slabs.cols, p.vocab - v0);
    const Tensor l = slabs.logits(x, weight, bias, v0, c);
    check_launch(op, kernels::cross_entropy_slab_fwd(dtype, l.data_ptr(), target.data_ptr<int64_t>(),
                                                     stats.data_ptr<float>(), loss.data_ptr<float>(),
                                                     lse.data_ptr<float>(), p.n, c, v0, p.vocab, ignore_index,
                                                     static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                                                     cap, stream));
  }
  return {loss, lse};
}

// dx32 (float32) += a b for 16-bit a, b: one cuBLAS call with float32 output where ATen has it.
void add_product(Tensor& dx32, const Tensor& a, const Tensor& b) {
#if FUSEDLM_ADDMM_OUT_DTYPE
  at::addmm_out(dx32, dx32, a, b, at::kFloat);
#else
  dx32.add_(at::mm(a, b));
#endif
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd_cuda(
    const Tensor& dloss, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& target, const Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, bool has_bias) {
  constexpr const char* op = "linear_cross_entropy_bwd";
  lce::check_options(op, label_smoothing, z_loss, softcap);
  const lce::Problem p = lce::check_inputs(op, x, weight, bias, target, at::kCUDA);
  TORCH_CHECK(has_bias == bias.has_value(), op, ": has_bias must say whether bias is given");
  fusedlm::checks::check_arg(op, "lse", lse, x.device(), {p.n}, at::kFloat, " (the rows of x)");
  fusedlm::checks::check_arg(op, "dloss", dloss, x.device(), {p.n}, at::kFloat, " (the rows of x)");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({p.n, p.d}, x.options());
  Tensor dbias32 = at::zeros({has_bias ? p.vocab : 0}, f32);
  if (p.n == 0) {
    const Tensor dbias = has_bias ? dbias32.to(weight.scalar_type()) : at::empty({0}, x.options());
    return {dx, at::zeros_like(weight), dbias};
  }
  const kernels::DType dtype = fusedlm::checks::kernel_dtype<kernels::DType>(op, "x", x);
  Tensor dweight = at::empty({p.vocab, p.d}, weight.options());
  Tensor dx32 = p.low_precision ? at::zeros({p.n, p.d}, f32) : Tensor();
  Slabs slabs(p, x);
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  for (int64_t v0 = 0; v0 < p.vocab; v0 += slabs.cols) {
    const int64_t c = std::min(slabs.cols, p.vocab - v0);
    const Tensor dz = slabs.logits(x, weight, bias, v0, c);
    check_launch(op, kernels::cross_entropy_slab_bwd(dtype, dz.data_ptr(), target.data_ptr<int64_t>(),
                                                     lse.data_ptr<float>(), dloss.data_ptr<float>(), p.n, c, v0,
                                                     p.vocab, ignore_index, static_cast<float>(label_smoothing),
                                                     static_cast<float>(z_loss), cap, stream));
    const Tensor wb = weight.narrow(0, v0, c);
    if (p.low_precision) {
      add_product(dx32, dz, wb);
    } else if (v0 == 0) {
      at::mm_out(dx, dz, wb);
    } else {
      dx.addmm_(dz, wb);
    }
    Tensor dwb = dweight.narrow(0, v0, c);
    at::mm_out(dwb, dz.t(), x);
    if (has_bias) {
      Tensor dbb = dbias32.narrow(0, v0, c);
      at::sum_out(dbb, dz, {0}, false, at::kFloat);
    }
  }
  if (p.low_precision) dx.copy_(dx32);
  const Tensor dbias = has_bias ? dbias32.to(weight.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlm, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd_cuda);
}
