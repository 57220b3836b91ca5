// CUDA row pass of the chunked linear cross-entropy (contract in softmax_output.h).
//
// One block of kThreads threads per row; thread t walks columns t, t + kThreads, ... so a warp
// reads 128 consecutive bytes. Forward keeps an online (max, sum of exp) pair per thread, so the
// row is read once (and written once, only with softcap); the pairs are merged by warp shuffles
// and then across warps through shared memory. Backward reads and writes the row once.
// Memory traffic per row at V = 50304: 200 KiB read (+ 200 KiB written with softcap / in backward).
#include "cuda/softmax_output.h"

#include <cuda_runtime.h>

namespace fusedlm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

enum TargetKind { kValid = 0, kIgnored = 1, kInvalid = 2 };

__device__ __forceinline__ int target_kind(int64_t t, int64_t ignore_index, int64_t vocab) {
  if (t == ignore_index) return kIgnored;
  return (t >= 0 && t < vocab) ? kValid : kInvalid;
}

__device__ __forceinline__ float cap(float z, float softcap) {
  return softcap > 0.f ? softcap * tanhf(z / softcap) : z;
}

// Merge the online-softmax pair (m2, s2) into (m, s): s is the sum of exp(c - m).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_rows(float* __restrict__ logits,
                                                                    const int64_t* __restrict__ target,
                                                                    float* __restrict__ loss, float* __restrict__ lse,
                                                                    int64_t vocab, int64_t ignore_index, float eps,
                                                                    float z_loss, float softcap) {
  __shared__ float sh_m[kWarps], sh_s[kWarps], sh_c[kWarps];
  const int64_t row = blockIdx.x;
  float* z = logits + row * vocab;
  float m = -INFINITY, s = 0.f, sum_c = 0.f;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float c = cap(z[v], softcap);
    if (softcap > 0.f) z[v] = c;
    if (c > m) {
      s = s * expf(m - c) + 1.f;
      m = c;
    } else {
      s += expf(c - m);
    }
    sum_c += c;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2);
    sum_c += __shfl_xor_sync(0xffffffffu, sum_c, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
    sh_c[warp] = sum_c;
  }
  __syncthreads();  // also makes the soft-capped row visible to thread 0
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kWarps; ++w) {
    merge(sh_m[0], sh_s[0], sh_m[w], sh_s[w]);
    sh_c[0] += sh_c[w];
  }
  const float row_lse = sh_m[0] + logf(sh_s[0]);
  lse[row] = row_lse;
  const int64_t t = target[row];
  const int kind = target_kind(t, ignore_index, vocab);
  if (kind == kValid) {
    loss[row] = (1.f - eps) * (row_lse - z[t]) + eps * (row_lse - sh_c[0] / float(vocab)) +
                z_loss * row_lse * row_lse;
  } else {
    loss[row] = kind == kIgnored ? 0.f : __int_as_float(0x7fc00000);  // NaN marks a bad target
  }
}

__global__ void __launch_bounds__(kThreads) cross_entropy_bwd_rows(float* __restrict__ logits,
                                                                    const int64_t* __restrict__ target,
                                                                    const float* __restrict__ lse,
                                                                    const float* __restrict__ dloss, int64_t vocab,
                                                                    int64_t ignore_index, float eps, float z_loss,
                                                                    float softcap) {
  const int64_t row = blockIdx.x;
  float* z = logits + row * vocab;
  const int64_t t = target[row];
  if (target_kind(t, ignore_index, vocab) != kValid) {
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) z[v] = 0.f;
    return;
  }
  const float g = dloss[row], row_lse = lse[row];
  const float scale = g * (1.f + 2.f * z_loss * row_lse), shift = g * eps / float(vocab), hit = g * (1.f - eps);
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float c = cap(z[v], softcap);
    float d = scale * expf(c - row_lse) - shift - (v == t ? hit : 0.f);
    if (softcap > 0.f) d *= 1.f - (c * inv_cap) * (c * inv_cap);
    z[v] = d;
  }
}

}  // namespace

cudaError_t cross_entropy_rows_fwd(float* logits, const int64_t* target, float* loss, float* lse, int64_t rows,
                                   int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                                   float softcap, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cross_entropy_fwd_rows<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, target, loss, lse, vocab, ignore_index, label_smoothing, z_loss, softcap);
  return cudaGetLastError();
}

cudaError_t cross_entropy_rows_bwd(float* logits, const int64_t* target, const float* lse, const float* dloss,
                                   int64_t rows, int64_t vocab, int64_t ignore_index, float label_smoothing,
                                   float z_loss, float softcap, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cross_entropy_bwd_rows<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, target, lse, dloss, vocab, ignore_index, label_smoothing, z_loss, softcap);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedlm
