// Opens the AVX-512 region of a CPU kernel file: every function defined between this include and
// `#include "cpu/avx512_region_end.h"` is compiled for avx512f/bw/vl/dq (plus avx512bf16 when the
// file defines FUSEDLM_AVX512_REGION_BF16 first), while the rest of the library stays portable.
// Code in the region runs only after the run-time check (select_isa in layer_norm.h, and
// cpu_has_avx512_bf16 for the bf16 region). Include the headers the region uses before it, so
// that no header code is compiled for AVX-512, except headers of kernel templates meant to be
// compiled there (layernorm_mlp_avx512_isa.h and layernorm_mlp_act.h in layernorm_mlp_avx512*.cpp).
// No include guard: one region per file.
#if defined(__clang__)
#if defined(FUSEDLM_AVX512_REGION_BF16)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), \
                             apply_to = function)
#else
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))), \
                             apply_to = function)
#endif
#else
#pragma GCC push_options
#if defined(FUSEDLM_AVX512_REGION_BF16)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#endif
// GCC 12 reports its own intrinsics' `__Y = __Y` placeholders (_mm512_undefined_*) as uninitialised
// once inlined (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
