// The fused part of the tiled linear cross-entropy on the CPU, over raw pointers (no torch
// headers): csrc/torch/softmax_output.cpp runs the GEMMs through ATen into a float32 tile of
// logits and calls these on it. The math is in python/fusedlm/ops/softmax_output.py.
//
// A tile is `rows` tokens x the vocabulary columns [col0, col0 + cols) of the V logits z
// (row-major, contiguous: row stride cols). Per token r, target t = target[r]:
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

// Running statistics of one token over the vocabulary blocks seen so far (forward).
struct CrossEntropyRowStats {
  float max_c;     // max_v c_v
  float sum_exp;   // sum_v exp(c_v - max_c)
  float sum_c;     // sum_v c_v (label smoothing)
  float c_target;  // c_t once the block holding t was seen
};

struct CrossEntropyTileArgs {
  float* logits;          // (rows, cols) in: z; forward: clobbered; backward: out dlogits (in place)
  const int64_t* target;  // (rows,)
  CrossEntropyRowStats* stats;  // (rows,) forward: set by the block at col0 == 0, updated by the others
  float* loss;            // (rows,) forward: written by the last block (col0 + cols == vocab)
  float* lse;             // (rows,) forward: written by the last block; backward: in
  const float* dloss;     // (rows,) upstream gradient per token (backward only)
  int64_t rows;
  int64_t cols;
  int64_t col0;
  int64_t vocab;
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
  float softcap;  // <= 0: none
  Isa isa;
  int num_threads;
};

// Forward over one vocabulary block: merges the block's max, sum of exponentials and sum of c into
// each row's stats (the online log-sum-exp); the last block writes lse and loss. Blocks must come
// in order col0 = 0, cols0, ... up to V, so that the result does not depend on the tiling's threads.
void cross_entropy_tile_fwd(const CrossEntropyTileArgs& args);

// Backward over one tile, in place: logits := dloss_r * dloss_r/dz, i.e. with p = softmax(c),
// a = 1 + 2 z_loss lse (from the saved lse, so the tiles are independent)
//   dc_v = dloss_r * (a p_v - (1 - eps) [v == t] - eps / V),  dz_v = dc_v * (1 - (c_v / softcap)^2)
// Rows with an ignored or out-of-range target get 0.
void cross_entropy_tile_bwd(const CrossEntropyTileArgs& args);

}  // namespace cpu
}  // namespace fusedlm
