// Internal to csrc/cpu: the element types and the row-kernel interface shared by the layer_norm
// drivers (layer_norm.cpp) and its AVX-512 row kernels (layer_norm_avx512.cpp); FUSEDLM_X86,
// kMinParallelElems and threads_for, which every CPU kernel file uses.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FUSEDLM_X86 1
#else
#define FUSEDLM_X86 0
#endif

namespace fusedlm {
namespace cpu {

// Below this many elements an OpenMP parallel region costs more than it saves (the other threads
// only wake and wait): every element-wise CPU pass runs on one thread below it.
constexpr int64_t kMinParallelElems = int64_t(1) << 15;

// Threads for a pass over `elems` elements in `units` independent pieces (rows, chunks, column
// groups): one below kMinParallelElems, never more than the pieces.
inline int threads_for(int requested, int64_t elems, int64_t units) {
  if (requested < 1 || elems < kMinParallelElems) return 1;
  return int(std::max<int64_t>(1, std::min<int64_t>(requested, units)));
}

namespace rows {

// 2-byte element types, carried as their bits.
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// Statistics from mean0 = sum(h) / N and the sums centred on it, s1 = sum(h - mean0) and
// s2 = sum((h - mean0)^2): the corrected two-pass formula. s1 is the rounding error of mean0
// times N, so mean0 + s1/N is the mean to fp32 rounding and s2 - s1^2/N the centred sum of
// squares, for any mean (E[h^2] - E[h]^2 loses every digit when |mean| >> spread).
inline void finish_stats(float mean0, float s1, float s2, int64_t n, float eps, float* mean, float* rstd) {
  const float inv_n = 1.0f / float(n);
  *mean = mean0 + s1 * inv_n;
  const float var = std::max((s2 - s1 * s1 * inv_n) * inv_n, 0.0f);
  *rstd = 1.0f / std::sqrt(var + eps);
}

// One row of the forward: x, res (or nullptr), y, h (nullptr without res) point at the row;
// mean_out (nullptr for rmsnorm) and rstd_out at the row's statistics. The weight and bias
// (nullptr: none) come as fp32, converted once per call rather than once per row.
template <typename T>
using FwdRowFn = void (*)(const T* x, const T* res, const float* w, const float* b, T* y, T* h, int64_t n, float eps,
                          float* mean_out, float* rstd_out);

// One row of the backward: writes dx and adds the row's dy * xhat to dwp[0, n) and its dy to
// dbp[0, n) (dbp nullptr: no bias).
template <typename T>
using BwdRowFn = void (*)(const T* dy, const T* dh, const T* h, const float* w, float mean, float rstd, T* dx,
                          float* dwp, float* dbp, int64_t n);

#if FUSEDLM_X86
// The AVX-512 row kernels (avx512f/bw/vl/dq; only call them when the CPU has those). stream:
// the outputs (y, h or dx) are written with non-temporal stores; needs every row of every
// output 64-byte aligned and N * sizeof(T) a multiple of 64 (no masked tail).
template <typename T>
FwdRowFn<T> avx512_fwd_row(bool rms, bool residual, bool stream);
template <typename T>
BwdRowFn<T> avx512_bwd_row(bool rms, bool stream);
// Orders this thread's non-temporal stores before what follows (sfence).
void avx512_stream_fence();
#endif

}  // namespace rows
}  // namespace cpu
}  // namespace fusedlm
