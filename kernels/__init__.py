"""Triton kernels of fusedlm, one file per op; installed as the subpackage fusedlm.kernels."""
import contextlib
import functools
import os

import torch


def device_guard(op: str, t: torch.Tensor):
    """Launch on t's GPU; CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{op}: the triton backend runs CPU tensors only under TRITON_INTERPRET=1")
    return contextlib.nullcontext()


# The GPU families the launch tables tell apart, and the arch the static report (python -m
# fusedlm.gpu_report) compiles each family's entries for: Hopper and newer take "sm90", the rest "sm80".
REPORT_ARCHS = {"sm90": ("sm_90a",), "sm80": ("sm_80",)}


def triton_version() -> tuple[int, int]:
    """(major, minor) of the Triton release the kernels compile with: register allocation differs between
    releases, and a few launch-table entries with it (scripts/gpu_report_triton.sh checks another release)."""
    import triton

    return tuple(int(v) for v in triton.__version__.split(".")[:2])


@functools.lru_cache(None)
def gpu_family(index: int) -> str:
    """The launch-table family of CUDA device `index`."""
    return "sm90" if torch.cuda.get_device_capability(index)[0] >= 9 else "sm80"
