// The fusedlm::layernorm_mlp_fwd / layernorm_mlp_bwd schemas (the CUDA impl in
// layernorm_mlp_cuda.cpp registers against these) and their CPU implementations. The op
// contract and the math are in python/fusedlm/ops/layernorm_mlp.py.
//
// Token blocks. The rows are processed in blocks of `token_block` rows; per block the forward
// runs the norm (the layer_norm row kernels) into a (block, d) buffer, the fc GEMM into pre_act
// (or a block buffer when recompute; without the fc bias: the passes add it where they read pre
// and the forward never writes pre back), the bias + activation pass into a (block, h) buffer, and
// the proj GEMM into y's rows, then one pass adding x and proj_bias to them (cheaper here than
// starting y as x + proj_bias with ATen's add and accumulating with a beta = 1 GEMM). Neither
// the normalised x nor the activation output ever exists for all rows; the (block, h)
// intermediates are written by one GEMM and read by the next while they are still in the
// last-level cache. The backward, per
// block: the norm again, (the fc GEMM again when recompute, into the d(pre) buffer), d(act) = dy
// proj_w, the activation-derivative pass (d(pre), in place over a recomputed pre, and act), the
// two weight-gradient GEMMs accumulating across blocks, d(xn) = d(pre) fc_w, and the layer_norm
// backward row kernel with the residual's dy added. Weight gradients (each in the orientation
// whose GEMM is faster, transposed into place at the end): the first block's GEMMs
// write them, the next ones add (addmm_, beta = 1): fp32 inputs accumulate straight into fp32;
// bf16 ones in two blocks too (the GEMM adds the first block's bf16 result in fp32 and rounds
// once); bf16 over more blocks through a bf16 GEMM per block (fp32 accumulation inside it, as
// ATen's bf16 matmul) whose results are summed in fp32, the last block rounding the sum into the
// bf16 gradient. All of it runs in a fixed order: the gradients have the same bits on every run.
//
// Each pass is a profiler range (RECORD_FUNCTION, "fusedlm::cpu::<pass>"): torch.profiler and
// `python -m fusedlm.benchmarks.profile` show them beside the ATen GEMMs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/layer_norm.h"
#include "cpu/layernorm_mlp.h"
#include "layernorm_mlp_args.h"

namespace {

using at::Tensor;
namespace cpu = fusedlm::cpu;
namespace lm = fusedlm::layernorm_mlp;

// Target bytes of one (block, fc_out) intermediate. Measured at 4096 x 768 x 3072 on the 2-core
// development CPU (32 MiB L3, 1 MiB L2 per core), forward+backward over the six GEMMs alone, while
// other processes kept the load average at 7-10:
//   one thread:   fp32 512 rows 1.03x, 1024 1.05x, 2048 1.14x, one block 1.10x;
//                 bf16 512 1.06x, 1024 1.06x, 2048 1.04x, one block 1.08x
//   two threads:  fp32 512 1.47x, 1024 1.24x, 2048 1.14x, one block 1.08x;
//                 bf16 512 2.28x, 1024 1.67x, 2048 1.34x, one block 1.27x
// One thread shows the cache at work (blocks of 512-2048 rows beat one block); with two threads
// on a loaded machine every parallel region (each GEMM, pass and norm call: about ten per block)
// waits for a descheduled thread, so fewer, larger blocks win. On the quiet machine (load average
// 0.6-1.2, 2026-11-30; interleaved medians of 15, against the six GEMMs):
//   fp32 512 1.080x, 1024 1.044x / 1.024x, 1536 1.033x, 2048 1.018x / 1.009x, 3072 (3072 + 1024) 1.055x;
//   bf16 512 1.072x, 1024 1.045x, 1536 1.036x, 2048 1.026x, 3072 1.081x, one block 1.12x.
// 24 MiB: 2048 rows at h = 3072 in both dtypes (the row cap below).
constexpr int64_t kBlockBytes = int64_t(24) << 20;

// Rows per token block: about kBlockBytes of (block, fc_out) intermediate, 64-row multiples in
// [128, 2048]; one block when that leaves less than half a block over. FUSEDLM_LNMLP_BLOCK_ROWS
// (read on every call) forces a block height, so that tests cover many blocks with few rows.
int64_t token_block(int64_t m, int64_t fc_out, int64_t elem_bytes) {
  const char* force = std::getenv("FUSEDLM_LNMLP_BLOCK_ROWS");
  if (force != nullptr && std::atoll(force) > 0) return std::max<int64_t>(1, std::min<int64_t>(m, std::atoll(force)));
  int64_t rows = kBlockBytes / std::max<int64_t>(1, fc_out * elem_bytes);
  rows = std::min<int64_t>(2048, std::max<int64_t>(128, rows / 64 * 64));
  return m <= rows + rows / 2 ? std::max<int64_t>(m, 1) : rows;
}

// An environment switch read on every call: "0" false, any other value true, unset `otherwise`.
bool env_flag(const char* name, bool otherwise) {
  const char* v = std::getenv(name);
  return v == nullptr ? otherwise : std::string(v) != "0";
}

cpu::Isa kernel_isa(const char* op) {
  cpu::Isa isa;
  const char* error = nullptr;
  TORCH_CHECK(cpu::select_isa(&isa, &error), op, ": ", error);
  return isa;
}

cpu::DType cpu_dtype(const char* op, const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16 on the CPU, got ", x.scalar_type());
  return x.scalar_type() == at::kFloat ? cpu::DType::Float32 : cpu::DType::BFloat16;
}

const void* ptr_or_null(const std::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Row r of a contiguous (M, n) tensor.
void* row_ptr(const Tensor& t, int64_t r) {
  return static_cast<char*>(t.data_ptr()) + r * t.size(1) * int64_t(t.element_size());
}

// The norm of rows [r0, r0 + rows) of x into xn (block rows), statistics into mean/rstd + r0.
void norm_rows(const Tensor& x, int64_t r0, int64_t rows, const Tensor& norm_weight,
               const std::optional<Tensor>& norm_bias, const Tensor& xn, float* mean, float* rstd, double eps,
               bool rms, cpu::DType dtype, cpu::Isa isa) {
  cpu::LayerNormFwdArgs a{};
  a.x = row_ptr(x, r0);
  a.residual = nullptr;
  a.weight = norm_weight.data_ptr();
  a.bias = ptr_or_null(norm_bias);
  a.y = xn.data_ptr();
  a.h = nullptr;
  a.mean = rms ? nullptr : mean;
  a.rstd = rstd;
  a.rows = rows;
  a.cols = x.size(1);
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  a.dtype = dtype;
  a.isa = isa;
  a.num_threads = at::get_num_threads();
  RECORD_FUNCTION("fusedlm::cpu::layer_norm_fwd", {});
  cpu::layer_norm_fwd(a);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layernorm_mlp_fwd_cpu(
    const Tensor& x, const Tensor& norm_weight, const std::optional<Tensor>& norm_bias, const Tensor& fc_weight,
    const std::optional<Tensor>& fc_bias, const Tensor& proj_weight, const std::optional<Tensor>& proj_bias,
    double eps, bool rms, c10::string_view activation_name, bool residual, bool recompute) {
  constexpr const char* op = "layernorm_mlp_fwd";
  const std::string activation(activation_name.data(), activation_name.size());
  const lm::Dims dims = lm::check_params(op, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps,
                                         rms, activation, at::kCPU);
  const cpu::DType dtype = cpu_dtype(op, x);
  const cpu::Isa isa = kernel_isa(op);
  return lm::forward(
      x, fc_weight, std::nullopt, proj_weight, proj_bias, dims, rms, residual, recompute,
      token_block(dims.m, dims.fc_out, x.element_size()),
      [&](int64_t r0, int64_t rows, const Tensor& xn, float* mean, float* rstd) {
        norm_rows(x, r0, rows, norm_weight, norm_bias, xn, mean, rstd, eps, rms, dtype, isa);
      },
      [&](const Tensor& pre_b, const Tensor& act, int64_t rows) {
        cpu::MlpActFwdArgs aa{};
        aa.pre = pre_b.data_ptr();
        aa.bias = ptr_or_null(fc_bias);
        aa.act = act.data_ptr();
        aa.rows = rows;
        aa.h = dims.h;
        aa.activation = static_cast<cpu::Activation>(dims.activation);
        aa.dtype = dtype;
        aa.isa = isa;
        aa.num_threads = at::get_num_threads();
        RECORD_FUNCTION("fusedlm::cpu::mlp_act_fwd", {});
        cpu::mlp_act_fwd(aa);
      },
      [&](const Tensor& y_b, int64_t r0) {
        cpu::MlpAddRowsArgs ar{};
        ar.y = y_b.data_ptr();
        ar.res = residual ? row_ptr(x, r0) : nullptr;
        ar.bias = ptr_or_null(proj_bias);
        ar.rows = y_b.size(0);
        ar.cols = dims.d;
        ar.dtype = dtype;
        ar.isa = isa;
        ar.num_threads = at::get_num_threads();
        RECORD_FUNCTION("fusedlm::cpu::mlp_add_rows", {});
        cpu::mlp_add_rows(ar);
      });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_mlp_bwd_cpu(
    const Tensor& dy, const Tensor& x, const Tensor& norm_weight, const std::optional<Tensor>& norm_bias,
    const Tensor& fc_weight, const std::optional<Tensor>& fc_bias, const Tensor& proj_weight,
    const std::optional<Tensor>& proj_bias, const Tensor& pre_act, double eps, bool rms,
    c10::string_view activation_name, bool residual) {
  constexpr const char* op = "layernorm_mlp_bwd";
  const std::string activation(activation_name.data(), activation_name.size());
  const lm::Dims dims = lm::check_params(op, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps,
                                         rms, activation, at::kCPU);
  const bool recompute = lm::check_saved(op, dims, x, dy, pre_act);
  const cpu::DType dtype = cpu_dtype(op, x);
  const cpu::Isa isa = kernel_isa(op);
  const int64_t m = dims.m, d = dims.d, fc_out = dims.fc_out, h = dims.h;
  const bool bf16 = dtype == cpu::DType::BFloat16;
  const int nt = at::get_num_threads();

  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = at::empty({m, d}, x.options());
  Tensor dnorm_w = at::zeros({d}, f32);
  Tensor dnorm_b = at::zeros({norm_bias.has_value() ? d : 0}, f32);
  Tensor dfc_b = at::zeros({fc_bias.has_value() ? fc_out : 0}, f32);
  Tensor dproj_b = at::zeros({proj_bias.has_value() ? d : 0}, f32);

  const int64_t block = token_block(m, fc_out, x.element_size());
  Tensor xn = at::empty({block, d}, x.options());  // the normalised x, then d(xn)
  Tensor dact = at::empty({block, h}, x.options());  // d(act), then act
  Tensor dpre = at::empty({block, fc_out}, x.options());  // (the recomputed pre, then) d(pre)
  // The block's statistics, recomputed by the forward's kernel (the same bits): not saved by the forward.
  Tensor stats = at::empty({2 * block}, f32);
  Tensor ln_ws = at::empty({cpu::layer_norm_bwd_workspace_floats(block, d)}, f32);
  // The weight gradients. The first block's GEMMs write them, the others add (beta = 1): fp32
  // accumulates in fp32; bf16 over two blocks rounds once more (the first block's result) than one
  // GEMM over all rows would. bf16 over more blocks: each block's GEMMs write dfc_w / dproj_w in bf16
  // and fold_bf16_block sums them in fp32 into dfc_acc / dproj_acc (the last block rounds the sum
  // back into them), so that the rounding error does not grow with the number of blocks.
  const int64_t num_blocks = (m + block - 1) / block;
  const bool bf16_fold = bf16 && num_blocks > 2;
  const auto zeros_if_no_rows = [&](at::IntArrayRef shape, at::TensorOptions o) {
    return m == 0 ? at::zeros(shape, o) : at::empty(shape, o);
  };
  // Each weight gradient a^T b (a, b: the block's (rows, p) and (rows, q) operands) is accumulated
  // over two or more blocks in the orientation whose GEMM output has the longer side as its rows, a
  // flipped one as b^T a, (q, p), and transposed into place at the end (cpu::transpose): there
  // oneDNN's accumulating GEMMs measured faster by more than the transpose costs. One block (one
  // GEMM) skips the flip. The backward with the flip against without, d = 768, h = 3072, two
  // threads (`python -m fusedlm.benchmarks.paired --op layernorm_mlp --mode backward --env
  // FUSEDLM_LNMLP_FLIP=...`, median per-round differences, 2026-12-01): bf16 512 rows (one block)
  // 0.8 ms slower, 4096 (two blocks) 1.0 faster; fp32 512 rows 1.4 slower, 4096 4.5 faster, 16384
  // (eight blocks) 26 faster. FUSEDLM_LNMLP_FLIP (read on every call) forces it: 1 flips whenever the
  // shape says so, 0 never.
  const bool flip_ok = env_flag("FUSEDLM_LNMLP_FLIP", num_blocks >= 2);
  const bool flip_fc = flip_ok && d > fc_out, flip_proj = flip_ok && h > d;
  const auto shape = [](int64_t p, int64_t q, bool flip) {
    return flip ? std::vector<int64_t>{q, p} : std::vector<int64_t>{p, q};
  };
  Tensor dfc_w = zeros_if_no_rows(shape(fc_out, d, flip_fc), bf16 ? x.options() : f32);
  Tensor dproj_w = zeros_if_no_rows(shape(d, h, flip_proj), bf16 ? x.options() : f32);
  Tensor dfc_acc = bf16_fold ? at::empty(shape(fc_out, d, flip_fc), f32) : Tensor();
  Tensor dproj_acc = bf16_fold ? at::empty(shape(d, h, flip_proj), f32) : Tensor();
  // g = a^T b (flipped: b^T a), or g += that.
  const auto weight_grad = [](Tensor& g, bool flip, const Tensor& a, const Tensor& b, bool add) {
    const Tensor& l = flip ? b : a;
    const Tensor& r = flip ? a : b;
    if (add) {
      g.addmm_(l.t(), r);
    } else {
      at::mm_out(g, l.t(), r);
    }
  };

  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t rows = std::min(block, m - r0);
    norm_rows(x, r0, rows, norm_weight, norm_bias, xn, stats.data_ptr<float>(), stats.data_ptr<float>() + block, eps,
              rms, dtype, isa);
    const Tensor xn_b = xn.narrow(0, 0, rows);
    Tensor dpre_b = dpre.narrow(0, 0, rows);
    if (recompute) at::mm_out(dpre_b, xn_b, fc_weight.t());  // pre without its bias, as the forward saves it
    const Tensor pre_b = recompute ? dpre_b : pre_act.narrow(0, r0, rows);
    const Tensor dy_b = dy.narrow(0, r0, rows);
    Tensor dact_b = dact.narrow(0, 0, rows);
    at::mm_out(dact_b, dy_b, proj_weight);

    cpu::MlpActBwdArgs ab{};
    ab.pre = pre_b.data_ptr();
    ab.bias = ptr_or_null(fc_bias);
    ab.dact_act = dact_b.data_ptr();
    ab.dpre = dpre_b.data_ptr();
    ab.dbias_acc = fc_bias.has_value() ? dfc_b.data_ptr<float>() : nullptr;
    ab.rows = rows;
    ab.h = h;
    ab.activation = static_cast<cpu::Activation>(dims.activation);
    ab.dtype = dtype;
    ab.isa = isa;
    ab.num_threads = nt;
    {
      RECORD_FUNCTION("fusedlm::cpu::mlp_act_bwd", {});
      cpu::mlp_act_bwd(ab);
    }

    // dproj_w += dy^T act, dfc_w += d(pre)^T xn.
    const bool add = r0 > 0 && !bf16_fold;
    weight_grad(dproj_w, flip_proj, dy_b, dact_b, add);
    weight_grad(dfc_w, flip_fc, dpre_b, xn_b, add);
    if (bf16_fold) {
      const auto step = r0 == 0 ? cpu::FoldStep::First : r0 + rows == m ? cpu::FoldStep::Last : cpu::FoldStep::Middle;
      cpu::fold_bf16_block(dproj_w.data_ptr(), dproj_acc.data_ptr<float>(), d * h, dfc_w.data_ptr(),
                           dfc_acc.data_ptr<float>(), fc_out * d, step, nt);
    }
    Tensor dxn_b = xn.narrow(0, 0, rows);
    at::mm_out(dxn_b, dpre_b, fc_weight);                      // d(xn) = d(pre) fc_w

    cpu::LayerNormBwdArgs lb{};
    lb.dy = dxn_b.data_ptr();
    lb.dh = residual ? dy_b.data_ptr() : nullptr;
    lb.h = row_ptr(x, r0);
    lb.weight = norm_weight.data_ptr();
    lb.mean = rms ? nullptr : stats.data_ptr<float>();
    lb.rstd = stats.data_ptr<float>() + block;
    lb.dx = row_ptr(dx, r0);
    lb.dweight = nullptr;
    lb.dbias = nullptr;
    lb.dweight_acc = dnorm_w.data_ptr<float>();
    lb.dbias_acc = norm_bias.has_value() ? dnorm_b.data_ptr<float>() : nullptr;
    lb.workspace = ln_ws.data_ptr<float>();
    lb.rows = rows;
    lb.cols = d;
    lb.rms = rms;
    lb.dtype = dtype;
    lb.isa = isa;
    lb.num_threads = nt;
    RECORD_FUNCTION("fusedlm::cpu::layer_norm_bwd", {});
    cpu::layer_norm_bwd(lb);
  }
  if (proj_bias.has_value()) {
    RECORD_FUNCTION("fusedlm::cpu::column_sum", {});
    cpu::column_sum_acc(dy.data_ptr(), m, d, dtype, dproj_b.data_ptr<float>(), isa, nt);
  }
  const auto out = [&](const Tensor& acc) { return acc.to(x.scalar_type()); };
  const auto in_place = [&](const Tensor& g, bool flip) {
    if (!flip) return g;
    Tensor t = at::empty({g.size(1), g.size(0)}, g.options());
    RECORD_FUNCTION("fusedlm::cpu::transpose", {});
    cpu::transpose(g.data_ptr(), g.size(0), g.size(1), g.element_size(), t.data_ptr(), nt);
    return t;
  };
  // dfc_w and dproj_w are already in x's dtype: out() returns them without a copy
  return {dx, out(dnorm_w), out(dnorm_b), in_place(dfc_w, flip_fc), out(dfc_b), in_place(dproj_w, flip_proj),
          out(dproj_b)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedlm, m) {
  m.def(
      "layernorm_mlp_fwd(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor fc_weight, Tensor? fc_bias, "
      "Tensor proj_weight, Tensor? proj_bias, float eps, bool rms, str activation, bool residual, bool recompute) "
      "-> (Tensor y, Tensor mean, Tensor rstd, Tensor pre_act)");
  m.def(
      "layernorm_mlp_bwd(Tensor dy, Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor fc_weight, "
      "Tensor? fc_bias, Tensor proj_weight, Tensor? proj_bias, Tensor pre_act, float eps, "
      "bool rms, str activation, bool residual) -> (Tensor dx, Tensor dnorm_weight, Tensor dnorm_bias, "
      "Tensor dfc_weight, Tensor dfc_bias, Tensor dproj_weight, Tensor dproj_bias)");
}

TORCH_LIBRARY_IMPL(fusedlm, CPU, m) {
  m.impl("layernorm_mlp_fwd", &layernorm_mlp_fwd_cpu);
  m.impl("layernorm_mlp_bwd", &layernorm_mlp_bwd_cpu);
}
