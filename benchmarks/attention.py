"""Benchmark of fusedlm.attention: causal and full attention, and one-token decode against a KV cache.

Variants (q (B, H, Nq, D); k, v (B, H, Nk, D); a case's shape is (B, H, Nq, Nk, D)):
    causal   Nq = Nk, causal mask          baseline SDPA (its default backend choice)
    full     Nq = Nk, no mask              baseline SDPA
    decode   Nq = 1 against an Nk-key cache, causal (bottom-right aligned: the query sees every key)

q, k and v are leaves that need a gradient (a training step); decode is timed the same way, but its
forward is what matters (inference). Providers: fusedlm[cpu] (the C++ CPU kernel) on CPU tensors,
fusedlm[cuda] (the CUDA C++ kernel) and fusedlm[triton] on a GPU (the Triton interpreter on CPU
is a test tool, not a speed), the eager reference (fusedlm.reference.attention, which builds the
N x N scores), torch.compile of the reference, and F.scaled_dot_product_attention with each of its
backends that exists on the device (SDPA[flash], SDPA[efficient], SDPA[cudnn], SDPA[math]).

Minimum traffic, in (B, H, N, D) tensors: forward reads q, k, v and writes out (4); backward reads
q, k, v, out, dout and writes dq, dk, dv (8). The op is compute-bound: FLOPs are
4 * B * H * Nq * Nk * D forward (halved when causal), 2.5x that backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import dispatch, reference

from .harness import Case, Inputs, Provider

OP = "attention"
TITLE = "attention (fusedlm.attention)"


@dataclass(frozen=True)
class Variant:
    causal: bool
    baseline: str
    title: str


VARIANTS = {
    "causal": Variant(True, "SDPA", "causal self-attention, Nq = Nk"),
    "full": Variant(False, "SDPA", "self-attention without a mask, Nq = Nk"),
    "decode": Variant(True, "SDPA", "one query against an Nk-key cache (causal, bottom-right aligned)"),
}

# (variants, shapes (B, H, Nq, Nk, D), dtypes the preset runs) per device and preset. The quick CPU preset is
# the two target shapes (causal training step, one-token decode against a 4096-key cache).
PRESETS = {
    ("cpu", "quick"): (("causal", "decode"), [(4, 12, 1024, 1024, 64), (4, 12, 1, 4096, 64)],
                       ("float32", "bfloat16")),
    ("cpu", "full"): (("causal", "full", "decode"),
                      [(4, 12, 256, 256, 64), (4, 12, 1024, 1024, 64), (4, 12, 1024, 1024, 128),
                       (1, 12, 4096, 4096, 64), (4, 12, 1, 4096, 64)], ("float32", "bfloat16")),
    ("cuda", "quick"): (("causal", "full"), [(4, 16, 4096, 4096, 128), (4, 16, 4096, 4096, 64)],
                        ("bfloat16", "float16")),
    ("cuda", "full"): (("causal", "full", "decode"),
                       [(16, 16, 512, 512, 64), (8, 16, 2048, 2048, 128), (4, 16, 4096, 4096, 128),
                        (2, 16, 8192, 8192, 128), (1, 16, 16384, 16384, 128), (1, 16, 16384, 16384, 64),
                        (16, 16, 1, 8192, 128)], ("bfloat16", "float16", "float32")),
}

# The quick CPU causal case takes about 4 s per rep over the three modes on a quiet machine, most of it
# the eager reference (forward+backward ~0.8 s fp32, more in bf16): few reps. The whole quick preset took
# 11 minutes on a machine loaded 3-4x over its 2 cores, so about 3-4 minutes when quiet.
REPEATS = {("cpu", "quick"): 5, ("cpu", "full"): 5}

# The CPU targets for fusedlm[cpu], fp32 and bf16, as (mode, provider, least speed-up over it):
# forward+backward at least as fast as SDPA and at least 3x the eager reference; decode's forward (inference)
# at least as fast as SDPA's.
TARGETS = {
    ("cpu", "causal", (4, 12, 1024, 1024, 64)): [("forward+backward", "SDPA", 1.0),
                                                 ("forward+backward", "reference", 3.0)],
    ("cpu", "decode", (4, 12, 1, 4096, 64)): [("forward", "SDPA", 1.0)],
}


def target(case: Case) -> list | None:
    return TARGETS.get((case.device, case.variant, tuple(case.shape)))


def _fits(variant: str, shape: tuple) -> bool:
    """decode takes the Nq = 1 shapes, the others the Nq = Nk ones."""
    return (shape[2] == 1) == (variant == "decode")


def cases(preset: str, device: str, dtypes: list) -> list:
    variants, shapes, preset_dtypes = PRESETS[(device, preset)]
    return [Case(OP, v, shape, dt, device) for v in variants for shape in shapes if _fits(v, shape)
            for dt in dtypes if dt in preset_dtypes]


def baseline(case: Case) -> str:
    return VARIANTS[case.variant].baseline


def make_inputs(case: Case) -> Inputs:
    b, h, nq, nk, d = case.shape
    kw = dict(device=case.device, dtype=case.torch_dtype)
    torch.manual_seed(0)
    tensors = {name: torch.randn(b, h, n, d, device=case.device).to(**kw).requires_grad_()
               for name, n in (("q", nq), ("k", nk), ("v", nk))}
    return Inputs(tensors, (torch.randn(b, h, nq, d, **kw),))


def min_bytes(case: Case, mode: str) -> int:
    b, h, nq, nk, d = case.shape
    s = case.torch_dtype.itemsize
    fwd = (2 * nq + 2 * nk) * b * h * d * s
    bwd = (4 * nq + 4 * nk) * b * h * d * s
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def flops(case: Case, mode: str) -> float:
    """4 * B * H * Nq * Nk * D forward (halved for causal Nq = Nk), backward 2.5x forward."""
    b, h, nq, nk, d = case.shape
    fwd = 4 * b * h * nq * nk * d * (0.5 if case.variant == "causal" else 1.0)
    return {"forward": fwd, "backward": 2.5 * fwd, "forward+backward": 3.5 * fwd}[mode]


# --- providers -------------------------------------------------------------------------------

def _fused(backend: str, v: Variant):
    def run(t):
        return fusedlm.attention(t["q"], t["k"], t["v"], causal=v.causal, backend=backend)
    return run


def _reference(v: Variant):
    def run(t):
        return reference.attention(t["q"], t["k"], t["v"], causal=v.causal)
    return run


def _sdpa(v: Variant, backend=None):
    """SDPA; `backend` (a torch.nn.attention.SDPBackend) pins its kernel, None lets it choose. Its
    is_causal is top-left aligned, so decode (one query that sees every key) passes no mask."""
    causal = v.causal and v is not VARIANTS["decode"]

    def run(t):
        if backend is None:
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal)
    return run


def _sdpa_backends(device: str) -> list:
    """(name, SDPBackend) of the SDPA kernels that exist for this device in this torch build."""
    from torch.nn.attention import SDPBackend

    names = ["FLASH_ATTENTION", "MATH"] if device == "cpu" else ["FLASH_ATTENTION", "EFFICIENT_ATTENTION",
                                                                  "CUDNN_ATTENTION", "MATH"]
    short = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
             "MATH": "math"}
    return [(f"SDPA[{short[n]}]", getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def providers(case: Case) -> list:
    v = VARIANTS[case.variant]
    if case.device == "cpu":
        out = [Provider("fusedlm[cpu]", _fused("cpu", v), "fusedlm") if dispatch.has_cpp_kernel("attention_fwd", "CPU")
               else Provider("fusedlm[cpu]", None, "fusedlm", "fusedlm._C is not built")]
    elif dispatch.has_cpp_kernel("attention_fwd", "CUDA"):
        out = [Provider("fusedlm[cuda]", _fused("cuda", v), "fusedlm")]
    else:
        out = [Provider("fusedlm[cuda]", None, "fusedlm", "fusedlm._C was built without the CUDA attention kernels")]
    if case.device == "cpu":
        out.append(Provider("fusedlm[triton]", None, "fusedlm",
                            "Triton needs a GPU here; its CPU interpreter is a test tool, not a performance path"))
    elif not dispatch._triton_importable():
        out.append(Provider("fusedlm[triton]", None, "fusedlm", "triton is not installed"))
    else:
        out.append(Provider("fusedlm[triton]", _fused("triton", v), "fusedlm"))
    out.append(Provider("SDPA", _sdpa(v), "peer"))
    quick_cpu = case.device == "cpu" and case.shape == PRESETS[("cpu", "quick")][1][0]
    for name, backend in _sdpa_backends(case.device):
        if quick_cpu and name == "SDPA[math]":
            out.append(Provider(name, None, "peer", "left out of the quick CPU preset (time): it runs the eager "
                                                    "reference's algorithm; see --full"))
        elif quick_cpu and name == "SDPA[flash]":
            out.append(Provider(name, None, "peer", "left out of the quick CPU preset: it is the kernel SDPA "
                                                    "picks itself here (the SDPA row); see --full"))
        elif case.device == "cuda" and name == "SDPA[math]" and case.shape[2] * case.shape[3] > 4096 * 4096:
            out.append(Provider(name, None, "peer", "the N x N scores of this shape do not fit comfortably"))
        else:
            out.append(Provider(name, _sdpa(v, backend), "peer"))
    out.append(Provider("reference", _reference(v), "reference"))
    out.append(Provider("compile(reference)", _reference(v), "compile"))
    return out
