"""Benchmark of fusedlm.linear_cross_entropy: the vocabulary projection with the cross-entropy loss.

One variant, the training loss loss = CE(x W^T, target), mean over tokens, no bias; x (N, d) and
W (V, d) are leaves that need a gradient. The baseline is eager `F.cross_entropy(F.linear(x, W), t)`,
which holds the (N, V) logits, their log-softmax and their gradient (N x V x 4 bytes each: 393 MiB
at 2048 x 50304, 1.5 GiB at 8192 x 50304). The C++ backends hold one chunk of logits (about 64 MiB)
and recompute it in backward: four GEMMs of 2NVd flops against eager's three, in exchange for the
memory; the "four GEMMs" provider times just those GEMMs (on whole (N, V) tensors, so not a strict
floor: the op's cached tiles can beat it). The Triton backend (GPU only) holds no logits at all, only
float32 partials of O(N) and the float32 dW / dX accumulators, and recomputes the logit tiles in both
backward kernels (five GEMMs).

Peers: torch's `F.linear_cross_entropy` (torch >= 2.13) without options (its reference path) and
with `torch.nn.LinearCrossEntropyOptions()` (its chunked path); torch.compile of the eager pair;
liger-kernel and cut-cross-entropy on a GPU where installed. GB/s is not reported (the op is
GEMM-bound: 2NVd flops per GEMM).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import dispatch

from .harness import Case, Inputs, Provider, Variant, float32_cases

OP = "softmax_output"
TITLE = "softmax_output (fusedlm.linear_cross_entropy)"


VARIANTS = {
    "linear_cross_entropy": Variant("F.linear+F.cross_entropy",
                                    "mean cross-entropy of x W^T (no bias), against eager F.linear + F.cross_entropy"),
}

# Shapes (tokens N, d, V). The CPU target is 8192 x 768 x 50304 fp32, in --full.
PRESETS = {
    ("cpu", "quick"): [(1024, 768, 50304)],  # about 2 minutes on 2 quiet cores
    ("cpu", "full"): [(2048, 768, 50304), (8192, 768, 50304), (2048, 2048, 128256)],
    ("cuda", "quick"): [(8192, 768, 50304), (16384, 2048, 128256)],
    ("cuda", "full"): [(2048, 768, 50304), (8192, 768, 50304), (16384, 768, 50304), (4096, 2048, 128256),
                       (16384, 2048, 128256)],
}
# Timed reps per provider and mode, where the runner's defaults (30 on the CPU) would take an hour:
# a CPU forward+backward at 2048 x 768 x 50304 costs seconds per provider.
REPEATS = {("cpu", "quick"): 2, ("cpu", "full"): 3}

# The time target on the CPU (forward+backward, fp32): at most the eager baseline's time.
TARGETS = {("cpu", (8192, 768, 50304), "float32"): 1.0}


def target(case: Case) -> float | None:
    return TARGETS.get((case.device, tuple(case.shape), case.dtype))


def cases(preset: str, device: str, dtypes: list) -> list:
    return float32_cases(OP, VARIANTS, PRESETS[(device, preset)], device, preset, dtypes)


def baseline(case: Case) -> str:
    return VARIANTS[case.variant].baseline


def make_inputs(case: Case) -> Inputs:
    n, d, vocab = case.shape
    kw = dict(device=case.device, dtype=case.torch_dtype)
    torch.manual_seed(0)
    x = torch.randn(n, d, device=case.device).to(**kw).requires_grad_()
    w = (torch.randn(vocab, d, device=case.device) / d ** 0.5).to(**kw).requires_grad_()
    target = torch.randint(0, vocab, (n,), device=case.device)
    return Inputs({"x": x, "weight": w, "target": target}, (torch.tensor(1.0, device=case.device),))


def min_bytes(case: Case, mode: str) -> int:
    return 0  # GEMM-bound: no meaningful traffic floor


# --- providers -------------------------------------------------------------------------------

def _fused(backend: str):
    return lambda t: fusedlm.linear_cross_entropy(t["x"], t["weight"], t["target"], backend=backend)


def _eager(t):
    return F.cross_entropy(F.linear(t["x"], t["weight"]).float(), t["target"])


class _FourGemms(torch.autograd.Function):
    """The GEMMs of a backward that recomputes the logits: S = x W^T in forward, then S again, dX = S W
    and dW = S^T x in backward, full-size GEMMs and nothing else (no softmax, no loss; S is held whole,
    so neither its memory nor its time is a strict floor). Eager does three of these GEMMs plus
    element-wise passes over S; a recomputing op does four, so it can beat eager only where those
    passes cost more than one GEMM."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.mm(x, weight.t())[0, 0].float()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        s = torch.mm(x, weight.t())
        return torch.mm(s, weight), torch.mm(s.t(), x)


def _four_gemms(t):
    return _FourGemms.apply(t["x"], t["weight"])


def _torch_lce(chunked: bool):
    if not hasattr(F, "linear_cross_entropy"):
        return None, f"torch {torch.__version__} has no F.linear_cross_entropy"
    if chunked and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None, f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions"
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return (lambda t: F.linear_cross_entropy(t["x"], t["weight"], t["target"], options=options)), ""


def _liger():
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "liger-kernel is not installed"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as exc:
        return None, f"liger-kernel does not import: {exc}"
    return (lambda t: liger_fused_linear_cross_entropy(t["x"], t["weight"], t["target"])), ""


def _cce():
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return None, "cut-cross-entropy is not installed"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as exc:
        return None, f"cut-cross-entropy does not import: {exc}"
    return (lambda t: cce(t["x"], t["weight"], t["target"])), ""


def providers(case: Case) -> list:
    out = []
    native = "CPU" if case.device == "cpu" else "CUDA"
    name = f"fusedlm[{case.device}]"
    if dispatch.has_cpp_kernel("linear_cross_entropy_fwd", native):
        out.append(Provider(name, _fused(case.device), "fusedlm"))
    else:
        why = (f"the extension fusedlm._C is not built ({dispatch._C_ERROR})" if dispatch._C is None
               else f"fusedlm._C has no {native} kernel for this op")
        out.append(Provider(name, None, "fusedlm", why))
    if case.device == "cpu":
        out.append(Provider("fusedlm[triton]", None, "fusedlm",
                            "Triton needs a GPU here; its CPU interpreter is a test tool, not a performance path"))
    elif not dispatch._triton_importable():
        out.append(Provider("fusedlm[triton]", None, "fusedlm", "triton is not installed"))
    else:
        out.append(Provider("fusedlm[triton]", _fused("triton"), "fusedlm"))
    out.append(Provider(baseline(case), _eager, "peer"))
    fn, why = _torch_lce(False)
    out.append(Provider("F.linear_cross_entropy", fn, "peer", why))
    fn, why = _torch_lce(True)
    out.append(Provider("F.linear_cross_entropy(chunked)", fn, "peer", why))
    out.append(Provider("compile(eager)", _eager, "compile"))
    out.append(Provider("four GEMMs", _four_gemms, "floor"))
    if case.device == "cuda":
        for pname, (fn, why) in (("liger", _liger()), ("cut-cross-entropy", _cce())):
            out.append(Provider(pname, fn, "peer", why))
    return out
