// CUDA attention for float32 inputs on CUDA cores (FFMA), forward and backward: the same math,
// masks, GQA indexing and outputs as the tensor-core kernels (attention_fwd.cu, attention_bwd.cu,
// which launch these for DType::Float32 after the shared preprocess), in full float32.
//
// One warp per row, 32 keys (or queries) per shared-memory tile; lane j of a warp owns the tile's
// row j for the dot products (s_j = q . k_j, a padded [32][D + 1] tile: the lanes' rows fall in
// different banks) and the columns lane, lane + 32, ... of the accumulators (o, dq, dk, dv), which
// take the tile's rows one by one through a warp shuffle of p_j / ds_j.
//   forward  (8 query rows per block): online softmax in base 2 over key tiles, as attention_fwd.cu.
//   dq       (8 query rows per block): ds_j = p_j (dO . v_j - delta); dq += ds_j k_j.
//   dkdv     (8 keys per block, looping over the G query heads of the group and their query tiles):
//            dv += p_j dO_j;  dk += ds_j q_j.  Fixed order, no atomics: deterministic.
// Memory traffic as the tensor-core kernels with 8-row blocks: K, V (forward, dq) or q, dO (dkdv)
// are read once per 8 rows, through L2.
#include "cuda/attention.h"
#include "cuda/attention_common.cuh"

namespace fusedlm {
namespace cuda {
namespace {

using namespace attn;

constexpr int kRows = 8, kThreads = kRows * kWarp, kTile = 32;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Rows [row0, row0 + ROWS) of a strided (rows, D) float matrix into a [ROWS][P] tile; rows at or
// past n_rows are zeros.
template <int ROWS, int D, int P>
__device__ __forceinline__ void load_rows(float (*tile)[P], const float* base, int64_t stride, int row0, int n_rows) {
  for (int i = threadIdx.x; i < ROWS * D; i += kThreads) {
    const int r = i / D, c = i % D;
    tile[r][c] = row0 + r < n_rows ? base[static_cast<int64_t>(row0 + r) * stride + c] : 0.f;
  }
}

template <int D>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
  float s = 0.f;
#pragma unroll 16
  for (int d = 0; d < D; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

template <int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_fp32_kernel(const FwdParams p) {
  constexpr int C = (D + kWarp - 1) / kWarp;
  __shared__ float sk[kTile][D + 1], sv[kTile][D + 1], sq[kRows][D];
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / p.group;
  const float* q = static_cast<const float*>(p.q) + b * p.qs.batch + h * p.qs.head;
  const float* k = static_cast<const float*>(p.k) + b * p.ks.batch + h_kv * p.ks.head;
  const float* v = static_cast<const float*>(p.v) + b * p.vs.batch + h_kv * p.vs.head;
  const int offset = p.n_k - p.n_q;
  const int key_end = p.causal ? min(p.n_k, max(0, m0 + kRows + offset)) : p.n_k;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, row = m0 + warp;
  load_rows<kRows, D, D>(sq, q, p.qs.row, m0, p.n_q);

  float o[C] = {}, m = -INFINITY, l = 0.f;
  for (int n0 = 0; n0 < key_end; n0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and sq is written, the first time)
    load_rows<kTile, D, D + 1>(sk, k, p.ks.row, n0, p.n_k);
    load_rows<kTile, D, D + 1>(sv, v, p.vs.row, n0, p.n_k);
    __syncthreads();
    const int key = n0 + lane;
    float s = dot_row<D>(sq[warp], sk[lane]) * p.scale_log2;
    if (key >= p.n_k || (p.causal && key > row + offset)) s = -INFINITY;
    const float mx = fmaxf(m, warp_max(s));
    const float shift = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(m - shift), pj = exp2f(s - shift);
    l = l * alpha + warp_sum(pj);
    m = mx;
#pragma unroll
    for (int c = 0; c < C; ++c) o[c] *= alpha;
    for (int j = 0; j < kTile; ++j) {
      const float w = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (lane + c * kWarp < D) o[c] = fmaf(w, sv[j][lane + c * kWarp], o[c]);
      }
    }
  }
  if (row >= p.n_q) return;
  const int64_t dense = (static_cast<int64_t>(b) * p.heads_q + h) * p.n_q + row;
  if (lane == 0) p.lse[dense] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  float* out = static_cast<float*>(p.out) + dense * D;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    if (lane + c * kWarp < D) out[lane + c * kWarp] = o[c] * inv;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_fp32_kernel(const BwdParams p) {
  constexpr int C = (D + kWarp - 1) / kWarp;
  __shared__ float sk[kTile][D + 1], sv[kTile][D + 1], sq[kRows][D], sdo[kRows][D];
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / p.group;
  const float* q = static_cast<const float*>(p.q) + b * p.qs.batch + h * p.qs.head;
  const float* dout = static_cast<const float*>(p.dout) + b * p.dos.batch + h * p.dos.head;
  const float* k = static_cast<const float*>(p.k) + b * p.ks.batch + h_kv * p.ks.head;
  const float* v = static_cast<const float*>(p.v) + b * p.vs.batch + h_kv * p.vs.head;
  const int offset = p.n_k - p.n_q;
  const int key_end = p.causal ? min(p.n_k, max(0, m0 + kRows + offset)) : p.n_k;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, row = m0 + warp;
  const int64_t padded = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad + row;  // row < rows_pad
  const float lse2 = p.lse2[padded], delta = p.delta[padded];
  load_rows<kRows, D, D>(sq, q, p.qs.row, m0, p.n_q);
  load_rows<kRows, D, D>(sdo, dout, p.dos.row, m0, p.n_q);

  float dq[C] = {};
  for (int n0 = 0; n0 < key_end; n0 += kTile) {
    __syncthreads();
    load_rows<kTile, D, D + 1>(sk, k, p.ks.row, n0, p.n_k);
    load_rows<kTile, D, D + 1>(sv, v, p.vs.row, n0, p.n_k);
    __syncthreads();
    const int key = n0 + lane;
    float pj = exp2f(dot_row<D>(sq[warp], sk[lane]) * p.scale_log2 - lse2);
    if (key >= p.n_k || (p.causal && key > row + offset)) pj = 0.f;
    const float ds = pj * (dot_row<D>(sdo[warp], sv[lane]) - delta);
    for (int j = 0; j < kTile; ++j) {
      const float w = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (lane + c * kWarp < D) dq[c] = fmaf(w, sk[j][lane + c * kWarp], dq[c]);
      }
    }
  }
  if (row >= p.n_q) return;
  float* out = static_cast<float*>(p.dq) + ((static_cast<int64_t>(b) * p.heads_q + h) * p.n_q + row) * D;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    if (lane + c * kWarp < D) out[lane + c * kWarp] = dq[c] * p.scale;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_fp32_kernel(const BwdParams p) {
  constexpr int C = (D + kWarp - 1) / kWarp;
  __shared__ float sq[kTile][D + 1], sdo[kTile][D + 1], sk[kRows][D], sv[kRows][D], slse[kTile], sdelta[kTile];
  const int n0 = blockIdx.x * kRows, h_kv = blockIdx.y, b = blockIdx.z;
  const float* k = static_cast<const float*>(p.k) + b * p.ks.batch + h_kv * p.ks.head;
  const float* v = static_cast<const float*>(p.v) + b * p.vs.batch + h_kv * p.vs.head;
  const int offset = p.n_k - p.n_q;
  const int m_begin = p.causal ? max(0, n0 - offset) / kTile * kTile : 0;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, key = n0 + warp;
  load_rows<kRows, D, D>(sk, k, p.ks.row, n0, p.n_k);
  load_rows<kRows, D, D>(sv, v, p.vs.row, n0, p.n_k);

  float dk[C] = {}, dv[C] = {};
  for (int g = 0; g < p.group; ++g) {
    const int h = h_kv * p.group + g;
    const float* q = static_cast<const float*>(p.q) + b * p.qs.batch + h * p.qs.head;
    const float* dout = static_cast<const float*>(p.dout) + b * p.dos.batch + h * p.dos.head;
    const int64_t padded = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad;
    for (int m0 = m_begin; m0 < p.n_q; m0 += kTile) {
      __syncthreads();
      load_rows<kTile, D, D + 1>(sq, q, p.qs.row, m0, p.n_q);
      load_rows<kTile, D, D + 1>(sdo, dout, p.dos.row, m0, p.n_q);
      if (threadIdx.x < kTile) {  // padded rows: lse2 = +inf (P = 0) past Nq
        slse[threadIdx.x] = p.lse2[padded + m0 + threadIdx.x];
        sdelta[threadIdx.x] = p.delta[padded + m0 + threadIdx.x];
      }
      __syncthreads();
      float pj = exp2f(dot_row<D>(sq[lane], sk[warp]) * p.scale_log2 - slse[lane]);
      if (p.causal && key > m0 + lane + offset) pj = 0.f;
      const float ds = pj * (dot_row<D>(sdo[lane], sv[warp]) - sdelta[lane]);
      for (int j = 0; j < kTile; ++j) {
        const float wp = __shfl_sync(0xffffffffu, pj, j), ws = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
        for (int c = 0; c < C; ++c) {
          if (lane + c * kWarp < D) {
            dv[c] = fmaf(wp, sdo[j][lane + c * kWarp], dv[c]);
            dk[c] = fmaf(ws, sq[j][lane + c * kWarp], dk[c]);
          }
        }
      }
    }
  }
  if (key >= p.n_k) return;  // after the loop: every warp takes part in the block's barriers
  const int64_t dense = ((static_cast<int64_t>(b) * p.heads_kv + h_kv) * p.n_k + key) * D;
  float* dk_out = static_cast<float*>(p.dk) + dense;
  float* dv_out = static_cast<float*>(p.dv) + dense;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    if (lane + c * kWarp < D) {
      dk_out[lane + c * kWarp] = dk[c] * p.scale;
      dv_out[lane + c * kWarp] = dv[c];
    }
  }
}

template <int D>
cudaError_t fwd_fp32(const FwdParams& p, int batch, cudaStream_t stream) {
  const dim3 grid((p.n_q + kRows - 1) / kRows, p.heads_q, batch);
  attention_fwd_fp32_kernel<D><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int D>
cudaError_t bwd_fp32(const BwdParams& p, int batch, cudaStream_t stream) {
  if (p.n_k > 0) {
    const dim3 grid((p.n_k + kRows - 1) / kRows, p.heads_kv, batch);
    attention_bwd_dkdv_fp32_kernel<D><<<grid, kThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.n_q == 0) return cudaSuccess;
  const dim3 grid((p.n_q + kRows - 1) / kRows, p.heads_q, batch);
  attention_bwd_dq_fp32_kernel<D><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

namespace attn {

cudaError_t attention_fwd_fp32(const FwdParams& p, int batch, int64_t head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return fwd_fp32<64>(p, batch, stream);
    case 80:
      return fwd_fp32<80>(p, batch, stream);
    case 96:
      return fwd_fp32<96>(p, batch, stream);
    case 128:
      return fwd_fp32<128>(p, batch, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t attention_bwd_fp32(const BwdParams& p, int batch, int64_t head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return bwd_fp32<64>(p, batch, stream);
    case 80:
      return bwd_fp32<80>(p, batch, stream);
    case 96:
      return bwd_fp32<96>(p, batch, stream);
    case 128:
      return bwd_fp32<128>(p, batch, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace attn
}  // namespace cuda
}  // namespace fusedlm
