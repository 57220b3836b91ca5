// The element-type tag every torch-free CUDA launcher takes (csrc/torch maps at::ScalarType to it
// with checks::kernel_dtype).
#pragma once

namespace fusedlm {
namespace cuda {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

}  // namespace cuda
}  // namespace fusedlm
