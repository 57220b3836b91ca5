// The fused part of the chunked linear cross-entropy on the CPU, over raw pointers (no torch
// headers): csrc/torch/softmax_output.cpp runs the GEMMs through ATen into a float32 chunk of
// logits and calls these on it. The math is in python/fusedlm/ops/softmax_output.py.
//
// Per row r of `rows` rows of V float32 logits z (row-major, contiguous), target t = target[r]:
//   c = softcap > 0 ? softcap * tanh(z / softcap) : z
//   lse = log sum_v exp(c_v)
//   loss = (1 - eps) (lse - c_t) + eps (lse - mean_v c_v) + z_loss * lse^2      (eps = label_smoothing)
// A row whose target is ignore_index has loss 0 (its lse is still written). A target outside
// [0, V) that is not ignore_index is never read: that row's loss is NaN and its gradient 0.
#pragma once

#include <cstdint>

#include "cpu/layer_norm.h"  // Isa, select_isa

namespace fusedlm {
namespace cpu {

struct CrossEntropyRowsArgs {
  float* logits;          // (rows, V) in: z; forward: clobbered; backward: out dlogits (in place)
  const int64_t* target;  // (rows,)
  float* loss;            // (rows,) out (forward only)
  float* lse;             // (rows,) out in forward, in for backward
  const float* dloss;     // (rows,) upstream gradient per token (backward only)
  int64_t rows;
  int64_t vocab;
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
  float softcap;  // <= 0: none
  Isa isa;
  int num_threads;
};

// Forward: loss and lse of every row.
void cross_entropy_rows_fwd(const CrossEntropyRowsArgs& args);

// Backward, in place: logits := dloss_r * dloss_r/dz, i.e. with p = softmax(c), a = 1 + 2 z_loss lse
//   dc_v = dloss_r * (a p_v - (1 - eps) [v == t] - eps / V),  dz_v = dc_v * (1 - (c_v / softcap)^2)
// Rows with an ignored or out-of-range target get 0.
void cross_entropy_rows_bwd(const CrossEntropyRowsArgs& args);

}  // namespace cpu
}  // namespace fusedlm
