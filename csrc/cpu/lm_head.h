// The row pass of lm_head_softmax on the CPU, over raw pointers (no torch headers):
// csrc/torch/lm_head.cpp runs the projection through ATen and calls this on its output.
// The op contract and its math are in python/fusedlm/ops/lm_head.py.
//
// Per row r of `rows` rows of V logits z (float32 or bfloat16; row r starts at
// logits + r * logits_stride elements), into row r of the float32 probs (contiguous, V a row):
//   t_v = z_v * inv_temperature,  m = max_v t_v,  p_v = exp(t_v - m) / sum_u exp(t_u - m)
// Subtracting the row max keeps every exp in (0, 1]: no overflow for any logit or temperature.
// With float32 logits the pass may run in place (logits == probs, logits_stride == V).
#pragma once

#include <cstdint>

#include "cpu/layer_norm.h"  // DType, Isa, select_isa

namespace fusedlm {
namespace cpu {

struct LmHeadRowsArgs {
  const void* logits;  // (rows, V) of `dtype`, row stride logits_stride; may alias probs (float32 only)
  float* probs;        // (rows, V) out, contiguous
  int64_t rows;
  int64_t vocab;
  int64_t logits_stride;
  float inv_temperature;  // 1 / temperature, > 0
  DType dtype;            // Float32 or BFloat16
  Isa isa;
  int num_threads;
};

void lm_head_softmax_rows(const LmHeadRowsArgs& args);

}  // namespace cpu
}  // namespace fusedlm
