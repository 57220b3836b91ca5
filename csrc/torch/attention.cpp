// The fusedlm::attention_fwd / attention_bwd schemas (the CUDA impl in attention_cuda.cpp registers
// against these) and their CPU implementations: check the tensors, allocate the outputs, call the
// torch-free kernels of csrc/cpu/attention.cpp. The op contract is in python/fusedlm/ops/attention.py.
//
// q, k, v, out and dout are taken through their strides when the head dim is dense (a transposed
// (B, N, H, D) view costs no copy); otherwise they are copied once. out, lse and the gradients are
// allocated contiguous.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/attention.h"

namespace {

using at::Tensor;
namespace cpu = fusedlm::cpu;
using fusedlm::checks::shape_str;

cpu::Isa kernel_isa(const char* op) {
  cpu::Isa isa;
  const char* error = nullptr;
  TORCH_CHECK(cpu::select_isa(&isa, &error), op, ": ", error);
  return isa;
}

// A 4-D CPU tensor of float32 or bfloat16, dense along the head dim (copied once when it is not).
Tensor check_bhnd(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, H, N, D), got shape ", shape_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  return t.stride(3) == 1 || t.size(3) <= 1 ? t : t.contiguous();
}

void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name,
                at::IntArrayRef sizes, const char* what) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " (the device of ", ref_name,
              "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", shape_str(sizes), what, ", got ",
              shape_str(t.sizes()));
}

// lse / dlse: (B, Hq, Nq) float32 on the CPU (copied when not contiguous).
Tensor check_rows(const char* op, const char* name, const Tensor& t, at::IntArrayRef rows) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == rows, op, ": ", name, " must have shape ", shape_str(rows), " (B, Hq, Nq of q), got ",
              shape_str(t.sizes()));
  return t.contiguous();
}

cpu::AttnStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Shapes of q (B, Hq, Nq, D) and k, v (B, Hkv, Nk, D); checks what ties them together.
cpu::AttentionShape check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  check_like(op, "k", k, q, "q", {q.size(0), k.size(1), k.size(2), q.size(3)}, " (q's batch and head dim)");
  check_like(op, "v", v, q, "q", k.sizes(), " (the shape of k)");
  const int64_t hq = q.size(1), hkv = k.size(1);
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, op, ": q heads (", std::to_string(hq), ") must be a multiple of k/v heads (",
              std::to_string(hkv), ")");
  TORCH_CHECK(q.size(3) > 0, op, ": q must have a head dim of at least 1, got shape ", shape_str(q.sizes()));
  // The kernels take scale (and scale * log2(e)) as float: both must stay finite and above 0 there.
  const float scale_f = static_cast<float>(scale);
  TORCH_CHECK(std::isfinite(scale) && scale_f > 0 && std::isfinite(scale_f * 1.4426950408889634f), op,
              ": scale must be finite and > 0 in float32 (also times log2(e)), got ", std::to_string(scale));
  return {q.size(0), hq, hkv, q.size(2), k.size(2), q.size(3)};
}

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                             double scale) {
  constexpr const char* op = "attention_fwd";
  const Tensor q = check_bhnd(op, "q", q_in);
  const Tensor k = check_bhnd(op, "k", k_in);
  const Tensor v = check_bhnd(op, "v", v_in);
  const cpu::AttentionShape shape = check_qkv(op, q, k, v, scale);

  Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({shape.batch, shape.heads_q, shape.n_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse.fill_(-INFINITY)};

  cpu::AttentionFwdArgs args{};
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.q_stride = strides_of(q);
  args.k_stride = strides_of(k);
  args.v_stride = strides_of(v);
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  args.shape = shape;
  args.causal = causal;
  args.scale = static_cast<float>(scale);
  args.dtype = q.scalar_type() == at::kBFloat16 ? cpu::DType::BFloat16 : cpu::DType::Float32;
  args.isa = kernel_isa(op);
  args.num_threads = at::get_num_threads();
  cpu::attention_fwd(args);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd_cpu(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                     const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                     const std::optional<Tensor>& dlse_in, bool causal,
                                                     double scale) {
  constexpr const char* op = "attention_bwd";
  const Tensor q = check_bhnd(op, "q", q_in);
  const Tensor k = check_bhnd(op, "k", k_in);
  const Tensor v = check_bhnd(op, "v", v_in);
  const cpu::AttentionShape shape = check_qkv(op, q, k, v, scale);
  const Tensor dout = check_bhnd(op, "dout", dout_in);
  const Tensor out = check_bhnd(op, "out", out_in);
  check_like(op, "dout", dout, q, "q", q.sizes(), " (the shape of q)");
  check_like(op, "out", out, q, "q", q.sizes(), " (the shape of q)");
  const std::vector<int64_t> rows{shape.batch, shape.heads_q, shape.n_q};
  const Tensor lse = check_rows(op, "lse", lse_in, rows);
  const Tensor dlse = dlse_in.has_value() ? check_rows(op, "dlse", *dlse_in, rows) : Tensor();

  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor dq = at::empty(q.sizes(), contiguous);
  Tensor dk = at::empty(k.sizes(), contiguous);
  Tensor dv = at::empty(v.sizes(), contiguous);
  if (dq.numel() == 0 || dk.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};

  cpu::AttentionBwdArgs args{};
  args.dout = dout.data_ptr();
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.out = out.data_ptr();
  args.dout_stride = strides_of(dout);
  args.q_stride = strides_of(q);
  args.k_stride = strides_of(k);
  args.v_stride = strides_of(v);
  args.out_stride = strides_of(out);
  args.lse = lse.data_ptr<float>();
  args.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  args.shape = shape;
  args.causal = causal;
  args.scale = static_cast<float>(scale);
  args.dtype = q.scalar_type() == at::kBFloat16 ? cpu::DType::BFloat16 : cpu::DType::Float32;
  args.isa = kernel_isa(op);
  args.num_threads = at::get_num_threads();
  cpu::attention_bwd(args);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedlm, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, bool causal, "
      "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(fusedlm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}
