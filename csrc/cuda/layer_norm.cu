// CUDA LayerNorm / RMSNorm forward (math: python/fusedlm/ops/layer_norm.py; the thread layout
// is described in layer_norm_common.cuh; backward: layer_norm_bwd.cu).
//
// Statistics are float32 and two-pass over the registers (mean, then the mean of (h - mean)^2),
// which stays accurate when |mean| >> std. With a residual, h = x + residual is rounded to the
// input dtype and stored first: the statistics are those of the stored h.
// Memory traffic per row (N * sizeof(T) bytes each): read x (+ residual), write y (+ h).
#include "cuda/layer_norm.h"
#include "cuda/layer_norm_common.cuh"

#include <climits>

namespace fusedlm {
namespace cuda {
namespace {

using namespace detail;

// Values per thread held in registers; the one-element-at-a-time variant holds half as many
// (every element has its own address; 32 would take ~128 registers on sm_90a).
constexpr int kFwdMaxElems = 32, kFwdMaxElemsScalar = 16;

// Block (threads, rows_per_block); one row per row group; grid covers M rows.
template <typename T, int VEC, int ELEMS>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_fwd_rows(
    const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ weight,
    const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ h_out, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int64_t M, int N, float eps, bool rms) {
  constexpr int VPT = ELEMS / VEC;  // packs per thread
  __shared__ float red[kMaxWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Only whole warps of a warp-per-row block leave here (block-per-row grids have exactly M
  // blocks), so row_sum's __syncthreads never misses a thread.
  if (row >= M) return;
  const int64_t off = row * N;
  const int t = threadIdx.x, threads = blockDim.x;

  float v[VPT][VEC];
  float sum[1] = {0.f};
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int col = (k * threads + t) * VEC;
    if (col < N) {
      load<T, VEC>(x + off + col, v[k]);
      if (residual != nullptr) {
        float r[VEC];
        load<T, VEC>(residual + off + col, r);
        // h is rounded to T before the statistics: the norm is of the stored h.
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[k][i] = to_float(from_float<T>(v[k][i] + r[i]));
        store<T, VEC>(h_out + off + col, v[k]);
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum[0] += v[k][i];
    }
  }
  float mean = 0.f;
  if (!rms) {
    row_sum<1>(sum, red);
    mean = sum[0] / static_cast<float>(N);
  }
  float sq[1] = {0.f};
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    if ((k * threads + t) * VEC < N) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float d = v[k][i] - mean;
        sq[0] += d * d;
      }
    }
  }
  row_sum<1>(sq, red);
  const float rstd = 1.f / sqrtf(sq[0] / static_cast<float>(N) + eps);
  if (t == 0) {
    if (!rms) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int col = (k * threads + t) * VEC;
    if (col < N) {
      float w[VEC], b[VEC] = {}, out[VEC];
      load<T, VEC>(weight + col, w);
      if (bias != nullptr) load<T, VEC>(bias + col, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = (v[k][i] - mean) * rstd * w[i] + b[i];
      store<T, VEC>(y + off + col, out);
    }
  }
}

// One block per row, three passes over the row in memory: sum (writing h), squared deviations,
// output. h_out is read back after this thread wrote it (same thread, same column), so neither
// it nor what aliases it is __restrict__ (no non-coherent loads of it).
template <typename T>
__global__ void __launch_bounds__(kGenericThreads) layer_norm_fwd_generic(
    const T* x, const T* residual, const T* weight, const T* bias, T* y, T* h_out, float* mean_out, float* rstd_out,
    int64_t N, float eps, bool rms) {
  __shared__ float red[kMaxWarps];
  const int64_t row = blockIdx.x;
  const int64_t off = row * N;
  float sum[1] = {0.f};
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    float v = to_float(x[off + c]);
    if (residual != nullptr) {
      const T hv = from_float<T>(v + to_float(residual[off + c]));
      h_out[off + c] = hv;
      v = to_float(hv);
    }
    sum[0] += v;
  }
  const T* hrow = (residual != nullptr ? h_out : x) + off;
  float mean = 0.f;
  if (!rms) {
    row_sum<1>(sum, red);
    mean = sum[0] / static_cast<float>(N);
  }
  float sq[1] = {0.f};
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    const float d = to_float(hrow[c]) - mean;
    sq[0] += d * d;
  }
  row_sum<1>(sq, red);
  const float rstd = 1.f / sqrtf(sq[0] / static_cast<float>(N) + eps);
  if (threadIdx.x == 0) {
    if (!rms) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
    const float b = bias != nullptr ? to_float(bias[c]) : 0.f;
    y[off + c] = from_float<T>((to_float(hrow[c]) - mean) * rstd * to_float(weight[c]) + b);
  }
}

// ---- host side -------------------------------------------------------------------------------

template <typename T, int VEC, int ELEMS>
void launch_fwd_rows(const RowPlan& plan, const T* x, const T* residual, const T* weight, const T* bias, T* y,
                     T* h, float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms, cudaStream_t stream) {
  const dim3 block(plan.threads, plan.rows_per_block);
  const int64_t grid = ceil_div(M, plan.rows_per_block);
  layer_norm_fwd_rows<T, VEC, ELEMS><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      x, residual, weight, bias, y, h, mean, rstd, M, static_cast<int>(N), eps, rms);
}

template <typename T, int VEC, int MAX_ELEMS>
void fwd_rows_elems(const RowPlan& plan, const T* x, const T* residual, const T* weight, const T* bias, T* y, T* h,
                    float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms, cudaStream_t stream) {
  if (plan.elems == 8) {
    return launch_fwd_rows<T, VEC, 8>(plan, x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
  }
  if constexpr (MAX_ELEMS >= 32) {
    if (plan.elems == 32) {
      return launch_fwd_rows<T, VEC, 32>(plan, x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
    }
  }
  launch_fwd_rows<T, VEC, 16>(plan, x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
}

template <typename T>
cudaError_t fwd_typed(const void* x_, const void* residual_, const void* weight_, const void* bias_, void* y_, void* h_,
                      float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_);
  const T* residual = static_cast<const T*>(residual_);
  const T* weight = static_cast<const T*>(weight_);
  const T* bias = static_cast<const T*>(bias_);
  T* y = static_cast<T*>(y_);
  T* h = static_cast<T*>(h_);
  constexpr int kVec = pack_width<T>();
  const bool vec = N % kVec == 0 && aligned16(x) && aligned16(residual) && aligned16(weight) && aligned16(bias) &&
                   aligned16(y) && aligned16(h);
  const RowPlan plan = plan_rows(N, vec ? kFwdMaxElems : kFwdMaxElemsScalar);
  if (plan.elems == 0) {
    layer_norm_fwd_generic<T><<<static_cast<unsigned>(M), kGenericThreads, 0, stream>>>(
        x, residual, weight, bias, y, h, mean, rstd, N, eps, rms);
  } else if (vec) {
    fwd_rows_elems<T, kVec, kFwdMaxElems>(plan, x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
  } else {
    fwd_rows_elems<T, 1, kFwdMaxElemsScalar>(plan, x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms,
                                             stream);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t layer_norm_fwd(DType dtype, const void* x, const void* residual, const void* weight, const void* bias,
                           void* y, void* h, float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms,
                           cudaStream_t stream) {
  if (M < 0 || N <= 0 || (residual != nullptr && h == nullptr) || (!rms && mean == nullptr) || rstd == nullptr)
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (M > INT_MAX || N > INT_MAX) return cudaErrorInvalidConfiguration;  // grid.x and int columns
  switch (dtype) {
    case DType::Float32: return fwd_typed<float>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
    case DType::BFloat16:
      return fwd_typed<__nv_bfloat16>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
    case DType::Float16: return fwd_typed<__half>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusedlm
