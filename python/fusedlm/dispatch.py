"""Backend choice for every op.

`backend` is one of "auto", "cpu", "cuda", "triton", "reference".

- "cpu":  the C++ CPU kernels of fusedlm._C; CPU tensors only.
- "cuda": the CUDA C++ kernels of fusedlm._C (built when torch is a CUDA build); CUDA tensors only.
- "triton": the Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
- "reference": plain PyTorch (fusedlm.reference); any device.
- "auto": CUDA tensors take the GPU backend the benchmark suite measured faster for that op
  (`AUTO_GPU`); CPU tensors take "cpu", or "reference" where the extension was not built.

Asking for a backend that cannot run the given tensors raises `BackendError` (a ValueError)
that names the op, the backend and the reason; there is no silent fallback.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from fusedlm.validation import fmt_dtype

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

# Which GPU backend "auto" takes per op, in order of preference, for CUDA tensors: kernels that
# passed their tests on an H200 (benchmarks/gpu_check.sh of 2026-11-30, every GPU test passing; numbers
# in benchmarks/RESULTS.md), the faster first (bf16 forward+backward at the suite's GPU shapes):
#   layer_norm: CUDA C++ (3.7-5.0x Triton at 8192 x 768; at 32768 x 4096 from 0.92x to 1.28x of it);
#   attention: Triton (1.2-1.5x the CUDA C++ kernels; every head dim 16..256, where those take 64-128);
#   layernorm_mlp: CUDA C++ (1.6-1.7x Triton);
#   linear_cross_entropy: CUDA C++ (1.02x Triton at 8192 x 768 x 50304, 1.17x at 16384 x 2048 x 128256);
#   lm_head_softmax: Triton (1.5-1.8x CUDA at 1 and 64 rows, the generation case; CUDA is 1.9x Triton
#   at 4096 rows).
AUTO_GPU = {
    "layer_norm": ("cuda", "triton"),
    "attention": ("triton",),
    "layernorm_mlp": ("cuda", "triton"),
    "linear_cross_entropy": ("cuda", "triton"),
    "lm_head_softmax": ("triton", "cuda"),
}

try:  # importing _C registers every C++ op with the dispatcher
    from fusedlm import _C  # noqa: F401

    _C_ERROR = None
except ImportError as exc:  # the extension was not built
    _C = None
    _C_ERROR = str(exc)


class BackendError(ValueError):
    """A backend was asked for that cannot run the given tensors."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once at import: torch.compile cannot trace importlib's find_spec (a graph break that
# fails fullgraph=True), but it reads a module constant.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _triton_importable() -> bool:
    return _TRITON_IMPORTABLE


_KERNEL_CACHE: dict = {}


# A constant for the life of the process (registration happens when _C is imported): cached,
# since the dispatcher query costs tens of microseconds per call, and folded by torch.compile
# instead of breaking the graph.
@torch.compiler.assume_constant_result
def has_cpp_kernel(op: str, device_type: str) -> bool:
    """True when fusedlm._C registered `fusedlm::<op>` for this device ("CPU" or "CUDA")."""
    key = (op, device_type)
    if key not in _KERNEL_CACHE:
        name = f"fusedlm::{op}"
        _KERNEL_CACHE[key] = (
            _C is not None
            and torch._C._dispatch_has_kernel(name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(name, device_type)
        )
    return _KERNEL_CACHE[key]


def available_backends() -> dict[str, bool]:
    """Which backends can run on this machine, e.g. {"cpu": True, "cuda": False, "triton": False, "reference": True}."""
    gpu = torch.cuda.is_available()
    return {
        "cpu": _C is not None,
        "cuda": gpu and has_cpp_kernel("layer_norm_fwd", "CUDA"),
        "triton": _triton_importable() and (gpu or triton_interpret()),
        "reference": True,
    }


def _cannot(op: str, backend: str, reason: str) -> BackendError:
    return BackendError(f"{op}: backend={backend!r} cannot run these inputs: {reason}")


# The dtypes each kernel backend takes. fp16 is kept out of the CPU paths (fp16 arithmetic on
# the CPU runs hundreds of times slower; DESIGN.md).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}


def resolve(op: str, backend: str, device: torch.device, native_op: str | None, triton: bool,
            dtype: torch.dtype | None = None) -> str:
    """The concrete backend for `op` on tensors of `device` and `dtype` (see _resolve_device).

    A dtype the chosen kernel does not take sends "auto" to the reference (float64, or fp16 on
    the CPU) and makes an explicit backend a BackendError.
    """
    chosen = _resolve_device(op, backend, device, native_op, triton)
    if chosen != "reference" and dtype is not None and dtype not in KERNEL_DTYPES[chosen]:
        if backend == "auto":
            return "reference"
        names = ", ".join(fmt_dtype(d) for d in KERNEL_DTYPES[chosen])
        raise _cannot(op, backend, f"it takes {names} tensors, got {fmt_dtype(dtype)}")
    return chosen


def _resolve_device(op: str, backend: str, device: torch.device, native_op: str | None, triton: bool) -> str:
    """Return the concrete backend for `op` on tensors of `device`.

    native_op: the fusedlm._C op name that carries the CPU/CUDA kernels (e.g. "layer_norm_fwd"),
    or None when the op has no C++ kernel yet. triton: whether the op has a Triton kernel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    dev = device.type
    if backend == "auto":
        if dev == "cuda":
            for choice in AUTO_GPU.get(op, ()):
                if choice == "cuda" and native_op and has_cpp_kernel(native_op, "CUDA"):
                    return "cuda"
                if choice == "triton" and triton and _triton_importable():
                    return "triton"
            return "reference"
        if dev == "cpu" and native_op and has_cpp_kernel(native_op, "CPU"):
            return "cpu"
        return "reference"
    if backend == "reference":
        return backend
    if backend == "cpu":
        if dev != "cpu":
            raise _cannot(op, backend, f"the tensors are on {device}, the cpu backend takes CPU tensors")
        if _C is None:
            raise _cannot(op, backend, f"the extension fusedlm._C is not built ({_C_ERROR})")
        if not native_op or not has_cpp_kernel(native_op, "CPU"):
            raise _cannot(op, backend, "this op has no C++ CPU kernel")
        return backend
    if backend == "cuda":
        if dev != "cuda":
            raise _cannot(op, backend, f"the tensors are on {device}, the cuda backend takes CUDA tensors")
        if not native_op or not has_cpp_kernel(native_op, "CUDA"):
            raise _cannot(op, backend, "fusedlm._C was built without CUDA kernels for this op")
        return backend
    # triton
    if not triton:
        raise _cannot(op, backend, "this op has no Triton kernel")
    if not _triton_importable():
        raise _cannot(op, backend, "triton is not installed")
    if dev == "cpu" and not triton_interpret():
        raise _cannot(op, backend, "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    if dev not in ("cpu", "cuda"):
        raise _cannot(op, backend, f"Triton does not run on {device}")
    return backend
