// CUDA LayerNorm / RMSNorm backward (math: python/fusedlm/ops/layer_norm.py; the thread layout
// is described in layer_norm_common.cuh).
//
// Per row, with xhat = (h - mean) * rstd and g = dy * weight:
//   dx = rstd * (g - <g> - xhat * <g * xhat>) (+ dh)      (rmsnorm: no <g> term)
// Weight gradients: every row group accumulates dy * xhat and dy of its rows, in row order, in
// float32 registers; the row groups of one block combine in warp order; each block writes one
// (N,) float32 partial for its fixed chunk of rows; reduce_partials sums the partials in a fixed
// order. The chunking depends only on (M, N): the bits are the same on every run, no atomics.
// Memory traffic per row (N * sizeof(T) bytes each): read dy, h (+ dh), write dx; plus N * 4
// bytes of partials per array per chunk, written once and read once.
#include "cuda/layer_norm.h"
#include "cuda/layer_norm_common.cuh"

#include <algorithm>
#include <climits>

namespace fusedlm {
namespace cuda {
namespace {

using namespace detail;

// Values per thread held in registers, 4 arrays of them (xhat, g, dweight, dbias); the
// one-element-at-a-time variant holds half as many (16 spills on sm_90a).
constexpr int kBwdMaxElems = 16, kBwdMaxElemsScalar = 8;
constexpr int kReduceX = 32, kReduceY = 32;

// Block blockIdx.x owns rows [blockIdx.x * chunk, min(M, (blockIdx.x + 1) * chunk)) and writes
// row blockIdx.x of the (G, N) partials; row group threadIdx.y takes every blockDim.y-th row.
template <typename T, int VEC, int ELEMS>
__global__ void __launch_bounds__(kMaxThreads) layer_norm_bwd_rows(
    const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h, const T* __restrict__ weight,
    const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
    float* __restrict__ partial_dw, float* __restrict__ partial_db, int64_t M, int N, int64_t chunk, bool rms) {
  constexpr int VPT = ELEMS / VEC;
  __shared__ float red[2 * kMaxWarps];
  __shared__ float stage[kRowsPerWarpBlock][ELEMS * kWarp];
  const int t = threadIdx.x, threads = blockDim.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t row_end = row_begin + chunk < M ? row_begin + chunk : M;

  float acc_dw[VPT][VEC] = {}, acc_db[VPT][VEC] = {};
  for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
    const int64_t off = row * N;
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];
    float xhat[VPT][VEC], g[VPT][VEC];
    float s[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = (k * threads + t) * VEC;
      if (col < N) {
        float hv[VEC], dyv[VEC], w[VEC];
        load<T, VEC>(h + off + col, hv);
        load<T, VEC>(dy + off + col, dyv);
        load<T, VEC>(weight + col, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          xhat[k][i] = (hv[i] - mu) * rs;
          g[k][i] = dyv[i] * w[i];
          acc_dw[k][i] += dyv[i] * xhat[k][i];
          acc_db[k][i] += dyv[i];
          s[0] += g[k][i];
          s[1] += g[k][i] * xhat[k][i];
        }
      }
    }
    row_sum<2>(s, red);
    const float mean_g = rms ? 0.f : s[0] / static_cast<float>(N);
    const float mean_gx = s[1] / static_cast<float>(N);
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = (k * threads + t) * VEC;
      if (col < N) {
        float d[VEC] = {}, out[VEC];
        if (dh != nullptr) load<T, VEC>(dh + off + col, d);
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = rs * (g[k][i] - mean_g - xhat[k][i] * mean_gx) + d[i];
        store<T, VEC>(dx + off + col, out);
      }
    }
  }

  float* dw_row = partial_dw + static_cast<int64_t>(blockIdx.x) * N;
  float* db_row = partial_db != nullptr ? partial_db + static_cast<int64_t>(blockIdx.x) * N : nullptr;
  if (blockDim.y == 1) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = (k * threads + t) * VEC;
      if (col < N) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          dw_row[col + i] = acc_dw[k][i];
          if (db_row != nullptr) db_row[col + i] = acc_db[k][i];
        }
      }
    }
    return;
  }
  // Warp-per-row block (threads == 32): add the warps' accumulators in warp order, through smem.
  for (int which = 0; which < 2; ++which) {
    float* out_row = which == 0 ? dw_row : db_row;
    if (out_row == nullptr) break;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        stage[threadIdx.y][(k * VEC + i) * kWarp + t] = which == 0 ? acc_dw[k][i] : acc_db[k][i];
      }
    }
    __syncthreads();
    if (threadIdx.y == 0) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int col = (k * kWarp + t) * VEC;
        if (col < N) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            float total = stage[0][(k * VEC + i) * kWarp + t];
            for (int w = 1; w < static_cast<int>(blockDim.y); ++w) total += stage[w][(k * VEC + i) * kWarp + t];
            out_row[col + i] = total;
          }
        }
      }
    }
    __syncthreads();  // stage is reused for dbias
  }
}

// One block per chunk of rows, one row at a time, two passes over the row in memory. The
// block's partial row is its accumulator (each column read and written by one thread only).
template <typename T>
__global__ void __launch_bounds__(kGenericThreads) layer_norm_bwd_generic(
    const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h, const T* __restrict__ weight,
    const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx, float* partial_dw,
    float* partial_db, int64_t M, int64_t N, int64_t chunk, bool rms) {
  __shared__ float red[2 * kMaxWarps];
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t row_end = row_begin + chunk < M ? row_begin + chunk : M;
  float* dw_row = partial_dw + static_cast<int64_t>(blockIdx.x) * N;
  float* db_row = partial_db != nullptr ? partial_db + static_cast<int64_t>(blockIdx.x) * N : nullptr;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t off = row * N;
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];
    float s[2] = {0.f, 0.f};
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const float xhat = (to_float(h[off + c]) - mu) * rs;
      const float g = to_float(dy[off + c]) * to_float(weight[c]);
      s[0] += g;
      s[1] += g * xhat;
    }
    row_sum<2>(s, red);
    const float mean_g = rms ? 0.f : s[0] / static_cast<float>(N);
    const float mean_gx = s[1] / static_cast<float>(N);
    const bool first = row == row_begin;
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const float xhat = (to_float(h[off + c]) - mu) * rs;
      const float dyv = to_float(dy[off + c]);
      const float g = dyv * to_float(weight[c]);
      const float d = dh != nullptr ? to_float(dh[off + c]) : 0.f;
      dx[off + c] = from_float<T>(rs * (g - mean_g - xhat * mean_gx) + d);
      dw_row[c] = (first ? 0.f : dw_row[c]) + dyv * xhat;
      if (db_row != nullptr) db_row[c] = (first ? 0.f : db_row[c]) + dyv;
    }
  }
}

// out[c] = sum over g of partial[g][c] (g = 0..G-1), float32, in a fixed order: thread row y
// sums g = y, y + 32, ... in order, then thread row 0 adds the 32 sums in order.
// blockIdx.y = 0: dweight; 1: dbias.
template <typename T>
__global__ void __launch_bounds__(kReduceX * kReduceY) reduce_partials(
    const float* __restrict__ partial_dw, const float* __restrict__ partial_db, T* __restrict__ dweight,
    T* __restrict__ dbias, int64_t G, int64_t N) {
  __shared__ float stage[kReduceY][kReduceX + 1];
  const float* partial = blockIdx.y == 0 ? partial_dw : partial_db;
  T* out = blockIdx.y == 0 ? dweight : dbias;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceX + threadIdx.x;
  float s = 0.f;
  if (col < N) {
    for (int64_t g = threadIdx.y; g < G; g += kReduceY) s += partial[g * N + col];
  }
  stage[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float total = stage[0][threadIdx.x];
    for (int y = 1; y < kReduceY; ++y) total += stage[y][threadIdx.x];
    out[col] = from_float<T>(total);
  }
}

// ---- host side -------------------------------------------------------------------------------

// Rows per backward chunk: about 1024 chunks, fewer for wide rows so that the partials stay
// near 16 MiB (1 << 22 floats) or below; at least 128 chunks when M allows.
int64_t bwd_chunk(int64_t M, int64_t N) {
  const int64_t target = std::min<int64_t>(1024, std::max<int64_t>(128, (int64_t{1} << 22) / std::max<int64_t>(N, 1)));
  return std::max<int64_t>(1, ceil_div(M, target));
}

template <typename T, int VEC, int ELEMS>
void launch_bwd_rows(const RowPlan& plan, int64_t grid, int64_t chunk, const T* dy, const T* dh, const T* h,
                     const T* weight, const float* mean, const float* rstd, T* dx, float* pdw, float* pdb, int64_t M,
                     int64_t N, bool rms, cudaStream_t stream) {
  const dim3 block(plan.threads, plan.rows_per_block);
  layer_norm_bwd_rows<T, VEC, ELEMS><<<static_cast<unsigned>(grid), block, 0, stream>>>(
      dy, dh, h, weight, mean, rstd, dx, pdw, pdb, M, static_cast<int>(N), chunk, rms);
}

template <typename T, int VEC, int MAX_ELEMS>
void bwd_rows_elems(const RowPlan& plan, int64_t grid, int64_t chunk, const T* dy, const T* dh, const T* h,
                    const T* weight, const float* mean, const float* rstd, T* dx, float* pdw, float* pdb, int64_t M,
                    int64_t N, bool rms, cudaStream_t stream) {
  if constexpr (MAX_ELEMS >= 16) {
    if (plan.elems == 16) {
      return launch_bwd_rows<T, VEC, 16>(plan, grid, chunk, dy, dh, h, weight, mean, rstd, dx, pdw, pdb, M, N, rms,
                                         stream);
    }
  }
  launch_bwd_rows<T, VEC, 8>(plan, grid, chunk, dy, dh, h, weight, mean, rstd, dx, pdw, pdb, M, N, rms, stream);
}

template <typename T>
cudaError_t bwd_typed(const void* dy_, const void* dh_, const void* h_, const void* weight_, const float* mean,
                      const float* rstd, void* dx_, void* dweight_, void* dbias_, float* workspace, int64_t M,
                      int64_t N, bool rms, cudaStream_t stream) {
  const T* dy = static_cast<const T*>(dy_);
  const T* dh = static_cast<const T*>(dh_);
  const T* h = static_cast<const T*>(h_);
  const T* weight = static_cast<const T*>(weight_);
  T* dx = static_cast<T*>(dx_);
  T* dweight = static_cast<T*>(dweight_);
  T* dbias = static_cast<T*>(dbias_);
  const int64_t chunk = bwd_chunk(M, N);
  const int64_t groups = ceil_div(M, chunk);  // = blocks = partial rows
  float* pdw = workspace;
  float* pdb = dbias != nullptr ? workspace + groups * N : nullptr;
  constexpr int kVec = pack_width<T>();
  const bool vec = N % kVec == 0 && aligned16(dy) && aligned16(dh) && aligned16(h) && aligned16(weight) &&
                   aligned16(dx);
  const RowPlan plan = plan_rows(N, vec ? kBwdMaxElems : kBwdMaxElemsScalar);
  if (plan.elems == 0) {
    layer_norm_bwd_generic<T><<<static_cast<unsigned>(groups), kGenericThreads, 0, stream>>>(
        dy, dh, h, weight, mean, rstd, dx, pdw, pdb, M, N, chunk, rms);
  } else if (vec) {
    bwd_rows_elems<T, kVec, kBwdMaxElems>(plan, groups, chunk, dy, dh, h, weight, mean, rstd, dx, pdw, pdb, M, N,
                                          rms, stream);
  } else {
    bwd_rows_elems<T, 1, kBwdMaxElemsScalar>(plan, groups, chunk, dy, dh, h, weight, mean, rstd, dx, pdw, pdb, M,
                                             N, rms, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kReduceX)), dbias != nullptr ? 2 : 1);
  reduce_partials<T><<<grid, dim3(kReduceX, kReduceY), 0, stream>>>(pdw, pdb, dweight, dbias, groups, N);
  return cudaGetLastError();
}

size_t dtype_size(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

}  // namespace

int64_t layer_norm_bwd_workspace_floats(int64_t M, int64_t N, bool has_bias) {
  if (M <= 0 || N <= 0) return 0;
  return ceil_div(M, bwd_chunk(M, N)) * N * (has_bias ? 2 : 1);
}

cudaError_t layer_norm_bwd(DType dtype, const void* dy, const void* dh, const void* h, const void* weight,
                           const float* mean, const float* rstd, void* dx, void* dweight, void* dbias,
                           float* workspace, int64_t workspace_floats, int64_t M, int64_t N, bool rms,
                           cudaStream_t stream) {
  if (M < 0 || N <= 0 || (!rms && mean == nullptr) || rstd == nullptr) return cudaErrorInvalidValue;
  if (M == 0) {  // no rows: the weight gradients are sums over nothing
    cudaError_t err = cudaMemsetAsync(dweight, 0, N * dtype_size(dtype), stream);
    if (err == cudaSuccess && dbias != nullptr) err = cudaMemsetAsync(dbias, 0, N * dtype_size(dtype), stream);
    return err;
  }
  if (M > INT_MAX || N > INT_MAX) return cudaErrorInvalidConfiguration;
  if (workspace == nullptr || workspace_floats < layer_norm_bwd_workspace_floats(M, N, dbias != nullptr))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::Float32:
      return bwd_typed<float>(dy, dh, h, weight, mean, rstd, dx, dweight, dbias, workspace, M, N, rms, stream);
    case DType::BFloat16:
      return bwd_typed<__nv_bfloat16>(dy, dh, h, weight, mean, rstd, dx, dweight, dbias, workspace, M, N, rms,
                                      stream);
    case DType::Float16:
      return bwd_typed<__half>(dy, dh, h, weight, mean, rstd, dx, dweight, dbias, workspace, M, N, rms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusedlm
