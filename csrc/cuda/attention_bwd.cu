// CUDA attention backward, FlashAttention-2 on tensor cores (contract in attention.h; forward and
// the online softmax in attention_fwd.cu; fragment layouts in attention_common.cuh).
//
// P is recomputed from the forward's lse (nothing N x N is stored). Three launches, no atomics:
//
//   preprocess  delta_i = rowsum(dO_i * O_i) - dlse_i;  lse2_i = lse_i log2(e)  (+inf where lse = -inf:
//               P = exp2(s - inf) = 0 for a row that saw no key). Padded rows: delta 0, lse2 +inf.
//   dkdv        a block owns BN = 16 * kWarps keys of one kv head; warp w owns keys [16 w, 16 w + 16)
//               and loops over the G query heads of its group and their query blocks (BM rows),
//               summing dK, dV in registers in a fixed order:
//                 s^T = k q^T;  P^T = exp2(s^T scale log2(e) - lse2);  dV += P^T dO
//                 dP^T = v dO^T;  dS^T = P^T (dP^T - delta);  dK += dS^T q     (dK *= scale at the end)
//   dq          a block owns BM = 16 * kWarps query rows and loops over key blocks:
//                 P = exp2(q k^T scale log2(e) - lse2);  dS = P (dO v^T - delta);  dQ += dS k
//
// Causal: dkdv starts at the first query block that sees the block's first key (query i >= n0 - Nk + Nq),
// dq stops after the last key block its last row sees; only blocks on the diagonal (and the dq
// kernel's Nk tail) evaluate the mask. q, dO, lse2 and delta tiles (dkdv) and K, V tiles (dq) are
// double-buffered with cp.async, one __syncthreads per step.
// Memory traffic: dkdv reads K, V once and q, dO (+ 8 bytes of lse2 / delta per row) once per key
// block; dq reads q, dO once and K, V once per query block; each gradient is written once.
#include "cuda/attention.h"
#include "cuda/attention_common.cuh"

namespace fusedlm {
namespace cuda {
namespace {

using namespace attn;

// One warp per row of (B, Hq, padded rows). O is contiguous, dO strided.
template <typename T>
__global__ void __launch_bounds__(128) attention_bwd_preprocess_kernel(
    const T* __restrict__ dout, RowStrides dos, const T* __restrict__ out, const float* __restrict__ lse,
    const float* __restrict__ dlse, float* __restrict__ delta, float* __restrict__ lse2, int heads_q, int n_q,
    int rows_pad, int d, int64_t total_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / kWarp;
  if (row >= total_rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t bh = row / rows_pad;
  const int i = static_cast<int>(row % rows_pad);
  if (i >= n_q) {
    if (lane == 0) {
      delta[row] = 0.f;
      lse2[row] = INFINITY;
    }
    return;
  }
  const int64_t b = bh / heads_q, h = bh % heads_q, dense = bh * n_q + i;
  const T* o_row = out + dense * d;
  const T* do_row = dout + b * dos.batch + h * dos.head + i * dos.row;
  float acc = 0.f;
  for (int c = lane; c < d; c += kWarp) acc += Elem<T>::to_float(o_row[c]) * Elem<T>::to_float(do_row[c]);
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    delta[row] = acc - (dlse != nullptr ? dlse[dense] : 0.f);
    const float l = lse[dense];
    lse2[row] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

template <int D>
struct DkdvTile {
  static constexpr int kWarps = 4, kBN = 16 * kWarps, kBM = D <= 64 ? 64 : 32, kThreads = kWarps * kWarp;
  // k, v; 2 stages of q, dO; 2 stages of lse2, delta
  static constexpr int kSmemBytes = (2 * kBN + 4 * kBM) * Smem<D>::kStride * 2 + 4 * kBM * 4;
};

// gpu_report: uses_tensor_cores(HMMA) attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
template <typename T, int D>
__global__ void __launch_bounds__(DkdvTile<D>::kThreads) attention_bwd_dkdv_kernel(const BwdParams p) {
  using Tile = DkdvTile<D>;
  constexpr int S = Smem<D>::kStride, BM = Tile::kBM, BN = Tile::kBN, kThreads = Tile::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + BN * S;
  T* sq = sv + BN * S;    // [2][BM][S]
  T* sdo = sq + 2 * BM * S;  // [2][BM][S]
  float* slse = reinterpret_cast<float*>(sdo + 2 * BM * S);  // [2][BM]
  float* sdelta = slse + 2 * BM;                              // [2][BM]

  const int n0 = blockIdx.x * BN, h_kv = blockIdx.y, b = blockIdx.z;
  const int offset = p.n_k - p.n_q;  // causal: query i sees keys j <= i + offset
  const int m_begin = p.causal ? max(0, n0 - offset) / BM * BM : 0;
  const int m_count = m_begin < p.n_q ? (p.n_q - m_begin + BM - 1) / BM : 0;
  const int steps = p.group * m_count;

  const T* k = static_cast<const T*>(p.k) + b * p.ks.batch + h_kv * p.ks.head;
  const T* v = static_cast<const T*>(p.v) + b * p.vs.batch + h_kv * p.vs.head;
  const int tid = threadIdx.x;
  // Stage `stage` <- q, dO, lse2, delta rows [m0, m0 + BM) of query head h_kv * G + (step / m_count).
  auto load_step = [&](int step, int stage) {
    const int h = h_kv * p.group + step / m_count, m0 = m_begin + (step % m_count) * BM;
    const T* q = static_cast<const T*>(p.q) + b * p.qs.batch + h * p.qs.head;
    const T* dout = static_cast<const T*>(p.dout) + b * p.dos.batch + h * p.dos.head;
    load_tile_async<BM, D, kThreads>(sq + stage * BM * S, q, p.qs.row, m0, p.n_q);
    load_tile_async<BM, D, kThreads>(sdo + stage * BM * S, dout, p.dos.row, m0, p.n_q);
    const int64_t rows = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad + m0;  // padded: no bound
    if (tid < BM / 4) {
      cp_async_16(slse + stage * BM + 4 * tid, p.lse2 + rows + 4 * tid, true);
    } else if (tid < BM / 2) {
      cp_async_16(sdelta + stage * BM + 4 * (tid - BM / 4), p.delta + rows + 4 * (tid - BM / 4), true);
    }
  };
  load_tile_async<BN, D, kThreads>(sk, k, p.ks.row, n0, p.n_k);
  load_tile_async<BN, D, kThreads>(sv, v, p.vs.row, n0, p.n_k);
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  const int warp = tid / kWarp, lane = tid % kWarp, g = lane >> 2, t = lane & 3;
  const int key[2] = {n0 + 16 * warp + g, n0 + 16 * warp + g + 8};
  const T* sk_warp = sk + 16 * warp * S;
  const T* sv_warp = sv + 16 * warp * S;
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};

  for (int step = 0; step < steps; ++step) {
    cp_async_wait<0>();
    __syncthreads();
    if (step + 1 < steps) load_step(step + 1, (step + 1) & 1);
    cp_async_commit();
    const int stage = step & 1, m0 = m_begin + (step % m_count) * BM;
    const T* sq_s = sq + stage * BM * S;
    const T* sdo_s = sdo + stage * BM * S;
    const float* slse_s = slse + stage * BM;
    const float* sdelta_s = sdelta + stage * BM;

    float st[BM / 8][4] = {};
    mma_abt<T, BM, D, S>(st, sk_warp, sq_s, lane);
    // Keys past Nk give garbage P^T rows here, but only in dK / dV rows that are never stored.
    const bool masked = p.causal && n0 + BN - 1 > m0 + offset;
#pragma unroll
    for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = 8 * n + 2 * t + (e & 1);
        st[n][e] = exp2f(st[n][e] * p.scale_log2 - slse_s[qi]);  // rows past Nq: lse2 = +inf, P = 0
        if (masked && key[e >> 1] > m0 + qi + offset) st[n][e] = 0.f;
      }
    }
    uint32_t a[BM / 16][4];
    to_a_frags<T, BM>(st, a);
    mma_pb<T, BM, D, S>(dv, a, sdo_s, lane);

    float dpt[BM / 8][4] = {};
    mma_abt<T, BM, D, S>(dpt, sv_warp, sdo_s, lane);
#pragma unroll
    for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[n][e] = st[n][e] * (dpt[n][e] - sdelta_s[8 * n + 2 * t + (e & 1)]);
    }
    to_a_frags<T, BM>(dpt, a);
    mma_pb<T, BM, D, S>(dk, a, sq_s, lane);
  }
  cp_async_wait<0>();

  const int64_t head_rows = (static_cast<int64_t>(b) * p.heads_kv + h_kv) * p.n_k * D;
  store_rows<T, D>(static_cast<T*>(p.dk) + head_rows, dk, n0 + 16 * warp, p.n_k, p.scale, p.scale, lane);
  store_rows<T, D>(static_cast<T*>(p.dv) + head_rows, dv, n0 + 16 * warp, p.n_k, 1.f, 1.f, lane);
}

template <int D>
struct DqTile {
  static constexpr int kWarps = 4, kBM = 16 * kWarps, kBN = D <= 64 ? 64 : 32, kThreads = kWarps * kWarp;
  static constexpr int kSmemBytes = (2 * kBM + 4 * kBN) * Smem<D>::kStride * 2;  // q, dO; 2 stages of k, v
};

template <typename T, int D>
__global__ void __launch_bounds__(DqTile<D>::kThreads) attention_bwd_dq_kernel(const BwdParams p) {
  using Tile = DqTile<D>;
  constexpr int S = Smem<D>::kStride, BM = Tile::kBM, BN = Tile::kBN, kThreads = Tile::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sdo = sq + BM * S;
  T* sk = sdo + BM * S;  // [2][BN][S]
  T* sv = sk + 2 * BN * S;

  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.qs.batch + h * p.qs.head;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dos.batch + h * p.dos.head;
  const T* k = static_cast<const T*>(p.k) + b * p.ks.batch + h_kv * p.ks.head;
  const T* v = static_cast<const T*>(p.v) + b * p.vs.batch + h_kv * p.vs.head;
  const int offset = p.n_k - p.n_q;
  const int key_end = p.causal ? min(p.n_k, max(0, m0 + BM + offset)) : p.n_k;
  const int n_blocks = (key_end + BN - 1) / BN;

  load_tile_async<BM, D, kThreads>(sq, q, p.qs.row, m0, p.n_q);
  load_tile_async<BM, D, kThreads>(sdo, dout, p.dos.row, m0, p.n_q);
  if (n_blocks > 0) {
    load_tile_async<BN, D, kThreads>(sk, k, p.ks.row, 0, p.n_k);
    load_tile_async<BN, D, kThreads>(sv, v, p.vs.row, 0, p.n_k);
  }
  cp_async_commit();

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane >> 2, t = lane & 3;
  const int row[2] = {m0 + 16 * warp + g, m0 + 16 * warp + g + 8};
  const int64_t rows = (static_cast<int64_t>(b) * p.heads_q + h) * p.rows_pad;  // padded: rows past Nq exist
  const float lse2[2] = {p.lse2[rows + row[0]], p.lse2[rows + row[1]]};
  const float delta[2] = {p.delta[rows + row[0]], p.delta[rows + row[1]]};
  const T* sq_warp = sq + 16 * warp * S;
  const T* sdo_warp = sdo + 16 * warp * S;
  float dq[D / 8][4] = {};

  for (int j = 0; j < n_blocks; ++j) {
    cp_async_wait<0>();
    __syncthreads();
    if (j + 1 < n_blocks) {
      const int stage = (j + 1) & 1;
      load_tile_async<BN, D, kThreads>(sk + stage * BN * S, k, p.ks.row, (j + 1) * BN, p.n_k);
      load_tile_async<BN, D, kThreads>(sv + stage * BN * S, v, p.vs.row, (j + 1) * BN, p.n_k);
    }
    cp_async_commit();
    const T* sk_j = sk + (j & 1) * BN * S;
    const T* sv_j = sv + (j & 1) * BN * S;

    float s[BN / 8][4] = {};
    mma_abt<T, BN, D, S>(s, sq_warp, sk_j, lane);
    const int n0 = j * BN;
    const bool masked = n0 + BN > p.n_k || (p.causal && n0 + BN - 1 > m0 + offset);
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = exp2f(s[n][e] * p.scale_log2 - lse2[e >> 1]);
        if (masked) {
          const int col = n0 + 8 * n + 2 * t + (e & 1);
          if (col >= p.n_k || (p.causal && col > row[e >> 1] + offset)) s[n][e] = 0.f;
        }
      }
    }
    float dp[BN / 8][4] = {};
    mma_abt<T, BN, D, S>(dp, sdo_warp, sv_j, lane);
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - delta[e >> 1]);
    }
    uint32_t a[BN / 16][4];
    to_a_frags<T, BN>(dp, a);
    mma_pb<T, BN, D, S>(dq, a, sk_j, lane);
  }
  cp_async_wait<0>();

  T* dq_out = static_cast<T*>(p.dq) + (static_cast<int64_t>(b) * p.heads_q + h) * p.n_q * D;
  store_rows<T, D>(dq_out, dq, m0 + 16 * warp, p.n_q, p.scale, p.scale, lane);
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, int smem, const BwdParams& p, cudaStream_t stream) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(const BwdParams& p, int batch, cudaStream_t stream) {
  using Kv = DkdvTile<D>;
  using Q = DqTile<D>;
  if (p.n_k > 0) {  // dK, dV (zeros when Nq = 0)
    const dim3 grid((p.n_k + Kv::kBN - 1) / Kv::kBN, p.heads_kv, batch);
    const cudaError_t err = launch(attention_bwd_dkdv_kernel<T, D>, grid, Kv::kThreads, Kv::kSmemBytes, p, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.n_q == 0) return cudaSuccess;
  const dim3 grid((p.n_q + Q::kBM - 1) / Q::kBM, p.heads_q, batch);
  return launch(attention_bwd_dq_kernel<T, D>, grid, Q::kThreads, Q::kSmemBytes, p, stream);
}

template <typename T>
cudaError_t bwd_head_dim(const BwdParams& p, int batch, int64_t d, cudaStream_t stream) {
  switch (d) {
    case 64:
      return launch_bwd<T, 64>(p, batch, stream);
    case 80:
      return launch_bwd<T, 80>(p, batch, stream);
    case 96:
      return launch_bwd<T, 96>(p, batch, stream);
    case 128:
      return launch_bwd<T, 128>(p, batch, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_preprocess(const void* dout, RowStrides dos, const void* out, const float* lse, const float* dlse,
                              float* delta, float* lse2, const AttentionDims& dims, cudaStream_t stream) {
  const int64_t rows_pad = attention_padded_rows(dims.n_q);
  const int64_t total = dims.batch * dims.heads_q * rows_pad;
  attention_bwd_preprocess_kernel<T><<<static_cast<unsigned>((total + 3) / 4), 128, 0, stream>>>(
      static_cast<const T*>(dout), dos, static_cast<const T*>(out), lse, dlse, delta, lse2,
      static_cast<int>(dims.heads_q), static_cast<int>(dims.n_q), static_cast<int>(rows_pad),
      static_cast<int>(dims.head_dim), total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_bwd(DType dtype, const void* dout, const void* q, const void* k, const void* v, const void* out,
                          const float* lse, const float* dlse, void* dq, void* dk, void* dv, float* workspace,
                          const AttentionDims& dims, RowStrides dout_strides, RowStrides q_strides,
                          RowStrides k_strides, RowStrides v_strides, float scale, bool causal, cudaStream_t stream) {
  if (!attention_dims_ok(dims)) return cudaErrorInvalidValue;
  if (dims.batch == 0 || (dims.n_q == 0 && dims.n_k == 0)) return cudaSuccess;
  const bool fp32 = dtype == DType::Float32;
  if (!fp32 && (!rows_aligned(dout, dout_strides) || !rows_aligned(q, q_strides) || !rows_aligned(k, k_strides) ||
                !rows_aligned(v, v_strides))) {
    return cudaErrorInvalidValue;
  }
  float* delta = workspace;
  float* lse2 = workspace + attention_bwd_workspace_floats(dims) / 2;
  if (dims.n_q > 0) {
    const cudaError_t err =
        dtype == DType::Float32   ? launch_preprocess<float>(dout, dout_strides, out, lse, dlse, delta, lse2, dims, stream)
        : dtype == DType::Float16 ? launch_preprocess<__half>(dout, dout_strides, out, lse, dlse, delta, lse2, dims, stream)
                                  : launch_preprocess<__nv_bfloat16>(dout, dout_strides, out, lse, dlse, delta, lse2,
                                                                     dims, stream);
    if (err != cudaSuccess) return err;
  }
  const BwdParams p{q, k, v, dout, dq, dk, dv, lse2, delta, q_strides, k_strides, v_strides, dout_strides,
                    static_cast<int>(dims.heads_q), static_cast<int>(dims.heads_kv),
                    static_cast<int>(dims.heads_q / dims.heads_kv), static_cast<int>(dims.n_q),
                    static_cast<int>(dims.n_k), static_cast<int>(attention_padded_rows(dims.n_q)), scale,
                    scale * kLog2e, causal};
  const int batch = static_cast<int>(dims.batch);
  if (fp32) return attention_bwd_fp32(p, batch, dims.head_dim, stream);
  return dtype == DType::Float16 ? bwd_head_dim<__half>(p, batch, dims.head_dim, stream)
                                 : bwd_head_dim<__nv_bfloat16>(p, batch, dims.head_dim, stream);
}

}  // namespace cuda
}  // namespace fusedlm
