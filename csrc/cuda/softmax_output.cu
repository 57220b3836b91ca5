// CUDA row passes of the slab-wise linear cross-entropy (contract in softmax_output.h).
//
// One block of kThreads threads per row of the slab; thread t walks columns t, t + kThreads, ...
// so a warp touches consecutive elements. Forward keeps an online (max, sum of exp) pair per
// thread, so the slab row is read once; the pairs are merged by warp shuffles, then across warps
// through shared memory, then into the row's running stats by thread 0. Backward reads and writes
// the slab row once. Memory traffic per token and slab of C columns: 2C bytes read forward, 4C
// read + written backward (bf16); the GEMMs around it move the same slab 1 (forward) or 3 times.
#include "cuda/layer_norm_common.cuh"
#include "cuda/softmax_output.h"

namespace fusedlm {
namespace cuda {
namespace {

using detail::from_float;
using detail::to_float;

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

template <typename T>
__global__ void __launch_bounds__(kThreads) slab_fwd(const T* __restrict__ logits, const int64_t* __restrict__ target,
                                                     float4* __restrict__ stats, float* __restrict__ loss,
                                                     float* __restrict__ lse, int64_t cols, int64_t col0,
                                                     int64_t vocab, int64_t ignore_index, float eps, float z_loss,
                                                     float softcap) {
  __shared__ float sh_m[kWarps], sh_s[kWarps], sh_c[kWarps];
  const int64_t row = blockIdx.x;
  const T* z = logits + row * cols;
  float m = -INFINITY, s = 0.f, sum_c = 0.f;
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < cols; v += kThreads) {
    const float c = cap(to_float(z[v]), softcap);
    if (c > m) {
      s = s * expf(m - c) + 1.f;
      m = c;
    } else if (c > -INFINITY) {  // a -inf logit (masked vocabulary) adds 0, also while m is -inf
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
  __syncthreads();
  if (threadIdx.x != 0) return;
  float4 st = col0 == 0 ? make_float4(-INFINITY, 0.f, 0.f, 0.f) : stats[row];  // (max, sum exp, sum c, c_t)
  for (int w = 0; w < kWarps; ++w) {  // warps in order: the same bits on every run
    merge(st.x, st.y, sh_m[w], sh_s[w]);
    st.z += sh_c[w];
  }
  const int64_t t = target[row];
  const int kind = target_kind(t, ignore_index, vocab);
  if (kind == kValid && t >= col0 && t < col0 + cols) st.w = cap(to_float(z[t - col0]), softcap);
  if (col0 + cols < vocab) {
    stats[row] = st;
    return;
  }
  const float row_lse = st.x + logf(st.y);
  lse[row] = row_lse;
  if (kind == kValid) {
    const float smooth = eps > 0.f ? eps * (row_lse - st.z / float(vocab)) : 0.f;  // st.z is -inf if a logit is
    loss[row] = (1.f - eps) * (row_lse - st.w) + smooth + z_loss * row_lse * row_lse;
  } else {
    loss[row] = kind == kIgnored ? 0.f : __int_as_float(0x7fc00000);  // NaN marks a bad target
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) slab_bwd(T* __restrict__ logits, const int64_t* __restrict__ target,
                                                     const float* __restrict__ lse, const float* __restrict__ dloss,
                                                     int64_t cols, int64_t col0, int64_t vocab, int64_t ignore_index,
                                                     float eps, float z_loss, float softcap) {
  const int64_t row = blockIdx.x;
  T* z = logits + row * cols;
  const int64_t t = target[row];
  if (target_kind(t, ignore_index, vocab) != kValid) {
    for (int64_t v = threadIdx.x; v < cols; v += kThreads) z[v] = from_float<T>(0.f);
    return;
  }
  const float g = dloss[row], row_lse = lse[row];
  const float scale = g * (1.f + 2.f * z_loss * row_lse), shift = g * eps / float(vocab), hit = g * (1.f - eps);
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  const int64_t t_local = t - col0;  // outside [0, cols) when t is in another slab
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < cols; v += kThreads) {
    const float c = cap(to_float(z[v]), softcap);
    float d = scale * expf(c - row_lse) - shift - (v == t_local ? hit : 0.f);
    if (softcap > 0.f) d *= 1.f - (c * inv_cap) * (c * inv_cap);
    z[v] = from_float<T>(d);
  }
}

template <typename T>
cudaError_t launch_fwd(const void* logits, const int64_t* target, float* stats, float* loss, float* lse, int64_t rows,
                       int64_t cols, int64_t col0, int64_t vocab, int64_t ignore_index, float eps, float z_loss,
                       float softcap, cudaStream_t stream) {
  slab_fwd<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), target, reinterpret_cast<float4*>(stats), loss, lse, cols, col0, vocab,
      ignore_index, eps, z_loss, softcap);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(void* logits, const int64_t* target, const float* lse, const float* dloss, int64_t rows,
                       int64_t cols, int64_t col0, int64_t vocab, int64_t ignore_index, float eps, float z_loss,
                       float softcap, cudaStream_t stream) {
  slab_bwd<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(static_cast<T*>(logits), target, lse, dloss, cols,
                                                                    col0, vocab, ignore_index, eps, z_loss, softcap);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_slab_fwd(DType dtype, const void* logits, const int64_t* target, float* stats,
                                   float* loss, float* lse, int64_t rows, int64_t cols, int64_t col0,
                                   int64_t vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                                   float softcap, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch_fwd<float>(logits, target, stats, loss, lse, rows, cols, col0, vocab, ignore_index,
                               label_smoothing, z_loss, softcap, stream);
    case DType::BFloat16:
      return launch_fwd<__nv_bfloat16>(logits, target, stats, loss, lse, rows, cols, col0, vocab, ignore_index,
                                       label_smoothing, z_loss, softcap, stream);
    case DType::Float16:
      return launch_fwd<__half>(logits, target, stats, loss, lse, rows, cols, col0, vocab, ignore_index,
                                label_smoothing, z_loss, softcap, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cross_entropy_slab_bwd(DType dtype, void* logits, const int64_t* target, const float* lse,
                                   const float* dloss, int64_t rows, int64_t cols, int64_t col0, int64_t vocab,
                                   int64_t ignore_index, float label_smoothing, float z_loss, float softcap,
                                   cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch_bwd<float>(logits, target, lse, dloss, rows, cols, col0, vocab, ignore_index, label_smoothing,
                               z_loss, softcap, stream);
    case DType::BFloat16:
      return launch_bwd<__nv_bfloat16>(logits, target, lse, dloss, rows, cols, col0, vocab, ignore_index,
                                       label_smoothing, z_loss, softcap, stream);
    case DType::Float16:
      return launch_bwd<__half>(logits, target, lse, dloss, rows, cols, col0, vocab, ignore_index, label_smoothing,
                                z_loss, softcap, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusedlm
