// The bf16 instance of layernorm_mlp's activation passes for CPUs with avx512_bf16: the loops of
// layernorm_mlp_act.h and the ISA class of layernorm_mlp_avx512_isa.h, compiled with avx512bf16
// so that every fp32 -> bf16 rounding is one vcvtneps2bf16 (see that header for what differs).
// Called only after select_isa and cpu_has_avx512_bf16 (layer_norm.h).
#include "cpu/avx512_math.h"
#include "cpu/layer_norm_rows.h"
#include "cpu/layernorm_mlp.h"  // before the AVX-512 region: no header code is compiled for it

#if FUSEDLM_X86
#include <immintrin.h>

#define FUSEDLM_AVX512_REGION_BF16
#include "cpu/avx512_region_begin.h"
#include "cpu/layernorm_mlp_avx512_isa.h"
#include "cpu/layernorm_mlp_act.h"

namespace fusedlm {
namespace cpu {
namespace mlp {

// Entry points for layernorm_mlp.cpp (declared in layernorm_mlp_act.h).
FwdRowsFn avx512_bf16_fwd_rows(Activation a) { return fwd_rows_fn<Avx512Isa, bf16>(a); }
BwdRowsFn avx512_bf16_bwd_rows(Activation a) { return bwd_rows_fn<Avx512Isa, bf16>(a); }

}  // namespace mlp
}  // namespace cpu
}  // namespace fusedlm

#include "cpu/avx512_region_end.h"

#endif  // FUSEDLM_X86
