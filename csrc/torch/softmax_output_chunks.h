// The chunked linear cross-entropy driver of the CUDA binding (softmax_output_cuda.cpp), and the
// argument checks it shares with the CPU binding (softmax_output.cpp, which tiles the vocabulary
// too: see there why). The loop of token chunks and the GEMMs go through ATen (cuBLAS); the fused
// per-row pass (softcap, max, sum, lse, loss, and the softmax gradient in place) is the device's
// kernel, passed in as `rows_fwd` / `rows_bwd`. Contract and math: python/fusedlm/ops/softmax_output.py.
//
// Per chunk of T tokens (x_c: (T, d), buffer L: (T, V) float32, the only V-sized activation):
//   forward:  L = x_c W^T + b;  rows_fwd(L) -> loss, lse of the chunk
//   backward: L = x_c W^T + b;  rows_bwd(L) -> L := dlogits;  dx_c = L W;  dW += L^T x_c;  db += sum_rows L
// dW and db accumulate in float32 across chunks in chunk order (deterministic for a given chunk
// size); a low-precision weight gets them cast once at the end. No host sync: the loop bounds
// are shapes only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"

namespace fusedlm {
namespace lce {

using at::Tensor;

// Rows per chunk: as many as keep the float32 logits buffer (4V bytes a row), the low-precision
// GEMM output it is cast from (2V) and the float32 copy of x's rows (4d) within kChunkBytes, at
// least kMinChunkRows (so the GEMMs keep their efficiency at any V), at most the token count.
// Why not smaller: every chunk's dW += L^T x_c reads and writes all of dW (V d floats, 154 MB at
// 50304 x 768), and the forward GEMM streams all of W, so the chunk count multiplies that traffic.
constexpr int64_t kChunkBytes = int64_t(64) << 20;
constexpr int64_t kMinChunkRows = 16;

inline int64_t chunk_rows(int64_t n, int64_t vocab, int64_t d, bool low_precision) {
  const int64_t per_row = 4 * vocab + (low_precision ? 2 * vocab + 4 * d : 0);
  const int64_t rows = std::max(kChunkBytes / std::max<int64_t>(per_row, 1), kMinChunkRows);
  return std::max<int64_t>(std::min(rows, n), 1);
}

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

// L (rows of the buffer) = x_c W^T + b, float32.
inline void chunk_logits(const Problem& p, const Tensor& xc, const Tensor& weight, const std::optional<Tensor>& bias,
                         Tensor& logits) {
  const Tensor wt = weight.t();
  if (!p.low_precision) {
    if (bias.has_value()) {
      at::addmm_out(logits, *bias, xc, wt);
    } else {
      at::mm_out(logits, xc, wt);
    }
  } else {  // the projection in x's dtype, as F.linear does, then widened
    logits.copy_(bias.has_value() ? at::addmm(*bias, xc, wt) : at::mm(xc, wt));
  }
}

// rows_fwd(logits (T, V) f32, target (T,), loss (T,) f32, lse (T,) f32)
template <typename RowsFwd>
std::tuple<Tensor, Tensor> forward(const char* op, const Tensor& x, const Tensor& weight,
                                   const std::optional<Tensor>& bias, const Tensor& target, at::DeviceType device_type,
                                   RowsFwd rows_fwd) {
  const Problem p = check_inputs(op, x, weight, bias, target, device_type);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor loss = at::empty({p.n}, f32), lse = at::empty({p.n}, f32);
  if (p.n == 0) return {loss, lse};
  const int64_t chunk = chunk_rows(p.n, p.vocab, p.d, p.low_precision);
  Tensor buffer = at::empty({chunk, p.vocab}, f32);
  for (int64_t s = 0; s < p.n; s += chunk) {
    const int64_t rows = std::min(chunk, p.n - s);
    Tensor logits = buffer.narrow(0, 0, rows);
    chunk_logits(p, x.narrow(0, s, rows), weight, bias, logits);
    Tensor l = loss.narrow(0, s, rows), e = lse.narrow(0, s, rows);
    rows_fwd(logits, target.narrow(0, s, rows), l, e);
  }
  return {loss, lse};
}

// rows_bwd(logits (T, V) f32 in: logits, out: dlogits, target (T,), lse (T,), dloss (T,))
template <typename RowsBwd>
std::tuple<Tensor, Tensor, Tensor> backward(const char* op, const Tensor& dloss, const Tensor& x, const Tensor& weight,
                                            const std::optional<Tensor>& bias, const Tensor& target, const Tensor& lse,
                                            bool has_bias, at::DeviceType device_type, RowsBwd rows_bwd) {
  const Problem p = check_inputs(op, x, weight, bias, target, device_type);
  TORCH_CHECK(has_bias == bias.has_value(), op, ": has_bias must say whether bias is given");
  checks::check_arg(op, "lse", lse, x.device(), {p.n}, at::kFloat, " (the rows of x)");
  checks::check_arg(op, "dloss", dloss, x.device(), {p.n}, at::kFloat, " (the rows of x)");
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({p.n, p.d}, x.options());
  Tensor dweight32 = at::zeros({p.vocab, p.d}, f32);
  Tensor dbias32 = at::zeros({has_bias ? p.vocab : 0}, f32);
  if (p.n > 0) {
    const int64_t chunk = chunk_rows(p.n, p.vocab, p.d, p.low_precision);
    Tensor buffer = at::empty({chunk, p.vocab}, f32);
    for (int64_t s = 0; s < p.n; s += chunk) {
      const int64_t rows = std::min(chunk, p.n - s);
      const Tensor xc = x.narrow(0, s, rows);
      Tensor dlogits = buffer.narrow(0, 0, rows);
      chunk_logits(p, xc, weight, bias, dlogits);
      rows_bwd(dlogits, target.narrow(0, s, rows), lse.narrow(0, s, rows), dloss.narrow(0, s, rows));
      Tensor dxc = dx.narrow(0, s, rows);
      if (!p.low_precision) {
        at::mm_out(dxc, dlogits, weight);
        dweight32.addmm_(dlogits.t(), xc);
      } else {  // dx and dW from dlogits rounded to x's dtype, as autograd of F.linear would
        const Tensor dl = dlogits.to(x.scalar_type());
        at::mm_out(dxc, dl, weight);
#if FUSEDLM_ADDMM_OUT_DTYPE
        // 16-bit inputs, float32 accumulation and output in one cuBLAS call (tensor cores). The
        // float32 GEMM this replaces ran without tensor cores: on an H200 it made the backward of
        // 16384 x 2048 x 128256 bf16 take 374 ms against eager's 35 ms.
        at::addmm_out(dweight32, dweight32, dl.t(), xc, at::kFloat);
#else
        dweight32.addmm_(dlogits.t(), xc.to(at::kFloat));
#endif
      }
      if (has_bias) dbias32.add_(dlogits.sum(0));
    }
  }
  Tensor dweight = p.low_precision ? dweight32.to(weight.scalar_type()) : dweight32;
  Tensor dbias = has_bias ? dbias32.to(weight.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace lce
}  // namespace fusedlm
