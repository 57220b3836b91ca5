"""Benchmark of fusedlm.lm_head_softmax: next-token probabilities from hidden states (generation).

One variant: probs = softmax(x W^T / T) in float32, T = 0.8, no bias (GPT-style heads have none),
x (N, d) and W (V, d) without gradients, forward only (MODES; generation runs no backward). Decode
steps (N = 1 to 64 tokens: a batch of sequences, one new token each) and a prefill (every prompt
position, as when scoring a prompt). The baseline is eager `torch.softmax(F.linear(x, W).float() / T)`,
which writes the logits in x's dtype, their float32 copy, the scaled copy and the probabilities;
fusedlm writes the probabilities (and, for 16-bit x, one chunk of 16-bit logits). Peers: torch.compile
of the eager code, and each fusedlm backend (fusedlm[triton] on a GPU only: the interpreter is a test
tool, not a speed).

Minimum traffic: read W (V d), x (N d), write probs (N V 4 bytes). A decode step is bound by reading
W (the GEMM does 2 N V d flops on V d weights: N flops per weight byte-pair); a prefill by the GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import dispatch

from .harness import Case, Inputs, Provider, Variant, float32_cases

OP = "lm_head"
TITLE = "lm_head (fusedlm.lm_head_softmax, forward only)"
TEMPERATURE = 0.8


VARIANTS = {
    "lm_head_softmax": Variant("F.linear+softmax", "softmax(x W^T / 0.8) float32, no bias, no gradients, against "
                                                   "eager F.linear + softmax"),
}

# Shapes (tokens N, d, V): decode steps of 1 to 64 tokens and a prefill.
PRESETS = {
    ("cpu", "quick"): [(1, 768, 50304), (64, 768, 50304), (1024, 768, 50304)],
    ("cpu", "full"): [(1, 768, 50304), (16, 768, 50304), (64, 768, 50304), (1024, 768, 50304),
                      (1, 2048, 128256), (64, 2048, 128256), (512, 2048, 128256)],
    ("cuda", "quick"): [(1, 2048, 128256), (64, 2048, 128256), (4096, 2048, 128256)],
    ("cuda", "full"): [(1, 768, 50304), (16, 768, 50304), (64, 768, 50304), (4096, 768, 50304),
                       (1, 2048, 128256), (8, 2048, 128256), (64, 2048, 128256), (4096, 2048, 128256)],
}
MODES = ("forward",)
# A CPU prefill forward at 1024 x 768 x 50304 is a 79 GFLOP GEMM (about 0.4 s): fewer reps than 30.
REPEATS = {("cpu", "quick"): 10, ("cpu", "full"): 5}


def cases(preset: str, device: str, dtypes: list) -> list:
    return float32_cases(OP, VARIANTS, PRESETS[(device, preset)], device, preset, dtypes)


def baseline(case: Case) -> str:
    return VARIANTS[case.variant].baseline


def make_inputs(case: Case) -> Inputs:
    n, d, vocab = case.shape
    kw = dict(device=case.device, dtype=case.torch_dtype)
    torch.manual_seed(0)
    x = torch.randn(n, d, device=case.device).to(**kw)
    w = (torch.randn(vocab, d, device=case.device) / d ** 0.5).to(**kw)
    return Inputs({"x": x, "weight": w}, ())  # no gradients: forward only


def min_bytes(case: Case, mode: str) -> int:
    n, d, vocab = case.shape
    return (vocab * d + n * d) * case.torch_dtype.itemsize + n * vocab * 4


# --- providers -------------------------------------------------------------------------------

def _fused(backend: str):
    return lambda t: fusedlm.lm_head_softmax(t["x"], t["weight"], temperature=TEMPERATURE, backend=backend)


def _eager(t):
    return torch.softmax(F.linear(t["x"], t["weight"]).float() / TEMPERATURE, dim=-1)


def providers(case: Case) -> list:
    out = []
    native = "CPU" if case.device == "cpu" else "CUDA"
    name = f"fusedlm[{case.device}]"
    if dispatch.has_cpp_kernel("lm_head_softmax", native) and case.torch_dtype in dispatch.KERNEL_DTYPES[case.device]:
        out.append(Provider(name, _fused(case.device), "fusedlm"))
    else:
        why = (f"the extension fusedlm._C is not built ({dispatch._C_ERROR})" if dispatch._C is None
               else f"fusedlm._C has no {native} kernel for this op and dtype")
        out.append(Provider(name, None, "fusedlm", why))
    if case.device == "cuda":
        out.append(Provider("fusedlm[triton]", _fused("triton"), "fusedlm"))
    else:
        out.append(Provider("fusedlm[triton]", None, "fusedlm", "GPU only (the interpreter is a test tool)"))
    out.append(Provider(baseline(case), _eager, "peer"))
    out.append(Provider("compile(eager)", _eager, "compile"))
    return out
