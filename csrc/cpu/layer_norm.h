// LayerNorm / RMSNorm (optionally after a residual add) on the CPU, over raw pointers.
// No torch headers: csrc/torch/layer_norm.cpp checks tensors, allocates and calls these.
//
// Rows are contiguous, M rows of N columns. Element type is fp32, bf16 or fp16 (2-byte types
// passed as their raw bits); statistics, accumulation and the weight-gradient partials are fp32.
// The math is in python/fusedlm/ops/layer_norm.py's docstring.
#pragma once

#include <cstdint>

namespace fusedlm {
namespace cpu {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Instruction set of the row kernels. Avx512 needs avx512f/bw/vl/dq (the 2-byte conversions
// use F16C-style vcvtph2ps/vcvtps2ph and integer round-to-nearest-even for bf16, bit-exact
// with torch's rounding).
enum class Isa : int { Scalar = 0, Avx512 = 1 };

const char* isa_name(Isa isa);

// The ISA to run with: the environment variable FUSEDLM_CPU_ISA (read on every call, so a test
// can switch it) set to "scalar" or "avx512" forces one; unset, empty or "auto" takes the best
// this CPU supports. Returns false and sets *error (a static string) when the value is unknown
// or names an ISA this CPU lacks.
bool select_isa(Isa* isa, const char** error);

// Whether AVX-512 kernels may also use the avx512_bf16 instructions (vcvtneps2bf16, vdpbf16ps)
// for bf16 tensors: the CPU has them and the environment variable FUSEDLM_CPU_BF16 (read on every
// call) is not "0". FUSEDLM_CPU_BF16=0 runs what an AVX-512 CPU without them runs, so that tests
// cover both paths on one machine.
bool cpu_has_avx512_bf16();

// The AVX-512 kernels write outputs of 16 MiB or more per call with non-temporal stores when
// every row is 64-byte aligned. FUSEDLM_CPU_STREAM=1 forces that for any size (where aligned),
// =0 never; read on every call. The results are the same bits either way.

struct LayerNormFwdArgs {
  const void* x;         // (M, N)
  const void* residual;  // (M, N) or nullptr
  const void* weight;    // (N,)
  const void* bias;      // (N,) or nullptr
  void* y;               // (M, N) out
  void* h;               // (M, N) out, x + residual rounded to the element type; nullptr without residual
  float* mean;           // (M,) out; nullptr when rms
  float* rstd;           // (M,) out
  int64_t rows;
  int64_t cols;
  float eps;
  bool rms;
  DType dtype;
  Isa isa;
  int num_threads;
};

struct LayerNormBwdArgs {
  const void* dy;       // (M, N)
  const void* dh;       // (M, N) gradient arriving at h, or nullptr
  const void* h;        // (M, N) the normalised input
  const void* weight;   // (N,)
  const float* mean;    // (M,); ignored when rms
  const float* rstd;    // (M,)
  void* dx;             // (M, N) out
  void* dweight;        // (N,) out
  void* dbias;          // (N,) out, or nullptr (no bias)
  float* workspace;     // layer_norm_bwd_workspace_floats(rows, cols) floats, any contents
  // Optional (N,) fp32 accumulators: when dweight_acc is set, the call adds its fp32 sums to
  // dweight_acc (and dbias_acc) instead of writing dweight/dbias, so that a caller processing
  // rows in blocks (layernorm_mlp.cpp) keeps one fp32 sum over all of them.
  float* dweight_acc = nullptr;
  float* dbias_acc = nullptr;
  int64_t rows;
  int64_t cols;
  bool rms;
  DType dtype;
  Isa isa;
  int num_threads;
};

void layer_norm_fwd(const LayerNormFwdArgs& args);

// dweight/dbias are reduced deterministically: rows are cut into chunks whose size depends on
// (rows, cols) only, each chunk writes fp32 partial sums into the workspace, and the partials
// are summed in chunk order. The same inputs give the same bits for any num_threads.
int64_t layer_norm_bwd_workspace_floats(int64_t rows, int64_t cols);
void layer_norm_bwd(const LayerNormBwdArgs& args);

}  // namespace cpu
}  // namespace fusedlm
