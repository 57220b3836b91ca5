// AVX-512 instances of the activation passes (and the column sums and the residual pass) of
// layernorm_mlp, fp32 and bf16 tensors (the loops are in layernorm_mlp_act.h, the math and the ISA
// class in layernorm_mlp_avx512_isa.h). Compiled for AVX-512 (the region of avx512_region_begin.h)
// and called only after the run-time CPU check (select_isa), so the library still runs on CPUs
// without it. On CPUs with avx512_bf16, bf16 tensors take layernorm_mlp_avx512_bf16.cpp's
// activation passes instead.
#include "cpu/avx512_math.h"
#include "cpu/layer_norm_rows.h"
#include "cpu/layernorm_mlp.h"  // before the AVX-512 region: no header code is compiled for it

#if FUSEDLM_X86
#include <immintrin.h>

#include "cpu/avx512_region_begin.h"
#include "cpu/layernorm_mlp_avx512_isa.h"
#include "cpu/layernorm_mlp_act.h"

namespace fusedlm {
namespace cpu {
namespace mlp {

// Entry points for layernorm_mlp.cpp (declared in layernorm_mlp_act.h).
template <typename T>
FwdRowsFn avx512_fwd_rows(Activation a) {
  return fwd_rows_fn<Avx512Isa, T>(a);
}
template <typename T>
BwdRowsFn avx512_bwd_rows(Activation a) {
  return bwd_rows_fn<Avx512Isa, T>(a);
}
template <typename T>
SumColsFn avx512_sum_cols() {
  return sum_cols<Avx512Isa, T>;
}
template <typename T>
AddRowsFn avx512_add_rows() {
  return add_rows<Avx512Isa, T>;
}
template FwdRowsFn avx512_fwd_rows<float>(Activation);
template FwdRowsFn avx512_fwd_rows<bf16>(Activation);
template BwdRowsFn avx512_bwd_rows<float>(Activation);
template BwdRowsFn avx512_bwd_rows<bf16>(Activation);
template SumColsFn avx512_sum_cols<float>();
template SumColsFn avx512_sum_cols<bf16>();
template AddRowsFn avx512_add_rows<float>();
template AddRowsFn avx512_add_rows<bf16>();

}  // namespace mlp
}  // namespace cpu
}  // namespace fusedlm

#include "cpu/avx512_region_end.h"

#endif  // FUSEDLM_X86
