// The lm_head_softmax driver shared by the CPU (lm_head.cpp) and CUDA (lm_head_cuda.cpp) bindings:
// argument checks, the projection through ATen (MKL/oneDNN on the CPU, cuBLAS on the GPU) and the
// token-chunk loop. The fused row pass (temperature, max, exp, normalise) is the device's kernel,
// passed in as `rows_fn`. Contract and math: python/fusedlm/ops/lm_head.py.
//
//   float32 x:  probs = x W^T (+ b) straight into the (N, V) output, then rows_fn in place.
//   16-bit x:   per chunk of T tokens, L = x_c W^T (+ b) in x's dtype (as F.linear rounds it) into a
//               (T, V) buffer, then rows_fn reads L and writes float32 probabilities into the
//               output rows. The buffer is the only extra memory: at most `chunk_bytes`.
// No host sync: the loop bounds are shapes only.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "checks.h"

namespace fusedlm {
namespace lm_head {

using at::Tensor;

// Rows per chunk of the 16-bit path: as many as keep the buffer (2V bytes a row) within
// chunk_bytes, at least kMinChunkRows (each chunk's GEMM streams all of W, so tiny chunks would
// multiply that traffic), at most the token count.
constexpr int64_t kMinChunkRows = 64;

inline int64_t chunk_rows(int64_t n, int64_t vocab, int64_t chunk_bytes) {
  const int64_t rows = std::max(chunk_bytes / std::max<int64_t>(2 * vocab, 1), kMinChunkRows);
  return std::max<int64_t>(std::min(rows, n), 1);
}

// rows_fn(const Tensor& logits (T, V) of x's dtype or float32, Tensor& probs (T, V) float32,
//         float inv_temperature); logits and probs are the same tensor on the float32 path.
template <typename RowsFn>
Tensor forward(const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
               double temperature, at::DeviceType device_type, bool allow_half, int64_t chunk_bytes,
               RowsFn rows_fn) {
  const at::ScalarType dt = checks::check_projection(op, x, weight, bias, device_type, allow_half);
  const int64_t n = x.size(0), vocab = weight.size(0);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", std::to_string(temperature));
  const float inv_t = static_cast<float>(1.0 / temperature);

  Tensor probs = at::empty({n, vocab}, x.options().dtype(at::kFloat));
  if (n == 0) return probs;
  const Tensor wt = weight.t();
  if (dt == at::kFloat) {
    if (bias.has_value()) {
      at::addmm_out(probs, *bias, x, wt);
    } else {
      at::mm_out(probs, x, wt);
    }
    rows_fn(probs, probs, inv_t);
    return probs;
  }
  const int64_t chunk = chunk_rows(n, vocab, chunk_bytes);
  Tensor buffer = at::empty({chunk, vocab}, x.options());
  for (int64_t s = 0; s < n; s += chunk) {
    const int64_t rows = std::min(chunk, n - s);
    Tensor logits = buffer.narrow(0, 0, rows);
    const Tensor xc = x.narrow(0, s, rows);
    if (bias.has_value()) {
      at::addmm_out(logits, *bias, xc, wt);
    } else {
      at::mm_out(logits, xc, wt);
    }
    Tensor out = probs.narrow(0, s, rows);
    rows_fn(logits, out, inv_t);
  }
  return probs;
}

}  // namespace lm_head
}  // namespace fusedlm
