// CUDA element-wise kernels of the LayerNorm + feed-forward op (contract: layernorm_mlp.h).
//
// Layout: a block of 256 threads covers 256 consecutive columns of act (and the matching gate /
// up columns of pre) for one chunk of kSumRows rows; grid (ceil(h / 256), ceil(rows / kSumRows)).
// Thread j walks its column down the chunk, so a warp reads and writes 32 consecutive elements
// per row (coalesced), and the column sums of the backward are plain per-thread float32 sums,
// one partial per chunk, reduced in chunk order by reduce_partials: deterministic, no atomics.
// Memory traffic per (row, column of act): forward reads pre (2 values when gated), writes act
// (and pre when a bias is added); backward reads pre and d(act), writes d(pre) and act.
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
    *df = s + 2.0f * kTanhK * u * s * (1.0f - s) * (1.0f + 3.0f * kTanhC * u2);
  } else if constexpr (A == Activation::Relu) {
    *f = u > 0.0f ? u : 0.0f;
    *df = u > 0.0f ? 1.0f : 0.0f;
  } else {  // Silu, Swiglu
    const float s = 1.0f / (1.0f + __expf(-u));
    *f = u * s;
    *df = s * (1.0f + u * (1.0f - s));
  }
}

constexpr bool gated(Activation a) { return a == Activation::Swiglu || a == Activation::Geglu; }

template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return to_float(from_float<T>(v));
}

template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads) act_fwd_kernel(T* __restrict__ pre, const T* __restrict__ bias,
                                                           T* __restrict__ act, int64_t rows, int64_t h) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= h) return;
  const int64_t cols = gated(A) ? 2 * h : h;
  const int64_t r0 = int64_t(blockIdx.y) * kSumRows;
  const int64_t r1 = r0 + kSumRows < rows ? r0 + kSumRows : rows;
  const float ba = bias != nullptr ? to_float(bias[j]) : 0.0f;
  const float bb = gated(A) && bias != nullptr ? to_float(bias[h + j]) : 0.0f;
  for (int64_t i = r0; i < r1; ++i) {
    T* p = pre + i * cols;
    float a = to_float(p[j]);
    if (bias != nullptr) {
      a = rounded<T>(a + ba);
      p[j] = from_float<T>(a);
    }
    float f, df;
    terms<A>(a, &f, &df);
    if constexpr (gated(A)) {
      float b = to_float(p[h + j]);
      if (bias != nullptr) {
        b = rounded<T>(b + bb);
        p[h + j] = from_float<T>(b);
      }
      f *= b;
    }
    act[i * h + j] = from_float<T>(f);
  }
}

template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads) act_bwd_kernel(const T* __restrict__ pre, const T* __restrict__ bias,
                                                           T* __restrict__ dact_act, T* __restrict__ dpre,
                                                           float* __restrict__ partial, int64_t rows, int64_t h) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= h) return;
  const int64_t cols = gated(A) ? 2 * h : h;
  const int64_t r0 = int64_t(blockIdx.y) * kSumRows;
  const int64_t r1 = r0 + kSumRows < rows ? r0 + kSumRows : rows;
  const float ba = bias != nullptr ? to_float(bias[j]) : 0.0f;
  const float bb = gated(A) && bias != nullptr ? to_float(bias[h + j]) : 0.0f;
  float sa = 0.0f, sb = 0.0f;
  for (int64_t i = r0; i < r1; ++i) {
    const T* p = pre + i * cols;
    T* dp = dpre + i * cols;
    float a = to_float(p[j]);
    if (bias != nullptr) a = rounded<T>(a + ba);
    const float g = to_float(dact_act[i * h + j]);
    float f, df;
    terms<A>(a, &f, &df);
    if constexpr (gated(A)) {
      float b = to_float(p[h + j]);
      if (bias != nullptr) b = rounded<T>(b + bb);
      dact_act[i * h + j] = from_float<T>(f * b);
      const float da = g * b * df, db = g * f;
      dp[j] = from_float<T>(da);
      dp[h + j] = from_float<T>(db);
      sa += da;
      sb += db;
    } else {
      dact_act[i * h + j] = from_float<T>(f);
      const float da = g * df;
      dp[j] = from_float<T>(da);
      sa += da;
    }
  }
  if (partial != nullptr) {
    float* out = partial + int64_t(blockIdx.y) * cols;
    out[j] = sa;
    if constexpr (gated(A)) out[h + j] = sb;
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

// One launch per (T, activation) instance; the switch picks the instance for the runtime values.
struct FwdLaunch {
  void* pre;
  const void* bias;
  void* act;
  int64_t rows, h;
  cudaStream_t stream;
  template <typename T, Activation A>
  void run() const {
    act_fwd_kernel<T, A><<<grid_for(h, rows), kThreads, 0, stream>>>(
        static_cast<T*>(pre), static_cast<const T*>(bias), static_cast<T*>(act), rows, h);
  }
};

struct BwdLaunch {
  const void* pre;
  const void* bias;
  void* dact_act;
  void* dpre;
  float* partial;
  int64_t rows, h;
  cudaStream_t stream;
  template <typename T, Activation A>
  void run() const {
    act_bwd_kernel<T, A><<<grid_for(h, rows), kThreads, 0, stream>>>(
        static_cast<const T*>(pre), static_cast<const T*>(bias), static_cast<T*>(dact_act), static_cast<T*>(dpre),
        partial, rows, h);
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

cudaError_t mlp_act_fwd(DType dtype, Activation activation, void* pre, const void* bias, void* act, int64_t rows,
                        int64_t h, cudaStream_t stream) {
  if (rows <= 0 || h <= 0) return cudaSuccess;
  by_dtype(dtype, activation, FwdLaunch{pre, bias, act, rows, h, stream});
  return cudaGetLastError();
}

cudaError_t mlp_act_bwd(DType dtype, Activation activation, const void* pre, const void* bias, void* dact_act,
                        void* dpre, float* dbias_partial, int64_t rows, int64_t h, cudaStream_t stream) {
  if (rows <= 0 || h <= 0) return cudaSuccess;
  by_dtype(dtype, activation, BwdLaunch{pre, bias, dact_act, dpre, dbias_partial, rows, h, stream});
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
