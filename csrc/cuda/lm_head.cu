// CUDA row pass of lm_head_softmax (contract in lm_head.h).
//
// One block of kThreads threads per row; thread t walks columns t, t + kThreads, ... so a warp
// touches 32 consecutive values per step. Pass 1 keeps an online (max, sum of exp) pair per
// thread: m the running max of the raw logits z, s = sum 2^((z - m) * scale), scale = log2(e) / T,
// so the logits are read once for both statistics; the pairs merge by warp shuffles, then across
// warps through shared memory, and every thread takes the row's (m, 1 / s). Pass 2 reads the
// logits again and writes p = 2^((z - m) * scale) / s. The max is subtracted BEFORE scaling: z - m
// is exact for every z within a factor 2 of m (all that carry probability), whereas rounding
// z * scale first costs an absolute error of ulp(z * scale) in the exponent (3e-4 relative in p for
// logits near 2000 at T = 0.25, found on an H200). Traffic per row: two reads of the logits (L2-resident for the second at
// V = 128256: 250 KiB in bf16, 500 KiB in float32) and one float32 write.
//
// In place on float32 rows (probs == logits): each thread reads and writes only its own columns,
// and pass 2 starts after the block barrier of the reduction, so no value is overwritten before
// every read of it. Hence no __restrict__ on the two pointers.
#include "cuda/lm_head.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fusedlm {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Merge the online-softmax pair (m2, s2) into (m, s), s the sum of 2^((z - m) * scale).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2, float scale) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty
  s = s * exp2f((m - mx) * scale) + s2 * exp2f((m2 - mx) * scale);
  m = mx;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lm_head_softmax_rows_kernel(const T* logits, int64_t logits_stride,
                                                                         float* probs, int64_t vocab, float scale) {
  __shared__ float sh_m[kWarps], sh_s[kWarps];
  const int64_t row = blockIdx.x;
  const T* z = logits + row * logits_stride;
  float* p = probs + row * vocab;
  float m = -INFINITY, s = 0.f;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float zv = to_float(z[v]);
    if (zv > m) {
      s = s * exp2f((m - zv) * scale) + 1.f;
      m = zv;
    } else if (m != -INFINITY) {  // a -inf logit (a masked token) before any finite one adds 0, not 2^NaN
      s += exp2f((zv - m) * scale);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, m2, s2, scale);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
  __syncthreads();
  // Every thread folds the kWarps pairs itself (16 merges, from shared memory): no second barrier.
  m = sh_m[0];
  s = sh_s[0];
  for (int w = 1; w < kWarps; ++w) merge(m, s, sh_m[w], sh_s[w], scale);
  const float inv_s = 1.f / s;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    p[v] = exp2f((to_float(z[v]) - m) * scale) * inv_s;
  }
}

template <typename T>
cudaError_t launch(const void* logits, int64_t logits_stride, float* probs, int64_t rows, int64_t vocab,
                   float scale, cudaStream_t stream) {
  lm_head_softmax_rows_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), logits_stride, probs, vocab, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lm_head_softmax_rows(const void* logits, LogitsType type, int64_t logits_stride, float* probs,
                                 int64_t rows, int64_t vocab, float inv_temperature, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const float scale = kLog2e * inv_temperature;
  switch (type) {
    case LogitsType::BFloat16:
      return launch<__nv_bfloat16>(logits, logits_stride, probs, rows, vocab, scale, stream);
    case LogitsType::Float16:
      return launch<__half>(logits, logits_stride, probs, rows, vocab, scale, stream);
    case LogitsType::Float32:
      break;
  }
  return launch<float>(logits, logits_stride, probs, rows, vocab, scale, stream);
}

}  // namespace cuda
}  // namespace fusedlm
