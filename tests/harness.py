"""The test harness: the one tolerance table, the error-budget rule (STYLE.md), the shape
lists and the backend parameters used by every test.

Error budget: a fused result `out` in dtype T is compared with the float64 reference `ref64`,
and allowed twice the error that PyTorch itself makes in the same dtype (`torch_out`, the
reference run in T) plus an absolute floor from the table:

    max|out - ref64| <= 2 * max|torch_out - ref64| + atol[T]
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.utils._pytree
import torch.utils._python_dispatch

# Absolute floors per dtype: what rounding one stored value to T can cost near magnitude 1.
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# Odd sizes beside round ones (flash-attention's habit).
ODD_SIZES = (1, 17, 97, 123, 1025)
ROUND_SIZES = (64, 128, 768)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_budget(out, ref64, torch_out, *, name="output", atol=None, factor=2.0):
    """max|out - ref64| <= factor * max|torch_out - ref64| + atol[out.dtype]."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all() == torch.isfinite(ref64).all(), f"{name}: non-finite values differ"
    floor = ATOL[out.dtype] if atol is None else atol
    err = max_err(out, ref64)
    budget = factor * max_err(torch_out, ref64) + floor
    assert err <= budget, f"{name}: max error {err:.3e} exceeds budget {budget:.3e} ({out.dtype})"
    return err, budget


HAS_GPU = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def backend_device(backend: str) -> str:
    """The device a backend's tests run on here."""
    if backend in ("cpu", "cuda"):
        return backend
    return "cuda" if HAS_GPU else "cpu"  # triton (the interpreter without a GPU), reference


def backend_params(cpu=True, cuda=True, triton=True):
    """pytest params for the kernel backends, marked so that each skips with its reason."""
    params = []
    if cpu:
        params.append(pytest.param("cpu", id="cpu"))
    if cuda:
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    if triton:
        params.append(pytest.param("triton", id="triton", marks=pytest.mark.triton))
    return params


class RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Under `with RecordOps() as rec:`, rec.calls lists (op, sizes) of every op dispatched, in order
    (ATen's and fusedlm's alike), sizes the numel of each tensor the op returned. It keeps no tensor:
    holding one would change what autograd copies."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves(out)
        self.calls.append((func, tuple(t.numel() for t in leaves if isinstance(t, torch.Tensor))))
        return out
