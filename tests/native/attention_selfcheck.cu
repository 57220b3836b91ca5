// Torch-free self-check of the CUDA attention launchers (csrc/cuda/attention.h) against a float64
// CPU reference: forward (out, lse) and backward (dq, dk, dv) for fp16, bf16 and fp32 over GQA,
// causal, Nq != Nk both ways, rows that see no key, and tails of every tile size; plus a bitwise
// determinism check of the backward. Needs a GPU to run; compiles anywhere nvcc does:
//
//   nvcc -std=c++17 -O2 -Icsrc -gencode arch=compute_90a,code=sm_90a -o attention_selfcheck
//        tests/native/attention_selfcheck.cu csrc/cuda/attention_{fwd,bwd,fp32}.cu    (one line)
//   ./attention_selfcheck
//
// The pytest suite (tests/test_attention_cuda.py) is the real check, under the error-budget rule;
// this one uses a relative tolerance per dtype and exits 1 on the first case that misses it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/attention.h"

using namespace fusedlm::cuda;

namespace {

struct Case {
  int b, hq, hkv, nq, nk, d;
  bool causal;
};

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

// Host values rounded through the element type, and their device bytes.
template <typename T>
T from_double(double v);
template <>
float from_double<float>(double v) { return static_cast<float>(v); }
template <>
__half from_double<__half>(double v) { return __float2half(static_cast<float>(v)); }
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double v) { return __float2bfloat16(static_cast<float>(v)); }
double to_double(float v) { return v; }
double to_double(__half v) { return __half2float(v); }
double to_double(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Buffer {
  std::vector<T> host;
  T* dev = nullptr;
  explicit Buffer(size_t n) : host(n) { CHECK_CUDA(cudaMalloc(&dev, n * sizeof(T) + 16)); }
  ~Buffer() { cudaFree(dev); }
  void upload() { CHECK_CUDA(cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  void download() { CHECK_CUDA(cudaMemcpy(host.data(), dev, host.size() * sizeof(T), cudaMemcpyDeviceToHost)); }
};

// float64 reference of the forward and backward on the rounded inputs (contiguous (B, H, N, D)).
void reference(const Case& c, double scale, const std::vector<double>& q, const std::vector<double>& k,
               const std::vector<double>& v, const std::vector<double>& dout, std::vector<double>& out,
               std::vector<double>& lse, std::vector<double>& dq, std::vector<double>& dk, std::vector<double>& dv) {
  const int g = c.hq / c.hkv, d = c.d;
  std::vector<double> p(c.nk);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.hq; ++h)
      for (int i = 0; i < c.nq; ++i) {
        const size_t qi = ((size_t(b) * c.hq + h) * c.nq + i) * d, row = (size_t(b) * c.hq + h) * c.nq + i;
        const size_t kv0 = (size_t(b) * c.hkv + h / g) * c.nk * d;
        double m = -INFINITY;
        for (int j = 0; j < c.nk; ++j) {
          double s = 0;
          for (int e = 0; e < d; ++e) s += q[qi + e] * k[kv0 + size_t(j) * d + e];
          p[j] = (c.causal && j > i + c.nk - c.nq) ? -INFINITY : s * scale;
          m = std::max(m, p[j]);
        }
        double l = 0;
        for (int j = 0; j < c.nk; ++j) l += p[j] == -INFINITY ? 0 : std::exp(p[j] - m);
        lse[row] = l > 0 ? m + std::log(l) : -INFINITY;
        double delta = 0;
        for (int e = 0; e < d; ++e) {
          double o = 0;
          for (int j = 0; j < c.nk; ++j) o += l > 0 && p[j] != -INFINITY ? std::exp(p[j] - lse[row]) * v[kv0 + size_t(j) * d + e] : 0;
          out[qi + e] = o;
          delta += o * dout[qi + e];
        }
        for (int j = 0; j < c.nk; ++j) {
          if (l == 0 || p[j] == -INFINITY) continue;
          const double pj = std::exp(p[j] - lse[row]);
          double dp = 0;
          for (int e = 0; e < d; ++e) dp += dout[qi + e] * v[kv0 + size_t(j) * d + e];
          const double ds = pj * (dp - delta);
          for (int e = 0; e < d; ++e) {
            dq[qi + e] += scale * ds * k[kv0 + size_t(j) * d + e];
            dk[kv0 + size_t(j) * d + e] += scale * ds * q[qi + e];
            dv[kv0 + size_t(j) * d + e] += pj * dout[qi + e];
          }
        }
      }
}

template <typename T>
double max_rel_err(const std::vector<T>& got, const std::vector<double>& want) {
  double err = 0, mag = 1e-6;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(to_double(got[i]))) return INFINITY;
    err = std::max(err, std::fabs(to_double(got[i]) - want[i]));
    mag = std::max(mag, std::fabs(want[i]));
  }
  return err / mag;
}

template <typename T>
bool run_case(const Case& c, DType dtype, double tol, std::mt19937& rng) {
  const size_t nq = size_t(c.b) * c.hq * c.nq * c.d, nk = size_t(c.b) * c.hkv * c.nk * c.d;
  const size_t rows = size_t(c.b) * c.hq * c.nq;
  const double scale = 1.0 / std::sqrt(double(c.d));
  std::normal_distribution<double> normal;
  Buffer<T> q(nq), k(nk), v(nk), dout(nq), out(nq), dq(nq), dk(nk), dv(nk);
  std::vector<double> q64(nq), k64(nk), v64(nk), do64(nq);
  auto fill = [&](Buffer<T>& buf, std::vector<double>& x) {
    for (size_t i = 0; i < x.size(); ++i) {
      buf.host[i] = from_double<T>(normal(rng));
      x[i] = to_double(buf.host[i]);
    }
    buf.upload();
  };
  fill(q, q64), fill(k, k64), fill(v, v64), fill(dout, do64);
  Buffer<float> lse(rows), ws(size_t(attention_bwd_workspace_floats({c.b, c.hq, c.hkv, c.nq, c.nk, c.d})));
  const AttentionDims dims{c.b, c.hq, c.hkv, c.nq, c.nk, c.d};
  const RowStrides qs{int64_t(c.hq) * c.nq * c.d, int64_t(c.nq) * c.d, c.d};
  const RowStrides ks{int64_t(c.hkv) * c.nk * c.d, int64_t(c.nk) * c.d, c.d};
  CHECK_CUDA(attention_fwd(dtype, q.dev, k.dev, v.dev, out.dev, lse.dev, dims, qs, ks, ks, float(scale), c.causal, 0));
  CHECK_CUDA(attention_bwd(dtype, dout.dev, q.dev, k.dev, v.dev, out.dev, lse.dev, nullptr, dq.dev, dk.dev, dv.dev,
                           ws.dev, dims, qs, qs, ks, ks, float(scale), c.causal, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  out.download(), lse.download(), dq.download(), dk.download(), dv.download();
  std::vector<T> dk_first = dk.host;
  CHECK_CUDA(attention_bwd(dtype, dout.dev, q.dev, k.dev, v.dev, out.dev, lse.dev, nullptr, dq.dev, dk.dev, dv.dev,
                           ws.dev, dims, qs, qs, ks, ks, float(scale), c.causal, 0));
  dk.download();
  const bool deterministic = std::memcmp(dk_first.data(), dk.host.data(), nk * sizeof(T)) == 0;

  std::vector<double> out64(nq), lse64(rows), dq64(nq, 0.0), dk64(nk, 0.0), dv64(nk, 0.0);
  reference(c, scale, q64, k64, v64, do64, out64, lse64, dq64, dk64, dv64);
  double lse_err = 0;
  bool lse_inf_ok = true;
  for (size_t r = 0; r < rows; ++r) {
    if (std::isinf(lse64[r])) {
      lse_inf_ok = lse_inf_ok && lse.host[r] == -INFINITY;
    } else {
      lse_err = std::max(lse_err, std::fabs(lse.host[r] - lse64[r]));
    }
  }
  const double errs[4] = {max_rel_err(out.host, out64), max_rel_err(dq.host, dq64), max_rel_err(dk_first, dk64),
                          max_rel_err(dv.host, dv64)};
  const bool ok = lse_inf_ok && lse_err < 1e-3 && errs[0] < tol && errs[1] < tol && errs[2] < tol && errs[3] < tol &&
                  deterministic;
  std::printf("%s dtype=%d B=%d Hq=%d Hkv=%d Nq=%d Nk=%d D=%d causal=%d: out %.2e dq %.2e dk %.2e dv %.2e lse %.2e%s%s\n",
              ok ? "ok  " : "FAIL", int(dtype), c.b, c.hq, c.hkv, c.nq, c.nk, c.d, int(c.causal), errs[0], errs[1],
              errs[2], errs[3], lse_err, lse_inf_ok ? "" : " (-inf rows wrong)", deterministic ? "" : " (nondeterministic)");
  return ok;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  const Case cases[] = {
      {1, 2, 1, 1, 1, 64, false},    {2, 2, 2, 17, 17, 64, true},   {1, 8, 2, 97, 97, 128, true},
      {1, 4, 1, 17, 97, 80, false},  {1, 2, 1, 97, 17, 96, true},   {1, 2, 2, 1, 300, 128, true},
      {1, 4, 2, 200, 130, 64, true}, {1, 2, 1, 130, 200, 128, false},
  };
  bool ok = true;
  for (const Case& c : cases) {
    ok = run_case<__half>(c, DType::Float16, 1e-2, rng) && ok;
    ok = run_case<__nv_bfloat16>(c, DType::BFloat16, 4e-2, rng) && ok;
    ok = run_case<float>(c, DType::Float32, 1e-4, rng) && ok;
  }
  std::printf(ok ? "attention self-check: all passed\n" : "attention self-check: FAILED\n");
  return ok ? 0 : 1;
}
