"""Triton kernels of fusedlm, one file per op; installed as the subpackage fusedlm.kernels."""
import contextlib
import os

import torch


def device_guard(op: str, t: torch.Tensor):
    """Launch on t's GPU; CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{op}: the triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    return contextlib.nullcontext()
