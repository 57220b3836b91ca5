// Device helpers and launch planning shared by the LayerNorm / RMSNorm kernels
// (layer_norm.cu: forward, layer_norm_bwd.cu: backward). Torch-free.
//
// Row kernels: a row group of `threads` threads (one warp, 4 rows per block, for N <= 32 * elems;
// otherwise a block of up to 512 threads per row) holds its row in registers, `elems` values per
// thread, loaded as VEC-wide packs (16 bytes: 4 fp32 or 8 bf16/fp16) when N % VEC == 0 and the
// pointers are 16-byte aligned, else one element at a time (VEC = 1). Thread t of the group owns
// the packs t, t + threads, t + 2 * threads, ...: consecutive threads touch consecutive 16 bytes.
// Rows longer than the register capacity (512 threads x the per-thread values of layer_norm.cu
// and layer_norm_bwd.cu: forward N > 16384, or 8192 one element at a time; backward N > 8192,
// or 4096) take the generic kernels, which re-read the row from memory (L2) once per pass.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fusedlm {
namespace cuda {
namespace detail {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;  // threads per row, row kernels
constexpr int kMaxWarps = kMaxThreads / kWarp;
constexpr int kRowsPerWarpBlock = 4;  // rows (warps) per block in warp-per-row mode
constexpr int kGenericThreads = 512;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// VEC elements moved as one aligned load / store (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// Butterfly sum: float addition is commutative, so every lane ends with the same bits.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums K values over the blockDim.x threads of one row; every thread gets the result.
// With blockDim.x > 32 the block is one row (blockDim.y == 1), all threads call this the same
// number of times, and the warps' sums are added in warp order. smem: kMaxWarps * K floats.
template <int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (blockDim.x > kWarp) {
    const int warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
    __syncthreads();  // the previous call's readers are done with smem
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) smem[k * kMaxWarps + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float s = smem[k * kMaxWarps];
      for (int w = 1; w < n_warps; ++w) s += smem[k * kMaxWarps + w];
      v[k] = s;
    }
  }
}

// ---- host side -------------------------------------------------------------------------------

struct RowPlan {
  int elems;            // values per thread; 0: the generic kernel
  int threads;          // threads per row
  int rows_per_block;   // > 1 only for warp-per-row
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One warp per row while a warp can hold it, else the fewest values per thread with at most 128
// threads per row, else up to 512 threads; beyond that the generic kernel.
inline RowPlan plan_rows(int64_t N, int max_elems) {
  for (int e = 8; e <= max_elems; e *= 2) {
    if (N <= static_cast<int64_t>(kWarp) * e) return {e, kWarp, kRowsPerWarpBlock};
  }
  for (int limit : {128, kMaxThreads}) {
    for (int e = 8; e <= max_elems; e *= 2) {
      const int64_t threads = ceil_div(ceil_div(N, e), kWarp) * kWarp;
      if (threads <= limit) return {e, static_cast<int>(threads), 1};
    }
  }
  return {0, kGenericThreads, 1};
}

template <typename T>
constexpr int pack_width() { return 16 / static_cast<int>(sizeof(T)); }

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace detail
}  // namespace cuda
}  // namespace fusedlm
