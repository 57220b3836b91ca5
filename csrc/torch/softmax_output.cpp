// The fusedlm::linear_cross_entropy_fwd / _bwd schemas (the CUDA impl in softmax_output_cuda.cpp
// registers against these) and their CPU implementations: ATen GEMMs (MKL / oneDNN) over tiles of
// tokens x vocabulary, with the OpenMP / AVX-512 pass of csrc/cpu/softmax_output.cpp on each
// tile. Contract and math: python/fusedlm/ops/softmax_output.py.
//
// The tiles (T tokens x Vb vocabulary columns, a float32 buffer L of at most kTileBytes, the only
// V-sized activation; Wb = rows [v0, v0 + Vb) of W, x_c = the chunk's T rows of x):
//   forward, per token chunk, per vocabulary block in order:
//     L = x_c Wb^T + b_b;  merge max / sum exp / sum c into each token's running stats;
//     after the last block: lse, loss
//   backward, per token chunk, per vocabulary block:
//     L = x_c Wb^T + b_b (the same GEMM as forward: the same logits);  L := dlogits (saved lse)
//     dx_c += L Wb  (K = Vb);  dWb += L^T x_c  (K = T: each block of dW written once per chunk)
// Why vocabulary blocks and not token chunks over all of V (this driver's first scheme): with
// the same 64 MiB, a chunk over all V holds 333 tokens, so the
// logits GEMM has M = 333 and every backward chunk re-packs all of W and reads and writes all of
// dW (154 MB at 50304 x 768) with K = 333. Measured at 8192 x 768 x 50304 fp32 (loaded machine,
// phase timers): logits GEMM 9.9 s -> 7.3 s, whole forward+backward 32.9 s -> 28.8 s; the four
// GEMMs are now 98% of the time (about 90 GFLOP/s per core each, MKL's rate for 2048^3), the
// fused passes 1.5%.
// Deterministic: a fixed accumulation order for a given shape; no host sync.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "cpu/softmax_output.h"
#include "softmax_output_args.h"

namespace {

using at::Tensor;
namespace cpu = fusedlm::cpu;
namespace lce = fusedlm::lce;

// The tiling: up to kTileRows tokens per chunk (a longer K for the dW GEMM, dW accumulated only
// across chunks), and as many vocabulary columns (a multiple of 64, so that rows stay 256-byte
// aligned for the GEMM and AVX-512) as keep the tile's bytes within kTileBytes: the float32 logits
// (4 bytes an element) and, for bf16 / fp16, the GEMM output they are widened from (2 more).
constexpr int64_t kTileBytes = int64_t(64) << 20;
constexpr int64_t kTileRows = 8192;

struct Tiling {
  int64_t rows, cols;
};

Tiling tiling(const lce::Problem& p) {
  const int64_t rows = std::max<int64_t>(std::min(p.n, kTileRows), 1);
  const int64_t per_element = p.low_precision ? 6 : 4;
  int64_t cols = kTileBytes / (per_element * rows) / 64 * 64;
  cols = std::min(std::max<int64_t>(cols, 64), p.vocab);
  return {rows, cols};
}

cpu::CrossEntropyTileArgs tile_args(const char* op, Tensor& logits, int64_t col0, int64_t vocab, const Tensor& target,
                                    int64_t ignore_index, double label_smoothing, double z_loss,
                                    std::optional<double> softcap) {
  cpu::CrossEntropyTileArgs a{};
  const char* error = nullptr;
  TORCH_CHECK(cpu::select_isa(&a.isa, &error), op, ": ", error);
  a.logits = logits.data_ptr<float>();
  a.target = target.data_ptr<int64_t>();
  a.rows = logits.size(0);
  a.cols = logits.size(1);
  a.col0 = col0;
  a.vocab = vocab;
  a.ignore_index = ignore_index;
  a.label_smoothing = static_cast<float>(label_smoothing);
  a.z_loss = static_cast<float>(z_loss);
  a.softcap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  a.num_threads = at::get_num_threads();
  return a;
}

// The buffers of one tiling, reused by every tile.
struct TileBuffers {
  Tensor logits;  // (rows * cols,) float32
  Tensor narrow;  // (rows * cols,) x's dtype, the GEMM output for bf16 / fp16; undefined for float32

  TileBuffers(const lce::Problem& p, const Tiling& t, const Tensor& x)
      : logits(at::empty({t.rows * t.cols}, x.options().dtype(at::kFloat))),
        narrow(p.low_precision ? at::empty({t.rows * t.cols}, x.options()) : Tensor()) {}

  // L (rows, cols) float32 = x_c Wb^T + b_b, contiguous; in x's dtype first for bf16 / fp16, as F.linear.
  Tensor logits_tile(const Tensor& xc, const Tensor& wb, const std::optional<Tensor>& bb) {
    const int64_t rows = xc.size(0), cols = wb.size(0);
    Tensor out = logits.narrow(0, 0, rows * cols).view({rows, cols});
    Tensor gemm = narrow.defined() ? narrow.narrow(0, 0, rows * cols).view({rows, cols}) : out;
    if (bb.has_value()) {
      at::addmm_out(gemm, *bb, xc, wb.t());
    } else {
      at::mm_out(gemm, xc, wb.t());
    }
    if (narrow.defined()) out.copy_(gemm);
    return out;
  }
};

std::optional<Tensor> bias_block(const std::optional<Tensor>& bias, int64_t v0, int64_t cols) {
  return bias.has_value() ? std::optional<Tensor>(bias->narrow(0, v0, cols)) : std::nullopt;
}

std::tuple<Tensor, Tensor> linear_cross_entropy_fwd_cpu(const Tensor& x, const Tensor& weight,
                                                        const std::optional<Tensor>& bias, const Tensor& target,
                                                        int64_t ignore_index, double label_smoothing, double z_loss,
                                                        std::optional<double> softcap) {
  constexpr const char* op = "linear_cross_entropy_fwd";
  lce::check_options(op, label_smoothing, z_loss, softcap);
  const lce::Problem p = lce::check_inputs(op, x, weight, bias, target, at::kCPU);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor loss = at::empty({p.n}, f32), lse = at::empty({p.n}, f32);
  if (p.n == 0) return {loss, lse};
  const Tiling t = tiling(p);
  TileBuffers buffers(p, t, x);
  Tensor stats = at::empty({t.rows, 4}, f32);  // cpu::CrossEntropyRowStats per token
  static_assert(sizeof(cpu::CrossEntropyRowStats) == 4 * sizeof(float), "stats layout");
  for (int64_t s = 0; s < p.n; s += t.rows) {
    const int64_t rows = std::min(t.rows, p.n - s);
    const Tensor xc = x.narrow(0, s, rows), tc = target.narrow(0, s, rows);
    for (int64_t v0 = 0; v0 < p.vocab; v0 += t.cols) {
      const int64_t cols = std::min(t.cols, p.vocab - v0);
      Tensor logits = buffers.logits_tile(xc, weight.narrow(0, v0, cols), bias_block(bias, v0, cols));
      cpu::CrossEntropyTileArgs a = tile_args(op, logits, v0, p.vocab, tc, ignore_index, label_smoothing, z_loss,
                                              softcap);
      a.stats = reinterpret_cast<cpu::CrossEntropyRowStats*>(stats.data_ptr<float>());
      a.loss = loss.data_ptr<float>() + s;
      a.lse = lse.data_ptr<float>() + s;
      cpu::cross_entropy_tile_fwd(a);
    }
  }
  return {loss, lse};
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_bwd_cpu(
    const Tensor& dloss, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& target, const Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, bool has_bias) {
  constexpr const char* op = "linear_cross_entropy_bwd";
  lce::check_options(op, label_smoothing, z_loss, softcap);
  const lce::Problem p = lce::check_inputs(op, x, weight, bias, target, at::kCPU);
  TORCH_CHECK(has_bias == bias.has_value(), op, ": has_bias must say whether bias is given");
  fusedlm::checks::check_arg(op, "lse", lse, x.device(), {p.n}, at::kFloat, " (the rows of x)");
  fusedlm::checks::check_arg(op, "dloss", dloss, x.device(), {p.n}, at::kFloat, " (the rows of x)");
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({p.n, p.d}, x.options());
  // float32 dW: the output itself for float32 weights, else cast once at the end.
  Tensor dweight32 = p.n == 0 ? at::zeros({p.vocab, p.d}, f32) : at::empty({p.vocab, p.d}, f32);
  Tensor dbias32 = at::zeros({has_bias ? p.vocab : 0}, f32);
  if (p.n > 0) {
    const Tiling t = tiling(p);
    TileBuffers buffers(p, t, x);
    // bf16 / fp16: dx_c accumulates over the blocks in float32, and both gradient GEMMs take float32
    // operands (the float32 dlogits; x_c and Wb widened), as the weight gradient must be float32.
    Tensor dx32 = p.low_precision ? at::empty({t.rows, p.d}, f32) : Tensor();
    for (int64_t s = 0; s < p.n; s += t.rows) {
      const int64_t rows = std::min(t.rows, p.n - s);
      const Tensor xc = x.narrow(0, s, rows), tc = target.narrow(0, s, rows);
      const Tensor xc32 = p.low_precision ? xc.to(at::kFloat) : xc;
      Tensor dxc = p.low_precision ? dx32.narrow(0, 0, rows) : dx.narrow(0, s, rows);
      for (int64_t v0 = 0; v0 < p.vocab; v0 += t.cols) {
        const int64_t cols = std::min(t.cols, p.vocab - v0);
        const Tensor wb = weight.narrow(0, v0, cols);
        Tensor dlogits = buffers.logits_tile(xc, wb, bias_block(bias, v0, cols));
        cpu::CrossEntropyTileArgs a = tile_args(op, dlogits, v0, p.vocab, tc, ignore_index, label_smoothing, z_loss,
                                                softcap);
        a.lse = const_cast<float*>(lse.data_ptr<float>()) + s;  // read only in backward
        a.dloss = dloss.data_ptr<float>() + s;
        cpu::cross_entropy_tile_bwd(a);
        const Tensor wb32 = p.low_precision ? wb.to(at::kFloat) : wb;
        if (v0 == 0) {
          at::mm_out(dxc, dlogits, wb32);
        } else {
          dxc.addmm_(dlogits, wb32);
        }
        Tensor dwb = dweight32.narrow(0, v0, cols);
        if (s == 0) {
          at::mm_out(dwb, dlogits.t(), xc32);
        } else {
          dwb.addmm_(dlogits.t(), xc32);
        }
        if (has_bias) dbias32.narrow(0, v0, cols).add_(dlogits.sum(0));
      }
      if (p.low_precision) dx.narrow(0, s, rows).copy_(dxc);
    }
  }
  Tensor dweight = p.low_precision ? dweight32.to(weight.scalar_type()) : dweight32;
  Tensor dbias = has_bias ? dbias32.to(weight.scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias};
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
