// CUDA element-wise kernels of the LayerNorm + feed-forward op (contract: layernorm_mlp.h).
//
// Layout of the activation kernels: a block of 128 threads covers 128 x VEC consecutive columns of
// act (and the matching gate / up columns of pre) for one chunk of kSumRows rows; grid
// (ceil(h / (128 VEC)), ceil(rows / kSumRows)). Each thread walks its VEC columns down the chunk,
// so a warp moves 32 consecutive packs per row (coalesced), and the column sums of the backward are
// plain per-thread float32 sums, one partial per chunk, reduced in chunk order by reduce_partials:
// deterministic, no atomics. column_sum_kernel: 256 threads, one column each.
// Memory traffic per (row, column of act): forward reads pre (2 values when gated), writes act;
// backward reads pre and d(act), writes d(pre) and act. pre already holds the fc bias (the driver
// adds it in the fc GEMM).
#include <cstdint>
#include <initializer_list>

#include "cuda/layer_norm_common.cuh"
#include "cuda/layernorm_mlp.h"

namespace fusedlm {
namespace cuda {
namespace {

using detail::from_float;
using detail::to_float;

constexpr int kThreads = 256;
constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhC = 0.044715f;

// f(u) and f'(u) of the elementwise activation (the gate's, for the gated ones).
template <Activation A>
__device__ __forceinline__ void terms(float u, float* f, float* df) {
  if constexpr (A == Activation::Gelu || A == Activation::Geglu) {
    const float cdf = 0.5f + 0.5f * erff(u * kSqrt1_2);
    *f = u * cdf;
    *df = cdf + u * kInvSqrt2Pi * __expf(-0.5f * u * u);
  } else if constexpr (A == Activation::GeluTanh) {
    // 0.5 (1 + tanh(y)) = sigmoid(2 y)
    const float u2 = u * u;
    const float s = 1.0f / (1.0f + __expf(-2.0f * kTanhK * u * (1.0f + kTanhC * u2)));
    *f = u * s;
    // f' = s + 2 k u s (1 - s) (1 + 3 c u^2), the second term taken at u clamped to [-20, 20]: it is
    // exactly 0 there for |u| >= 20 (s is 0 or 1), and u^2 = inf (|u| > 1.8e19) made it 0 * inf = NaN.
    const float uc = fminf(fmaxf(u, -20.0f), 20.0f);
    *df = s + 2.0f * kTanhK * uc * s * (1.0f - s) * (1.0f + 3.0f * kTanhC * uc * uc);
  } else if constexpr (A == Activation::Relu) {
    *f = u < 0.0f ? 0.0f : u;  // NaN kept, as torch.relu
    *df = u <= 0.0f ? 0.0f : 1.0f;  // NaN -> 1 (passes the gradient on), as torch's threshold_backward
  } else {  // Silu, Swiglu
    const float s = 1.0f / (1.0f + __expf(-u));
    *f = u * s;
    *df = s * (1.0f + u * (1.0f - s));
  }
}

constexpr bool gated(Activation a) { return a == Activation::Swiglu || a == Activation::Geglu; }

// Element-wise kernels: thread t of a block owns VEC consecutive columns of act (and the matching
// gate / up columns of pre) for the kSumRows rows of its chunk, moved as one 16-byte Pack when the
// width and the pointers allow (VEC = 8 for bf16 / fp16, 4 for fp32), else one element (VEC = 1).
// Rows go kRowBatch at a time, every load of the batch issued before any store: with few bytes in
// flight per thread (one 2-byte element of one row, as this file's first kernels had) an H200 streams
// a small fraction of its bandwidth; here up to 2 x 4 x 16 bytes per thread are in flight.
constexpr int kActThreads = 128;
constexpr int kRowBatch = 4;

template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(kActThreads) act_fwd_kernel(const T* __restrict__ pre, T* __restrict__ act,
                                                              int64_t rows, int64_t h) {
  const int64_t j = (int64_t(blockIdx.x) * kActThreads + threadIdx.x) * VEC;
  if (j >= h) return;
  const int64_t cols = gated(A) ? 2 * h : h;
  const int64_t r0 = int64_t(blockIdx.y) * kSumRows;
  const int64_t r1 = r0 + kSumRows < rows ? r0 + kSumRows : rows;
  for (int64_t i0 = r0; i0 < r1; i0 += kRowBatch) {
    float a[kRowBatch][VEC], b[kRowBatch][VEC];
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {  // past the chunk's end: the last row again (loaded, unused)
      const int64_t i = i0 + u < r1 ? i0 + u : r1 - 1;
      detail::load<T, VEC>(pre + i * cols + j, a[u]);
      if constexpr (gated(A)) detail::load<T, VEC>(pre + i * cols + h + j, b[u]);
    }
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {
      if (i0 + u >= r1) continue;
      float out[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float f, df;
        terms<A>(a[u][v], &f, &df);
        if constexpr (gated(A)) f *= b[u][v];
        out[v] = f;
      }
      detail::store<T, VEC>(act + (i0 + u) * h + j, out);
    }
  }
}

template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(kActThreads) act_bwd_kernel(const T* __restrict__ pre, T* __restrict__ dact_act,
                                                              T* __restrict__ dpre, float* __restrict__ partial,
                                                              int64_t rows, int64_t h) {
  const int64_t j = (int64_t(blockIdx.x) * kActThreads + threadIdx.x) * VEC;
  if (j >= h) return;
  const int64_t cols = gated(A) ? 2 * h : h;
  const int64_t r0 = int64_t(blockIdx.y) * kSumRows;
  const int64_t r1 = r0 + kSumRows < rows ? r0 + kSumRows : rows;
  float sa[VEC], sb[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) sa[v] = sb[v] = 0.0f;
  for (int64_t i0 = r0; i0 < r1; i0 += kRowBatch) {
    float a[kRowBatch][VEC], b[kRowBatch][VEC], g[kRowBatch][VEC];
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {  // past the chunk's end: the last row again (loaded, unused)
      const int64_t i = i0 + u < r1 ? i0 + u : r1 - 1;
      detail::load<T, VEC>(pre + i * cols + j, a[u]);
      if constexpr (gated(A)) detail::load<T, VEC>(pre + i * cols + h + j, b[u]);
      detail::load<T, VEC>(dact_act + i * h + j, g[u]);
    }
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {
      if (i0 + u >= r1) continue;
      float f_out[VEC], da[VEC], db[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float f, df;
        terms<A>(a[u][v], &f, &df);
        if constexpr (gated(A)) {
          const float y = b[u][v];
          f_out[v] = f * y;
          da[v] = g[u][v] * y * df;
          db[v] = g[u][v] * f;
        } else {
          f_out[v] = f;
          da[v] = g[u][v] * df;
          db[v] = 0.0f;
        }
      }
      T* dp = dpre + (i0 + u) * cols;
      detail::store<T, VEC>(dp + j, da);
#pragma unroll
      for (int v = 0; v < VEC; ++v) sa[v] += da[v];
      if constexpr (gated(A)) {
        detail::store<T, VEC>(dp + h + j, db);
#pragma unroll
        for (int v = 0; v < VEC; ++v) sb[v] += db[v];
      }
      detail::store<T, VEC>(dact_act + (i0 + u) * h + j, f_out);
    }
  }
  if (partial != nullptr) {
    float* out = partial + int64_t(blockIdx.y) * cols;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      out[j + v] = sa[v];
      if constexpr (gated(A)) out[h + j + v] = sb[v];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) column_sum_kernel(const T* __restrict__ x, float* __restrict__ partial,
                                                              int64_t rows, int64_t cols) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  const int64_t r0 = int64_t(blockIdx.y) * kSumRows;
  const int64_t r1 = r0 + kSumRows < rows ? r0 + kSumRows : rows;
  float s = 0.0f;
  for (int64_t i = r0; i < r1; ++i) s += to_float(x[i * cols + j]);
  partial[int64_t(blockIdx.y) * cols + j] = s;
}

__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(const float* __restrict__ partial, int64_t chunks,
                                                                   int64_t cols, float* __restrict__ acc) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  float s = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * cols + j];
  acc[j] += s;
}

dim3 grid_for(int64_t cols, int64_t rows) {
  return dim3(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(sum_chunks(rows)));
}

// The element-wise kernels' grid: (column groups of kActThreads x vec, row chunks).
dim3 act_grid(int64_t h, int64_t rows, int vec) {
  const int64_t per_block = int64_t(kActThreads) * vec;
  return dim3(static_cast<unsigned>((h + per_block - 1) / per_block), static_cast<unsigned>(sum_chunks(rows)));
}

// 16-byte packs fit when h is a multiple of the pack (then every row, and the up half of a gated
// row, starts 16-byte aligned) and every base pointer is 16-byte aligned.
template <typename T>
bool packs_fit(int64_t h, std::initializer_list<const void*> pointers) {
  if (h % (16 / int64_t(sizeof(T))) != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// One launch per (T, activation) instance; the switch picks the instance for the runtime values.
struct FwdLaunch {
  const void* pre;
  void* act;
  int64_t rows, h;
  cudaStream_t stream;
  template <typename T, Activation A>
  void run() const {
    constexpr int kVec = 16 / sizeof(T);
    if (packs_fit<T>(h, {pre, act})) {
      act_fwd_kernel<T, A, kVec><<<act_grid(h, rows, kVec), kActThreads, 0, stream>>>(
          static_cast<const T*>(pre), static_cast<T*>(act), rows, h);
    } else {
      act_fwd_kernel<T, A, 1><<<act_grid(h, rows, 1), kActThreads, 0, stream>>>(
          static_cast<const T*>(pre), static_cast<T*>(act), rows, h);
    }
  }
};

struct BwdLaunch {
  const void* pre;
  void* dact_act;
  void* dpre;
  float* partial;
  int64_t rows, h;
  cudaStream_t stream;
  template <typename T, Activation A>
  void run() const {
    constexpr int kVec = 16 / sizeof(T);
    if (packs_fit<T>(h, {pre, dact_act, dpre})) {
      act_bwd_kernel<T, A, kVec><<<act_grid(h, rows, kVec), kActThreads, 0, stream>>>(
          static_cast<const T*>(pre), static_cast<T*>(dact_act), static_cast<T*>(dpre), partial, rows, h);
    } else {
      act_bwd_kernel<T, A, 1><<<act_grid(h, rows, 1), kActThreads, 0, stream>>>(
          static_cast<const T*>(pre), static_cast<T*>(dact_act), static_cast<T*>(dpre), partial, rows, h);
    }
  }
};

template <typename T, typename Launch>
void by_activation(Activation activation, const Launch& l) {
  switch (activation) {
    case Activation::Gelu: return l.template run<T, Activation::Gelu>();
    case Activation::GeluTanh: return l.template run<T, Activation::GeluTanh>();
    case Activation::Relu: return l.template run<T, Activation::Relu>();
    case Activation::Silu: return l.template run<T, Activation::Silu>();
    case Activation::Swiglu: return l.template run<T, Activation::Swiglu>();
    case Activation::Geglu: return l.template run<T, Activation::Geglu>();
  }
}

template <typename Launch>
void by_dtype(DType dtype, Activation activation, const Launch& l) {
  switch (dtype) {
    case DType::Float32: return by_activation<float>(activation, l);
    case DType::BFloat16: return by_activation<__nv_bfloat16>(activation, l);
    case DType::Float16: return by_activation<__half>(activation, l);
  }
}

}  // namespace

cudaError_t mlp_act_fwd(DType dtype, Activation activation, const void* pre, void* act, int64_t rows, int64_t h,
                        cudaStream_t stream) {
  if (rows <= 0 || h <= 0) return cudaSuccess;
  by_dtype(dtype, activation, FwdLaunch{pre, act, rows, h, stream});
  return cudaGetLastError();
}

cudaError_t mlp_act_bwd(DType dtype, Activation activation, const void* pre, void* dact_act, void* dpre,
                        float* dbias_partial, int64_t rows, int64_t h, cudaStream_t stream) {
  if (rows <= 0 || h <= 0) return cudaSuccess;
  by_dtype(dtype, activation, BwdLaunch{pre, dact_act, dpre, dbias_partial, rows, h, stream});
  return cudaGetLastError();
}

cudaError_t column_sum_partials(DType dtype, const void* x, float* partial, int64_t rows, int64_t cols,
                                cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  const dim3 grid = grid_for(cols, rows);
  switch (dtype) {
    case DType::Float32:
      column_sum_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), partial, rows, cols);
      break;
    case DType::BFloat16:
      column_sum_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), partial, rows, cols);
      break;
    case DType::Float16:
      column_sum_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), partial, rows, cols);
      break;
  }
  return cudaGetLastError();
}

cudaError_t reduce_partials(const float* partial, int64_t chunks, int64_t cols, float* acc, cudaStream_t stream) {
  if (chunks <= 0 || cols <= 0) return cudaSuccess;
  reduce_partials_kernel<<<static_cast<unsigned>((cols + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      partial, chunks, cols, acc);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedlm
