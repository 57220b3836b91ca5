// CUDA attention forward, FlashAttention-2 on tensor cores (contract in attention.h; building
// blocks and fragment layouts in attention_common.cuh; backward in attention_bwd.cu).
//
// A block owns BM = 16 * kMT * kWarps query rows of one (batch, query head); warp w owns the kMT
// 16-row tiles of rows [16 kMT w, 16 kMT (w + 1)) and never talks to the other warps. Each K and V
// fragment a warp reads from shared memory feeds kMT MMAs (FlashAttention-2's 128-row blocks of 4
// warps): with kMT = 1 (64-row blocks) the H200 run of 2026-11-29 had this forward at 0.76x SDPA's
// flash backend, bound by ldmatrix traffic. Over key blocks j of BN keys, in float32:
//
//   s   = q k_j^T,  c = scale * log2(e)      base 2: exp2 instead of exp, the scale applied after the shift
//   m'  = max(m, rowmax s);  p = exp2((s - m') c);  alpha = exp2((m - m') c)
//   l   = alpha l + rowsum p;  o = alpha o + p v_j   (p rounded to T for the tensor cores)
//   out = o / l;  lse = (c m + log2 l) ln 2
//
// The max stays in the raw scores' units so that the row max's p is exactly 1 (FlashAttention-2's
// single FMA, exp2(c s - round(c m')), leaves p = 2^(the rounding error of c m'), which reaches 2^31
// and more for scores around 1e9). A row whose keys are all masked so far keeps m = -inf and shifts
// by 0 instead (p = alpha = 0, never NaN); if it never sees a key it stores out = 0 and lse = -inf. o *= alpha is skipped for a warp's row tile when no lane's
// alpha differs from 1 (no row's max moved: the same bits), which after the first key blocks is most.
// Causal (query i sees key j iff j <= i + Nk - Nq): the key loop stops after the last key the
// block's last row sees, so blocks above the diagonal are never loaded. The mask is a separate
// instance of the loop body (kMasked), run for the blocks that cross the diagonal or the Nk tail
// only: left to a runtime flag, the compiler predicated the mask's compares and selects into every
// block's code.
// Pipeline: K_j, V_j for stage j & 1 arrive by cp.async while block j - 1 is computed (one
// __syncthreads per key block). Rows past Nq / keys past Nk are zero-filled in shared memory.
// Memory traffic: q once, K and V once per query block (B Hq ceil(Nq / BM) 2 Nk D bytes-per-element,
// about halved by causal skipping), out once, 4 bytes of lse per row.
#include <type_traits>

#include "cuda/attention.h"
#include "cuda/attention_common.cuh"

namespace fusedlm {
namespace cuda {
namespace {

using namespace attn;

// 128 query rows (4 warps of 2 row tiles) by BN keys: 64 up to D = 80, 32 above, where 64 spills (the
// kMT * D / 2 output floats per lane leave too few registers for a 64-key score tile).
template <int D>
struct FwdTile {
  static constexpr int kWarps = 4, kMT = 2, kBM = 16 * kMT * kWarps, kBN = D > 80 ? 32 : 64;
  static constexpr int kThreads = kWarps * kWarp;
  static constexpr int kSmemBytes = (kBM + 4 * kBN) * Smem<D>::kStride * 2;  // q, 2 stages of k and v
};

// gpu_report: uses_tensor_cores(HMMA) attention_fwd_kernel
template <typename T, int D>
__global__ void __launch_bounds__(FwdTile<D>::kThreads) attention_fwd_kernel(const FwdParams p) {
  using Tile = FwdTile<D>;
  constexpr int S = Smem<D>::kStride, BM = Tile::kBM, BN = Tile::kBN, MT = Tile::kMT, kThreads = Tile::kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + BM * S;  // [2][BN][S]
  T* sv = sk + 2 * BN * S;

  // Heavy causal blocks (the last rows see the most keys) start first.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int h = blockIdx.y, b = blockIdx.z, h_kv = h / p.group;
  const T* q = static_cast<const T*>(p.q) + b * p.qs.batch + h * p.qs.head;
  const T* k = static_cast<const T*>(p.k) + b * p.ks.batch + h_kv * p.ks.head;
  const T* v = static_cast<const T*>(p.v) + b * p.vs.batch + h_kv * p.vs.head;
  const int offset = p.n_k - p.n_q;  // causal: row i sees keys j <= i + offset
  const int key_end = p.causal ? min(p.n_k, max(0, m0 + BM + offset)) : p.n_k;
  const int n_blocks = (key_end + BN - 1) / BN;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane >> 2, t = lane & 3;
  load_tile_async<BM, D, kThreads>(sq, q, p.qs.row, m0, p.n_q);
  if (n_blocks > 0) {
    load_tile_async<BN, D, kThreads>(sk, k, p.ks.row, 0, p.n_k);
    load_tile_async<BN, D, kThreads>(sv, v, p.vs.row, 0, p.n_k);
  }
  cp_async_commit();

  // Per row tile i: o, and per accumulator row half r (row row0 + 16 i + g + 8 r) the running max m
  // and sum l.
  float o[MT][D / 8][4] = {};
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    m[i][0] = m[i][1] = -INFINITY;
    l[i][0] = l[i][1] = 0.f;
  }
  const int row0 = m0 + 16 * MT * warp + g;
  const T* sq_warp = sq + 16 * MT * warp * S;

  // One key block: wait for its K and V, prefetch the next block's, then scores, online softmax and P V.
  auto key_block = [&](const int j, auto masked_tag) {
    constexpr bool kMasked = decltype(masked_tag)::value;
    cp_async_wait<0>();
    __syncthreads();  // block j landed for every thread; everyone is done with block j - 1's stage
    if (j + 1 < n_blocks) {
      const int stage = (j + 1) & 1;
      load_tile_async<BN, D, kThreads>(sk + stage * BN * S, k, p.ks.row, (j + 1) * BN, p.n_k);
      load_tile_async<BN, D, kThreads>(sv + stage * BN * S, v, p.vs.row, (j + 1) * BN, p.n_k);
    }
    cp_async_commit();
    const T* sk_j = sk + (j & 1) * BN * S;
    const T* sv_j = sv + (j & 1) * BN * S;

    float s[MT][BN / 8][4] = {};
    mma_abt_tiles<T, MT, BN, D, S>(s, sq_warp, sk_j, lane);

    uint32_t pa[MT][BN / 16][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if constexpr (kMasked) {
        const int n0 = j * BN;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n0 + 8 * n + 2 * t + (e & 1);
            const int row = row0 + 16 * i + 8 * (e >> 1);
            if (col >= p.n_k || (p.causal && col > row + offset)) s[i][n][e] = -INFINITY;
          }
        }
      }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[i][n][2 * r], s[i][n][2 * r + 1]));
        const float m_new = fmaxf(m[i][r], quad_max(mx));
        const float shift = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = exp2_approx((m[i][r] - shift) * p.scale_log2);
        m[i][r] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
          s[i][n][2 * r] = exp2_approx((s[i][n][2 * r] - shift) * p.scale_log2);
          s[i][n][2 * r + 1] = exp2_approx((s[i][n][2 * r + 1] - shift) * p.scale_log2);
          sum += s[i][n][2 * r] + s[i][n][2 * r + 1];
        }
        l[i][r] = l[i][r] * alpha[r] + sum;  // this lane's columns only; summed over the quad at the end
      }
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {  // warp-uniform
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
          o[i][d][0] *= alpha[0];
          o[i][d][1] *= alpha[0];
          o[i][d][2] *= alpha[1];
          o[i][d][3] *= alpha[1];
        }
      }
      to_a_frags<T, BN>(s[i], pa[i]);
    }
    mma_pb_tiles<T, MT, BN, D, S>(o, pa, sv_j, lane);
  };
  // Key blocks [0, n_plain) need no mask: every key is < Nk and, causal, seen by the block's first row
  // (key n0 + BN - 1 <= m0 + offset), hence by all of them.
  const int n_plain =
      min(n_blocks, min(p.n_k / BN, p.causal ? max(0, m0 + offset + 1) / BN : n_blocks));
  for (int j = 0; j < n_plain; ++j) key_block(j, std::false_type{});
  for (int j = n_plain; j < n_blocks; ++j) key_block(j, std::true_type{});
  cp_async_wait<0>();

  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.heads_q + h) * p.n_q * D;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(l[i][r]);
      inv[r] = sum > 0.f ? 1.f / sum : 0.f;
      const int row = row0 + 16 * i + 8 * r;
      if (t == 0 && row < p.n_q) {
        p.lse[(static_cast<int64_t>(b) * p.heads_q + h) * p.n_q + row] =
            sum > 0.f ? (m[i][r] * p.scale_log2 + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
    store_rows<T, D>(out, o[i], m0 + 16 * (MT * warp + i), p.n_q, inv[0], inv[1], lane);
  }
}

template <typename T, int D>
cudaError_t launch_fwd(const FwdParams& p, int batch, cudaStream_t stream) {
  using Tile = FwdTile<D>;
  auto kernel = attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.n_q + Tile::kBM - 1) / Tile::kBM, p.heads_q, batch);
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_head_dim(const FwdParams& p, int batch, int64_t d, cudaStream_t stream) {
  switch (d) {
    case 64:
      return launch_fwd<T, 64>(p, batch, stream);
    case 80:
      return launch_fwd<T, 80>(p, batch, stream);
    case 96:
      return launch_fwd<T, 96>(p, batch, stream);
    case 128:
      return launch_fwd<T, 128>(p, batch, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t attention_fwd(DType dtype, const void* q, const void* k, const void* v, void* out, float* lse,
                          const AttentionDims& dims, RowStrides q_strides, RowStrides k_strides, RowStrides v_strides,
                          float scale, bool causal, cudaStream_t stream) {
  if (!attention_dims_ok(dims)) return cudaErrorInvalidValue;
  if (dims.n_q == 0 || dims.batch == 0) return cudaSuccess;
  if (dtype != DType::Float32 &&
      (!rows_aligned(q, q_strides) || !rows_aligned(k, k_strides) || !rows_aligned(v, v_strides))) {
    return cudaErrorInvalidValue;
  }
  const FwdParams p{q, k, v, out, lse, q_strides, k_strides, v_strides, static_cast<int>(dims.heads_q),
                    static_cast<int>(dims.heads_q / dims.heads_kv), static_cast<int>(dims.n_q),
                    static_cast<int>(dims.n_k), scale * kLog2e, causal};
  const int batch = static_cast<int>(dims.batch);
  if (dtype == DType::Float32) return attention_fwd_fp32(p, batch, dims.head_dim, stream);
  return dtype == DType::Float16 ? fwd_head_dim<__half>(p, batch, dims.head_dim, stream)
                                 : fwd_head_dim<__nv_bfloat16>(p, batch, dims.head_dim, stream);
}

}  // namespace cuda
}  // namespace fusedlm
