// LayerNorm / RMSNorm forward and backward on the CPU: OpenMP over rows, the AVX-512 row
// kernels of layer_norm_avx512.cpp chosen at run time, and the portable scalar row kernels here
// (same formulas; the order of the fp32 sums differs, so results agree to rounding).
//
// Per row of width N (all math fp32, whatever the element type T):
//   forward:  h = round_T(x + residual)             (stored; the statistics are of the stored h)
//             mean0 = sum(h) / N; s1 = sum(h - mean0); s2 = sum((h - mean0)^2)
//             mean = mean0 + s1 / N; var = (s2 - s1^2 / N) / N     (corrected two-pass: exact to
//             rounding for any mean, unlike E[h^2] - E[h]^2)
//             rmsnorm: mean = 0, var = sum(h^2) / N
//             y = (h - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)
//   backward: xhat = (h - mean) * rstd, g = dy * w
//             dx = rstd * (g - <g> - xhat * <g xhat>) + dh       (<g> dropped for rmsnorm)
//             dweight += dy * xhat, dbias += dy                   (fp32 partials per row chunk)
// Memory traffic per row: forward reads x (+ residual) and writes y (+ h) once; the passes after
// the first re-read the row from L1 (the AVX-512 kernels recompute h = x + residual there). Backward reads dy, h (+ dh) and writes dx once: the two row
// sums are taken in the first pass, dx in a second pass over the L1-resident row.
#include "cpu/layer_norm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/layer_norm_rows.h"

namespace fusedlm {
namespace cpu {
namespace {

using rows::bf16;
using rows::finish_stats;
using rows::fp16;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// --- scalar conversions (the fallback path; bit-exact with torch's c10::BFloat16 / c10::Half) ---

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline float to_float(fp16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu, mant = v.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));          // rebias 15 -> 127
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline bf16 from_float<bf16>(float v) {  // round to nearest even on the dropped 16 bits
  if (std::isnan(v)) return bf16{0x7fc0};
  uint32_t u = float_to_bits(v);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}
template <>
inline fp16 from_float<fp16>(float v) {
  uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return fp16{uint16_t(sign | 0x7e00u)};   // nan
  if (u >= 0x47800000u) return fp16{uint16_t(sign | 0x7c00u)};  // >= 2^16: inf
  if (u < 0x38800000u) {
    // Below 2^-14 the result is subnormal (ulp 2^-24): adding 0.5 puts the ulp at the last
    // mantissa bit of the fp32 sum, so the FPU does the round-to-nearest-even for us.
    const float r = bits_to_float(u) + 0.5f;
    return fp16{uint16_t(sign | (float_to_bits(r) - 0x3f000000u))};
  }
  // Rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even; a carry
  // out of the mantissa bumps the exponent, up to inf, as it should.
  u += 0xc8000fffu + ((u >> 13) & 1u);
  return fp16{uint16_t(sign | (u >> 13))};
}

// --- scalar row kernels --------------------------------------------------------------------

// fp32 sums kept in 16 interleaved partials and folded as a tree: shorter error chains than
// one running sum on long rows.
constexpr int kLanes = 16;
inline float fold(float* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  return acc[0];
}

template <typename T, bool kRms>
void fwd_row_scalar(const T* x, const T* res, const float* w, const float* b, T* y, T* h, int64_t n, float eps,
                    float* mean_out, float* rstd_out) {
  const T* src = x;
  if (res != nullptr) {
    for (int64_t j = 0; j < n; ++j) h[j] = from_float<T>(to_float(x[j]) + to_float(res[j]));
    src = h;
  }
  float acc[kLanes] = {};
  float mean = 0.0f, rstd;
  if constexpr (kRms) {
    for (int64_t j = 0; j < n; ++j) {
      const float v = to_float(src[j]);
      acc[j & (kLanes - 1)] += v * v;
    }
    rstd = 1.0f / std::sqrt(fold(acc) / float(n) + eps);
  } else {
    for (int64_t j = 0; j < n; ++j) acc[j & (kLanes - 1)] += to_float(src[j]);
    const float mean0 = fold(acc) / float(n);
    float acc1[kLanes] = {}, acc2[kLanes] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float d = to_float(src[j]) - mean0;
      acc1[j & (kLanes - 1)] += d;
      acc2[j & (kLanes - 1)] += d * d;
    }
    finish_stats(mean0, fold(acc1), fold(acc2), n, eps, &mean, &rstd);
  }
  if (mean_out != nullptr) *mean_out = mean;
  *rstd_out = rstd;
  for (int64_t j = 0; j < n; ++j) {
    float v = (to_float(src[j]) - mean) * rstd * w[j];
    if (b != nullptr) v += b[j];
    y[j] = from_float<T>(v);
  }
}

template <typename T, bool kRms>
void bwd_row_scalar(const T* dy, const T* dh, const T* h, const float* w, float mean, float rstd, T* dx, float* dwp,
                    float* dbp, int64_t n) {
  float acc1[kLanes] = {}, acc2[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float d = to_float(dy[j]);
    const float xhat = (to_float(h[j]) - mean) * rstd;
    const float g = d * w[j];
    acc1[j & (kLanes - 1)] += g;
    acc2[j & (kLanes - 1)] += g * xhat;
    dwp[j] += d * xhat;
    if (dbp != nullptr) dbp[j] += d;
  }
  const float c1 = kRms ? 0.0f : fold(acc1) / float(n);
  const float c2 = fold(acc2) / float(n);
  for (int64_t j = 0; j < n; ++j) {
    const float xhat = (to_float(h[j]) - mean) * rstd;
    const float g = to_float(dy[j]) * w[j];
    float v = rstd * ((g - c1) - xhat * c2);
    if (dh != nullptr) v += to_float(dh[j]);
    dx[j] = from_float<T>(v);
  }
}

// --- drivers -------------------------------------------------------------------------------

bool cpu_has_avx512() {
#if FUSEDLM_X86
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

bool cpu_has_avx512_bf16() {
#if FUSEDLM_X86
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  const char* want = std::getenv("FUSEDLM_CPU_BF16");
  return has && !(want != nullptr && std::strcmp(want, "0") == 0);
#else
  return false;
#endif
}

namespace {

// Outputs of at least this many bytes per call are written with non-temporal stores (when
// aligned, see layer_norm_avx512.cpp): past about half the last-level cache an output is
// mostly evicted before its reader runs, so caching it only costs the read-for-ownership
// traffic and the inputs it evicts. Measured at 8192 x 768 on 2 threads (32 MB L3): fp32
// (25 MB outputs) forward takes 30% less time, backward 5-10%; bf16 (12.5 MB, which still fits
// the L3) would take 10% more. FUSEDLM_CPU_STREAM=1 / =0 (read on every call) forces streaming on
// wherever the layout allows / off, so tests can cover both paths with small tensors.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

int64_t stream_min_bytes() {
  const char* force = std::getenv("FUSEDLM_CPU_STREAM");
  if (force != nullptr && std::strcmp(force, "1") == 0) return 0;
  if (force != nullptr && std::strcmp(force, "0") == 0) return INT64_MAX;
  return kStreamMinBytes;
}

// The weight and bias as fp32 for the row kernels: fp32 tensors as they are, 2-byte ones
// converted once per call (2N values) instead of at every row.
template <typename T>
struct Fp32Params {
  std::vector<float> copy;
  const float* w = nullptr;
  const float* b = nullptr;

  Fp32Params(const void* weight, const void* bias, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      w = static_cast<const float*>(weight);
      b = static_cast<const float*>(bias);
    } else {
      copy.resize(bias != nullptr ? 2 * n : n);
      for (int64_t j = 0; j < n; ++j) copy[j] = to_float(static_cast<const T*>(weight)[j]);
      if (bias != nullptr)
        for (int64_t j = 0; j < n; ++j) copy[n + j] = to_float(static_cast<const T*>(bias)[j]);
      w = copy.data();
      b = bias != nullptr ? copy.data() + n : nullptr;
    }
  }
};

// Streaming needs every output row 64-byte aligned and no masked tail.
bool use_stream(Isa isa, int64_t cols, size_t elem_bytes, int64_t out_bytes, const void* p0, const void* p1) {
  const auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  return isa == Isa::Avx512 && out_bytes >= stream_min_bytes() && (cols * int64_t(elem_bytes)) % 64 == 0 &&
         aligned(p0) && aligned(p1);
}

template <typename T>
void fwd_typed(const LayerNormFwdArgs& a) {
  const int64_t m = a.rows, n = a.cols;
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  const Fp32Params<T> params(a.weight, a.bias, n);
  const float* w = params.w;
  const float* b = params.b;
  T* y = static_cast<T*>(a.y);
  T* h = static_cast<T*>(a.h);
  const bool stream = use_stream(a.isa, n, sizeof(T), (h != nullptr ? 2 : 1) * m * n * int64_t(sizeof(T)), y, h);
  rows::FwdRowFn<T> row = a.rms ? fwd_row_scalar<T, true> : fwd_row_scalar<T, false>;
#if FUSEDLM_X86
  if (a.isa == Isa::Avx512) row = rows::avx512_fwd_row<T>(a.rms, res != nullptr, stream);
#endif
  const int nt = threads_for(a.num_threads, m * n, m);
  // Static schedule: each thread streams one contiguous block of rows.
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < m; ++i) {
      const int64_t off = i * n;
      row(x + off, res != nullptr ? res + off : nullptr, w, b, y + off, h != nullptr ? h + off : nullptr, n, a.eps,
          a.mean != nullptr ? a.mean + i : nullptr, a.rstd + i);
    }
#if FUSEDLM_X86
    if (stream) rows::avx512_stream_fence();
#endif
  }
}

// Row chunks of the weight-gradient reduction: a function of (rows, cols) only, never of the
// thread count, so the partial sums and their reduction order are fixed. Up to 64 chunks of
// at least 8 rows (enough to balance 2-16 threads), and at most 2^21 partial floats.
struct ChunkPlan {
  int64_t chunks;
  int64_t rows_per_chunk;
};

ChunkPlan plan_chunks(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return {0, 1};
  int64_t chunks = std::min<int64_t>(64, (rows + 7) / 8);
  chunks = std::max<int64_t>(1, std::min(chunks, (int64_t(1) << 20) / cols));
  const int64_t per = (rows + chunks - 1) / chunks;
  return {(rows + per - 1) / per, per};
}

// Columns per step of the partial-sum reduction (a block of fp32 sums that stays in L1).
constexpr int64_t kReduceCols = 256;

template <typename T>
void bwd_typed(const LayerNormBwdArgs& a) {
  const int64_t m = a.rows, n = a.cols;
  const T* dy = static_cast<const T*>(a.dy);
  const T* dh = static_cast<const T*>(a.dh);
  const T* h = static_cast<const T*>(a.h);
  const Fp32Params<T> params(a.weight, nullptr, n);
  const float* w = params.w;
  T* dx = static_cast<T*>(a.dx);
  T* dweight = static_cast<T*>(a.dweight);
  T* dbias = static_cast<T*>(a.dbias);
  const bool stream = use_stream(a.isa, n, sizeof(T), m * n * int64_t(sizeof(T)), dx, nullptr);
  rows::BwdRowFn<T> row = a.rms ? bwd_row_scalar<T, true> : bwd_row_scalar<T, false>;
#if FUSEDLM_X86
  if (a.isa == Isa::Avx512) row = rows::avx512_bwd_row<T>(a.rms, stream);
#endif
  const bool has_bias = dbias != nullptr || a.dbias_acc != nullptr;
  const ChunkPlan plan = plan_chunks(m, n);
  float* ws = a.workspace;  // [chunk][dweight partial (n), dbias partial (n)]
  const int nt = threads_for(a.num_threads, m * n, plan.chunks);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < plan.chunks; ++c) {
      float* dwp = ws + c * 2 * n;
      float* dbp = has_bias ? dwp + n : nullptr;
      std::fill(dwp, dwp + (has_bias ? 2 * n : n), 0.0f);
      const int64_t end = std::min(m, (c + 1) * plan.rows_per_chunk);
      for (int64_t i = c * plan.rows_per_chunk; i < end; ++i) {
        const int64_t off = i * n;
        row(dy + off, dh != nullptr ? dh + off : nullptr, h + off, w, a.rms ? 0.0f : a.mean[i], a.rstd[i], dx + off,
            dwp, dbp, n);
      }
    }
#if FUSEDLM_X86
    if (stream) rows::avx512_stream_fence();
#endif
    // (implicit barrier) Sum the partials of each column in chunk order 0, 1, 2, ...
#pragma omp for schedule(static)
    for (int64_t j0 = 0; j0 < n; j0 += kReduceCols) {
      const int64_t cols = std::min(kReduceCols, n - j0);
      float sw[kReduceCols] = {}, sb[kReduceCols] = {};
      for (int64_t c = 0; c < plan.chunks; ++c) {
        const float* dwp = ws + c * 2 * n + j0;
        for (int64_t j = 0; j < cols; ++j) sw[j] += dwp[j];
        if (has_bias)
          for (int64_t j = 0; j < cols; ++j) sb[j] += dwp[n + j];
      }
      if (a.dweight_acc != nullptr) {
        for (int64_t j = 0; j < cols; ++j) a.dweight_acc[j0 + j] += sw[j];
        if (has_bias)
          for (int64_t j = 0; j < cols; ++j) a.dbias_acc[j0 + j] += sb[j];
        continue;
      }
      for (int64_t j = 0; j < cols; ++j) dweight[j0 + j] = from_float<T>(sw[j]);
      if (has_bias)
        for (int64_t j = 0; j < cols; ++j) dbias[j0 + j] = from_float<T>(sb[j]);
    }
  }
}

}  // namespace

const char* isa_name(Isa isa) { return isa == Isa::Avx512 ? "avx512" : "scalar"; }

bool select_isa(Isa* isa, const char** error) {
  const char* want = std::getenv("FUSEDLM_CPU_ISA");
  *error = nullptr;
  if (want == nullptr || want[0] == '\0' || std::strcmp(want, "auto") == 0) {
    *isa = cpu_has_avx512() ? Isa::Avx512 : Isa::Scalar;
    return true;
  }
  if (std::strcmp(want, "scalar") == 0) {
    *isa = Isa::Scalar;
    return true;
  }
  if (std::strcmp(want, "avx512") == 0) {
    if (cpu_has_avx512()) {
      *isa = Isa::Avx512;
      return true;
    }
    *error = "FUSEDLM_CPU_ISA=avx512 but this CPU lacks avx512f/avx512bw/avx512vl/avx512dq";
    return false;
  }
  *error = "FUSEDLM_CPU_ISA must be one of auto, scalar, avx512";
  return false;
}

void layer_norm_fwd(const LayerNormFwdArgs& args) {
  switch (args.dtype) {
    case DType::Float32: return fwd_typed<float>(args);
    case DType::BFloat16: return fwd_typed<bf16>(args);
    case DType::Float16: return fwd_typed<fp16>(args);
  }
}

int64_t layer_norm_bwd_workspace_floats(int64_t rows, int64_t cols) {
  return plan_chunks(rows, cols).chunks * 2 * cols;
}

void layer_norm_bwd(const LayerNormBwdArgs& args) {
  switch (args.dtype) {
    case DType::Float32: return bwd_typed<float>(args);
    case DType::BFloat16: return bwd_typed<bf16>(args);
    case DType::Float16: return bwd_typed<fp16>(args);
  }
}

}  // namespace cpu
}  // namespace fusedlm
