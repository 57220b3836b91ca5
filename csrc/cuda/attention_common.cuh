// Device building blocks of the CUDA attention kernels (attention_fwd.cu, attention_bwd.cu):
// tensor-core tiles through inline PTX (mma.sync m16n8k16, ldmatrix, cp.async). Torch-free.
//
// Fragments of mma.m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t:
//   C, D (16 x 8, float32): c0, c1 at (row g, cols 2t, 2t+1); c2, c3 at (row g + 8, same cols).
//   A (16 x 16, row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..).
//   B (16 x 8, "col": each column's k dense): b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g).
// So the accumulator of two adjacent 8-column tiles, rounded to 16 bits in pairs, is the A fragment
// of one 16-wide k-step: P = softmax(S) feeds P V straight from registers (to_a_frags).
//
// Shared-memory tiles are [rows][D + 8] (a 16-byte pad per row): a row is D / 8 + 1 16-byte
// chunks, an odd number for D in {64, 80, 96, 128}, so the 8 row addresses of one ldmatrix 8x8
// fall in 8 different bank groups (no conflicts) without a swizzle.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention.h"

namespace fusedlm {
namespace cuda {
namespace attn {

// ---- host-side argument checks ----------------------------------------------------------------

// The kernels index rows with int and put (query blocks, Hq, B) in the grid.
inline bool attention_dims_ok(const AttentionDims& d) {
  return d.batch >= 0 && d.batch <= 65535 && d.heads_kv > 0 && d.heads_q >= d.heads_kv && d.heads_q <= 65535 &&
         d.heads_q % d.heads_kv == 0 && d.n_q >= 0 && d.n_k >= 0 && d.n_q < (1 << 30) && d.n_k < (1 << 30) &&
         attention_head_dim_supported(d.head_dim);
}

// cp.async moves 16-byte chunks: every row of the tensor must start 16-byte aligned.
inline bool rows_aligned(const void* p, RowStrides s) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && s.batch % 8 == 0 && s.head % 8 == 0 && s.row % 8 == 0;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kWarp = 32;

template <int D>
struct Smem {
  static constexpr int kStride = D + 8;  // elements per shared-memory row
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- kernel arguments ---------------------------------------------------------------------------

struct FwdParams {
  const void *q, *k, *v;
  void* out;
  float* lse;  // (B, Hq, Nq)
  RowStrides qs, ks, vs;
  int heads_q, group, n_q, n_k;
  float scale_log2;  // scale * log2(e)
  bool causal;
};

struct BwdParams {
  const void *q, *k, *v, *dout;
  void *dq, *dk, *dv;
  const float *lse2, *delta;  // (B, Hq, padded rows)
  RowStrides qs, ks, vs, dos;
  int heads_q, heads_kv, group, n_q, n_k, rows_pad;
  float scale, scale_log2;
  bool causal;
};

// The float32 (CUDA-core) kernels, attention_fp32.cu; the same contract as the 16-bit ones.
cudaError_t attention_fwd_fp32(const FwdParams& p, int batch, int64_t head_dim, cudaStream_t stream);
cudaError_t attention_bwd_fp32(const BwdParams& p, int batch, int64_t head_dim, cudaStream_t stream);

// ---- element types ----------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {  // the CUDA-core path: conversions only
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

template <>
struct Elem<__half> {
  // Two floats rounded to fp16 in one 32-bit register, the first in the low half.
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  // d += a b (16 x 8 x 16), float32 accumulation.
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---- data movement ----------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16 bytes global -> shared, bypassing L1; valid = false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Rows [row0, row0 + ROWS) of a (rows, D) matrix with row stride `stride` (elements) into a
// [ROWS][D + 8] shared tile; rows at or past `n_rows` are zero-filled (never read from memory).
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t stride, int row0, int n_rows) {
  constexpr int kChunksPerRow = D / 8, kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + THREADS - 1) / THREADS; ++i) {
    const int c = i * THREADS + static_cast<int>(threadIdx.x);
    if (kChunks % THREADS == 0 || c < kChunks) {
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool valid = row0 + r < n_rows;
      const T* src = valid ? base + static_cast<int64_t>(row0 + r) * stride + col : base;
      cp_async_16(tile + r * Smem<D>::kStride + col, src, valid);
    }
  }
}

// ---- warp-level tile products -----------------------------------------------------------------

// acc[i] (16 x N) += A_i (16 x K) B^T for MT row tiles A_i = rows [16 i, 16 i + 16) of a shared
// tile and B rows [0, N) of another, both with the K dim dense (row stride S): q k^T, do v^T,
// k q^T, v do^T. Per 16-wide k-step: MT ldmatrix for A and one per pair of 8-row B tiles, each B
// fragment feeding MT MMAs (so MT > 1 reads shared memory less per flop).
template <typename T, int MT, int N, int K, int S>
__device__ __forceinline__ void mma_abt_tiles(float (&acc)[MT][N / 8][4], const T* a_tile, const T* b_tile,
                                              int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "tile sizes are multiples of 16");
  const T* a_lane = a_tile + (lane & 15) * S + (lane >> 4) * 8;
  const T* b_lane = b_tile + ((lane >> 4) * 8 + (lane & 7)) * S + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int k = 0; k < K / 16; ++k) {
    uint32_t a[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i) ldmatrix_x4(a[i], a_lane + i * 16 * S + k * 16);
#pragma unroll
    for (int n = 0; n < N / 16; ++n) {
      uint32_t b[4];
      ldmatrix_x4(b, b_lane + n * 16 * S + k * 16);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        Elem<T>::mma(acc[i][2 * n], a[i], b[0], b[1]);
        Elem<T>::mma(acc[i][2 * n + 1], a[i], b[2], b[3]);
      }
    }
  }
}

// acc (16 x N) += A (16 x K) B^T: one row tile of mma_abt_tiles.
template <typename T, int N, int K, int S>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const T* a_tile, const T* b_tile, int lane) {
  mma_abt_tiles<T, 1, N, K, S>(reinterpret_cast<float (&)[1][N / 8][4]>(acc), a_tile, b_tile, lane);
}

// acc[i] (16 x D) += P_i (16 x K, A fragments in registers) B for MT row tiles, B rows [0, K) of a
// shared tile with the D dim dense (row stride S), read transposed: p v, ds k, p^T do, ds^T q.
template <typename T, int MT, int K, int D, int S>
__device__ __forceinline__ void mma_pb_tiles(float (&acc)[MT][D / 8][4], const uint32_t (&p)[MT][K / 16][4],
                                             const T* b_tile, int lane) {
  const T* b_lane = b_tile + (((lane >> 3) & 1) * 8 + (lane & 7)) * S + (lane >> 4) * 8;
#pragma unroll
  for (int k = 0; k < K / 16; ++k) {
#pragma unroll
    for (int d = 0; d < D / 16; ++d) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_lane + k * 16 * S + d * 16);
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        Elem<T>::mma(acc[i][2 * d], p[i][k], b[0], b[1]);
        Elem<T>::mma(acc[i][2 * d + 1], p[i][k], b[2], b[3]);
      }
    }
  }
}

// acc (16 x D) += P (16 x K) B: one row tile of mma_pb_tiles.
template <typename T, int K, int D, int S>
__device__ __forceinline__ void mma_pb(float (&acc)[D / 8][4], const uint32_t (&p)[K / 16][4], const T* b_tile,
                                       int lane) {
  mma_pb_tiles<T, 1, K, D, S>(reinterpret_cast<float (&)[1][D / 8][4]>(acc),
                              reinterpret_cast<const uint32_t (&)[1][K / 16][4]>(p), b_tile, lane);
}

// Accumulator tiles (16 x K float32) -> A fragments of K / 16 k-steps, rounded to T.
template <typename T, int K>
__device__ __forceinline__ void to_a_frags(const float (&s)[K / 8][4], uint32_t (&a)[K / 16][4]) {
#pragma unroll
  for (int k = 0; k < K / 16; ++k) {
    a[k][0] = Elem<T>::pack(s[2 * k][0], s[2 * k][1]);
    a[k][1] = Elem<T>::pack(s[2 * k][2], s[2 * k][3]);
    a[k][2] = Elem<T>::pack(s[2 * k + 1][0], s[2 * k + 1][1]);
    a[k][3] = Elem<T>::pack(s[2 * k + 1][2], s[2 * k + 1][3]);
  }
}

// 2^x on the special-function unit (ex2.approx.ftz.f32), what exp2f becomes under --use_fast_math.
// Plain exp2f adds a range test and two multiplies per call so that results below 2^-126 come out
// subnormal instead of 0; a softmax weight that small, against the row max's weight of 1, changes
// neither l nor the P V sums in float32. NaN stays NaN, -inf gives 0, 0 gives 1 exactly.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Max / sum over the 4 lanes (t = 0..3) that share a row of an accumulator; every lane gets it.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Stores a warp's 16 x D float32 accumulator (times `mul`) as T rows [row0, row0 + 16) of a dense
// (rows, D) matrix, rows at or past n_rows skipped. Each lane writes pairs of adjacent elements.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* dst, const float (&acc)[D / 8][4], int row0, int n_rows, float mul0,
                                           float mul1, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + g + 8 * half;
    if (row >= n_rows) continue;
    const float mul = half ? mul1 : mul0;
    uint32_t* out = reinterpret_cast<uint32_t*>(dst + static_cast<int64_t>(row) * D + 2 * t);
#pragma unroll
    for (int d = 0; d < D / 8; ++d) out[d * 4] = Elem<T>::pack(acc[d][2 * half] * mul, acc[d][2 * half + 1] * mul);
  }
}

}  // namespace attn
}  // namespace cuda
}  // namespace fusedlm
