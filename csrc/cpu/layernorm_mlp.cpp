// The element-wise passes of the CPU LayerNorm + feed-forward op: the drivers (OpenMP over row
// ranges; column ranges for the column sums), the portable scalar instances of the loops of
// layernorm_mlp_act.h, and the choice of the AVX-512 instances (layernorm_mlp_avx512.cpp;
// layernorm_mlp_avx512_bf16.cpp for bf16 tensors on CPUs with avx512_bf16) at run time.
//
// The activation passes and the residual pass split the rows of a block among the threads: each
// thread streams one contiguous range of every array (at 4096 x 768 x 3072 bf16, two threads, in
// the op: the activation backward 2.5 against 4.6 ms per step, the forward 1.2 against 1.6, for
// the earlier split of the columns, whose thread ranges were h / 2-column runs of every row). The
// backward's fc-bias gradient goes through partial column sums of kSumRows (64) rows each, on
// boundaries that do not depend on the thread count, added in their order: the same bits for any
// number of threads. The proj-bias column sums (column_sum_acc) split the columns.
//
// Memory traffic per element of a (rows, h) block: forward reads pre, writes act: 2 accesses (the
// bias is added where pre is read, never written back); backward reads pre and d(act), writes d(pre) and act: 4 (gated:
// 2h-wide pre and d(pre)). With the token blocks of csrc/torch/layernorm_mlp.cpp these stay in
// the last-level cache between the GEMM that produces them and the GEMM that consumes them.
#include "cpu/layernorm_mlp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/layer_norm_rows.h"

namespace fusedlm {
namespace cpu {
namespace mlp {
namespace {

using rows::bf16;

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float round_to(const float*, float v) { return v; }
inline float round_to(const bf16*, float v) {  // round to nearest even, as torch does
  if (std::isnan(v)) return v;
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store_bits(float* p, float v) { *p = v; }
inline void store_bits(bf16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  p->bits = std::isnan(v) ? uint16_t(0x7fc0) : uint16_t(u >> 16);
}

// exp and 2^x saturate below FLT_MAX (NaN kept), as avx512::exp16 and the AVX-512 vexp2_lowp do.
inline float vexp(float x) { return std::exp(x > 88.7f ? 88.7f : x); }
inline float vexp2_lowp(float x) { return std::exp2(x > 127.0f ? 127.0f : x); }
inline float vexp2_lowp_within_126(float x) { return std::exp2(x); }
inline float vrcp_lowp(float x) { return 1.0f / x; }
inline float vabs(float x) { return std::fabs(x); }
inline float vrelu(float x) { return x < 0.0f ? 0.0f : x; }  // NaN kept, as torch.relu
inline float vstep(float x) { return x <= 0.0f ? 0.0f : 1.0f; }  // NaN -> 1, as torch's threshold_backward
inline float vsign_of(float u, float v) { return u < 0.0f ? -v : v; }
inline float vrcp(float x) { return 1.0f / x; }
inline float vclamp_abs(float x, float c) { return std::fabs(x) > c ? std::copysign(c, x) : x; }
inline float vat_least(float x, float c) { return x < c ? c : x; }  // NaN kept

struct ScalarIsa {
  using V = float;
  using Mask = int;
  static constexpr int W = 1;
  static Mask mask(int64_t) { return 1; }
  template <typename T>
  static float load(const T* p, Mask) {
    return to_float(*p);
  }
  static float loadf(const float* p, Mask) { return *p; }
  template <typename T>
  static float store(T* p, float v, Mask) {
    const float r = round_to(p, v);
    store_bits(p, r);
    return r;
  }
  template <typename T>
  static float round(const T* tag, float v) {
    return round_to(tag, v);
  }
  static void add_to(float* p, float v, Mask) { *p += v; }
  static void prefetch(const void*) {}
};

}  // namespace
}  // namespace mlp
}  // namespace cpu
}  // namespace fusedlm

#include "cpu/layernorm_mlp_act.h"

namespace fusedlm {
namespace cpu {
namespace {

using mlp::ActRows;
using rows::bf16;

// Thread t's share [begin, end) of n items cut into `units` units of `unit` items (the last one
// shorter): contiguous whole units, as even as they go.
void unit_range(int64_t units, int64_t unit, int64_t n, int nt, int t, int64_t* begin, int64_t* end) {
  const int64_t per = (units + nt - 1) / nt;
  *begin = std::min(n, t * per * unit);
  *end = std::min(n, *begin + per * unit);
}

// Column sums (the proj bias gradient): thread t's columns [c0, c1), whole vectors of 16.
void column_range(int64_t cols, int nt, int t, int64_t* c0, int64_t* c1) {
  unit_range((cols + 15) / 16, 16, cols, nt, t, c0, c1);
}

// Rows [r0, r1) of p.
template <typename T>
ActRows rows_of(const ActRows& p, int64_t r0, int64_t r1) {
  ActRows q = p;
  q.pre = static_cast<const T*>(p.pre) + r0 * p.cols;
  q.act = static_cast<T*>(p.act) + r0 * p.h;
  if (p.dpre != nullptr) q.dpre = static_cast<T*>(p.dpre) + r0 * p.cols;
  q.rows = r1 - r0;
  return q;
}

// The bias as fp32 (converted once per call, 2h values at most), or nullptr.
template <typename T>
const float* fp32_bias(const void* bias, int64_t n, std::vector<float>* copy) {
  if (bias == nullptr) return nullptr;
  if constexpr (std::is_same_v<T, float>) {
    return static_cast<const float*>(bias);
  } else {
    copy->resize(n);
    for (int64_t j = 0; j < n; ++j) (*copy)[j] = mlp::to_float(static_cast<const T*>(bias)[j]);
    return copy->data();
  }
}

template <typename T>
void act_fwd_typed(const MlpActFwdArgs& a) {
  const int64_t cols = is_gated(a.activation) ? 2 * a.h : a.h;
  std::vector<float> bias_copy;
  const ActRows p{a.pre, fp32_bias<T>(a.bias, cols, &bias_copy), a.act, nullptr, a.rows, a.h, cols};
  mlp::FwdRowsFn fn = mlp::fwd_rows_fn<mlp::ScalarIsa, T>(a.activation);
#if FUSEDLM_X86
  if (a.isa == Isa::Avx512) {
    fn = std::is_same_v<T, bf16> && cpu_has_avx512_bf16() ? mlp::avx512_bf16_fwd_rows(a.activation)
                                                          : mlp::avx512_fwd_rows<T>(a.activation);
  }
#endif
  const int nt = threads_for(a.num_threads, a.rows * cols, a.rows);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int t = 0; t < nt; ++t) {
    int64_t r0, r1;
    unit_range(a.rows, 1, a.rows, nt, t, &r0, &r1);
    if (r0 < r1) fn(rows_of<T>(p, r0, r1));
  }
}

template <typename T>
void act_bwd_typed(const MlpActBwdArgs& a) {
  const bool gated = is_gated(a.activation);
  const int64_t cols = gated ? 2 * a.h : a.h;
  std::vector<float> bias_copy;
  const ActRows p{a.pre, fp32_bias<T>(a.bias, cols, &bias_copy), a.dact_act, a.dpre, a.rows, a.h, cols};
  mlp::BwdRowsFn fn = mlp::bwd_rows_fn<mlp::ScalarIsa, T>(a.activation);
#if FUSEDLM_X86
  if (a.isa == Isa::Avx512) {
    fn = std::is_same_v<T, bf16> && cpu_has_avx512_bf16() ? mlp::avx512_bf16_bwd_rows(a.activation)
                                                          : mlp::avx512_bwd_rows<T>(a.activation);
  }
#endif
  // The partial column sums of d(pre), one per kSumRows rows (mlp::act_bwd_rows), then their sum in
  // partial order per column: the same bits for any thread count.
  const int64_t parts = (a.rows + mlp::kSumRows - 1) / mlp::kSumRows;
  const int64_t width = a.dbias_acc != nullptr ? cols : 0;
  std::vector<float> partial(parts * width, 0.0f);
  const int nt = threads_for(a.num_threads, a.rows * cols, parts);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int t = 0; t < nt; ++t) {
    int64_t r0, r1;
    unit_range(parts, mlp::kSumRows, a.rows, nt, t, &r0, &r1);
    if (r0 < r1) fn(rows_of<T>(p, r0, r1), width > 0 ? partial.data() + (r0 / mlp::kSumRows) * width : nullptr);
  }
  if (width == 0) return;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int t = 0; t < nt; ++t) {
    int64_t c0, c1;
    column_range(width, nt, t, &c0, &c1);
    for (int64_t k = 0; k < parts; ++k)
      for (int64_t j = c0; j < c1; ++j) a.dbias_acc[j] += partial[k * width + j];
  }
}

template <typename T>
void column_sum_typed(const T* x, int64_t rows, int64_t cols, float* acc, Isa isa, int num_threads) {
  mlp::SumColsFn fn = mlp::sum_cols<mlp::ScalarIsa, T>;
#if FUSEDLM_X86
  if (isa == Isa::Avx512) fn = mlp::avx512_sum_cols<T>();
#else
  (void)isa;
#endif
  const int nt = threads_for(num_threads, rows * cols, (cols + 15) / 16);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int t = 0; t < nt; ++t) {
    int64_t c0, c1;
    column_range(cols, nt, t, &c0, &c1);
    if (c0 >= c1) continue;
    std::vector<float> s(c1 - c0, 0.0f);
    fn(x, rows, cols, c0, c1, s.data());
    for (int64_t j = c0; j < c1; ++j) acc[j] += s[j - c0];
  }
}

template <typename T>
void add_rows_typed(const MlpAddRowsArgs& a) {
  std::vector<float> bias_copy;
  const float* bias = fp32_bias<T>(a.bias, a.cols, &bias_copy);
  mlp::AddRowsFn fn = mlp::add_rows<mlp::ScalarIsa, T>;
#if FUSEDLM_X86
  if (a.isa == Isa::Avx512) fn = mlp::avx512_add_rows<T>();
#endif
  const int nt = threads_for(a.num_threads, a.rows * a.cols, a.rows);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int t = 0; t < nt; ++t) {
    int64_t r0, r1;
    unit_range(a.rows, 1, a.rows, nt, t, &r0, &r1);
    if (r0 < r1) fn(a.y, a.res, bias, a.cols, r0, r1);
  }
}

// v rounded to bf16 bits, nearest even as torch does (NaN -> 0x7fc0): round_to + store_bits above
// in one branch-free step, so that the loop around it vectorises.
inline uint16_t bf16_bits_rne(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// fn(array, begin, end) over both arrays cut into one list of fixed 4096-element chunks, spread
// over the threads (array 0 or 1; [begin, end) within it).
template <typename Fn>
void over_chunks(int64_t n0, int64_t n1, int num_threads, Fn fn) {
  constexpr int64_t kChunk = 4096;
  const int64_t c0 = (n0 + kChunk - 1) / kChunk, chunks = c0 + (n1 + kChunk - 1) / kChunk;
  const int nt = threads_for(num_threads, n0 + n1, chunks);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int array = c < c0 ? 0 : 1;
    const int64_t begin = (array == 0 ? c : c - c0) * kChunk;
    fn(array, begin, std::min(array == 0 ? n0 : n1, begin + kChunk));
  }
}

void fold_bf16(bf16* x0, float* acc0, int64_t n0, bf16* x1, float* acc1, int64_t n1, FoldStep step,
               int num_threads) {
  over_chunks(n0, n1, num_threads, [&](int array, int64_t begin, int64_t end) {
    bf16* x = array == 0 ? x0 : x1;
    float* acc = array == 0 ? acc0 : acc1;
    switch (step) {
      case FoldStep::First:
        for (int64_t i = begin; i < end; ++i) acc[i] = mlp::to_float(x[i]);
        break;
      case FoldStep::Middle:
        for (int64_t i = begin; i < end; ++i) acc[i] += mlp::to_float(x[i]);
        break;
      case FoldStep::Last:
        for (int64_t i = begin; i < end; ++i) x[i].bits = bf16_bits_rne(acc[i] + mlp::to_float(x[i]));
        break;
    }
  });
}

// dst (cols, rows) = src^T for (rows, cols) src, both contiguous, in tiles of 16 source rows by 128
// source columns: each tile reads 16 runs of 128 elements (16 lines per run at most, so strides of
// 2^k bytes do not evict each other from L1) and writes 128 runs of 16. Tiles are taken down
// the source's rows first, so that the tiles one thread takes in a row fill whole lines of dst.
// (3072, 768) bf16, two threads: 0.22 ms against 0.69 for ATen's transposing copy; fp32 0.26
// against 1.02.
template <typename T>
void transpose_tiled(const T* src, int64_t rows, int64_t cols, T* dst, int num_threads) {
  constexpr int64_t kI = 16, kJ = 128;
  const int64_t ti = (rows + kI - 1) / kI, tiles = ti * ((cols + kJ - 1) / kJ);
  const int nt = threads_for(num_threads, rows * cols, tiles);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t i0 = (t % ti) * kI, j0 = (t / ti) * kJ;
    const int64_t i1 = std::min(rows, i0 + kI), j1 = std::min(cols, j0 + kJ);
    if (i1 - i0 == kI) {
      for (int64_t j = j0; j < j1; ++j) {
#pragma GCC unroll 16
        for (int64_t i = 0; i < kI; ++i) dst[j * rows + i0 + i] = src[(i0 + i) * cols + j];
      }
    } else {
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * cols + j];
    }
  }
}

}  // namespace

bool parse_activation(const char* name, Activation* out) {
  static const struct {
    const char* name;
    Activation activation;
  } kNames[] = {{"gelu", Activation::Gelu}, {"gelu_tanh", Activation::GeluTanh}, {"relu", Activation::Relu},
                {"silu", Activation::Silu}, {"swiglu", Activation::Swiglu},       {"geglu", Activation::Geglu}};
  for (const auto& n : kNames) {
    if (std::strcmp(name, n.name) == 0) {
      *out = n.activation;
      return true;
    }
  }
  return false;
}

// Only fp32 and bf16 reach these (the binding rejects the rest: fp16 is kept off the CPU).
void mlp_act_fwd(const MlpActFwdArgs& args) {
  if (args.dtype == DType::BFloat16) return act_fwd_typed<bf16>(args);
  act_fwd_typed<float>(args);
}

void mlp_act_bwd(const MlpActBwdArgs& args) {
  if (args.dtype == DType::BFloat16) return act_bwd_typed<bf16>(args);
  act_bwd_typed<float>(args);
}

void column_sum_acc(const void* x, int64_t rows, int64_t cols, DType dtype, float* acc, Isa isa, int num_threads) {
  if (dtype == DType::BFloat16) {
    return column_sum_typed(static_cast<const bf16*>(x), rows, cols, acc, isa, num_threads);
  }
  column_sum_typed(static_cast<const float*>(x), rows, cols, acc, isa, num_threads);
}

void mlp_add_rows(const MlpAddRowsArgs& args) {
  if (args.dtype == DType::BFloat16) return add_rows_typed<bf16>(args);
  add_rows_typed<float>(args);
}

void fold_bf16_block(void* x0, float* acc0, int64_t n0, void* x1, float* acc1, int64_t n1, FoldStep step,
                     int num_threads) {
  fold_bf16(static_cast<bf16*>(x0), acc0, n0, static_cast<bf16*>(x1), acc1, n1, step, num_threads);
}

void transpose(const void* src, int64_t rows, int64_t cols, int64_t elem_bytes, void* dst, int num_threads) {
  if (elem_bytes == 2) {
    return transpose_tiled(static_cast<const uint16_t*>(src), rows, cols, static_cast<uint16_t*>(dst), num_threads);
  }
  transpose_tiled(static_cast<const uint32_t*>(src), rows, cols, static_cast<uint32_t*>(dst), num_threads);
}

}  // namespace cpu
}  // namespace fusedlm
