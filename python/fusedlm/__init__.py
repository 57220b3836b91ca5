"""fusedlm: fused transformer kernels (Triton, CUDA C++, C++ CPU) as PyTorch custom ops.

Data path: model -> fusedlm.<op> (python/fusedlm/ops/<op>.py) -> custom op (dispatcher)
-> kernel (kernels/<op>.py for Triton, csrc/{cpu,cuda}/<op>.* for C++).
"""
from fusedlm import nn, reference
from fusedlm.dispatch import BackendError, available_backends
from fusedlm.model import GPT, GPTConfig, KVCache
from fusedlm.ops import attention, layer_norm, layernorm_mlp, linear_cross_entropy, lm_head_softmax, sample
from fusedlm.patching import PatchReport, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "PatchReport",
    "BackendError",
    "attention",
    "available_backends",
    "layer_norm",
    "layernorm_mlp",
    "linear_cross_entropy",
    "lm_head_softmax",
    "nn",
    "patch",
    "reference",
    "sample",
    "unpatch",
]
