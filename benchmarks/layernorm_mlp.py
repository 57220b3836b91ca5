"""Benchmark of fusedlm.layernorm_mlp: the GPT-2 pre-norm feed-forward sub-block.

One variant, GPT-2's block: y = x + proj(gelu_tanh(fc(LayerNorm(x)))), every bias present, h = 4d;
x (tokens, d) and every parameter are leaves that need a gradient (a training step). A case's
shape is (tokens, d, h).

Providers:
    fusedlm[cpu] / fusedlm[cuda] / fusedlm[triton]        recompute=False (saves x and pre_act)
    ... + ",recompute" variants                           recompute=True (saves x)
    eager           nn.LayerNorm + nn.Linear + GELU + nn.Linear + add, as F.* calls (the baseline)
    compile(eager)  torch.compile of it
    six GEMMs       y = (x fc_w^T) proj_w^T with autograd: exactly the sub-block's two forward and four
                    backward GEMMs and nothing else, the floor a CPU implementation can approach
    TransformerEngine (te.LayerNormMLP) and liger-kernel where installed, on a GPU

On the CPU the six GEMMs are nearly the whole time (2 * tokens * d * h * 2 flops each); the issue's
targets at 4096 x 768 x 3072: forward+backward within 1.04x of the six GEMMs (fp32 and bf16), and
bytes saved for backward, beyond the parameters, at most 50% of eager's (recompute=False) and 15%
(recompute=True), and recompute=True costing at most one more GEMM. The saved-MB column counts the
parameters too (about 2 d h elements); the verdict lines (target_notes) take them out, and judge
recompute's extra time against one GEMM (the six GEMMs' forward time over two).

Minimum traffic (GB/s column): forward reads x and writes y (2 (tokens, d) tensors) plus the
weights; backward reads dy, x and writes dx (3) plus reading the weights and writing their
gradients. The op is GEMM-bound; GB/s is for comparison between providers only.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import dispatch

from .harness import Case, Inputs, Provider, Variant

OP = "layernorm_mlp"
TITLE = "layernorm_mlp (fusedlm.layernorm_mlp)"
EPS = 1e-5
ACTIVATION = "gelu_tanh"


VARIANTS = {
    "gpt2": Variant("eager", "GPT-2 block: x + proj(gelu_tanh(fc(LayerNorm(x)))), biases, h = 4d, "
                             "against eager nn.LayerNorm + nn.Linear + GELU + nn.Linear + add"),
}

# Shapes (tokens, d, h) per device and preset: GPT-2 small, medium and XL widths.
PRESETS = {
    ("cpu", "quick"): [(4096, 768, 3072)],
    ("cpu", "full"): [(4096, 768, 3072), (16384, 768, 3072), (4096, 1024, 4096), (4096, 1600, 6400)],
    ("cuda", "quick"): [(16384, 768, 3072), (16384, 1600, 6400)],
    ("cuda", "full"): [(4096, 768, 3072), (16384, 768, 3072), (4096, 1024, 4096), (16384, 1024, 4096),
                       (4096, 1600, 6400), (16384, 1600, 6400)],
}
# A CPU forward+backward at 4096 x 768 x 3072 costs about 0.6 s (fp32) per provider and mode.
REPEATS = {("cpu", "quick"): 10, ("cpu", "full"): 5}


# The CPU time target, fp32 and bf16: forward+backward within 1.04x of the six GEMMs alone, i.e. a
# speed-up over them of at least 1 / 1.04 (recompute=False; recompute=True may cost one more GEMM).
TARGETS = {("cpu", (4096, 768, 3072)): [("forward+backward", "six GEMMs", 1 / 1.04, "fusedlm[cpu]")]}


def target(case: Case) -> list | None:
    return TARGETS.get((case.device, tuple(case.shape)))


# The other two goals, checked on every case a run has the rows for: recompute=True costs at most
# one more GEMM's time in forward+backward (one GEMM: the six GEMMs' forward time over two), and the
# bytes saved for backward beyond the parameters are at most these shares of eager's.
RECOMPUTE_GEMMS = 1.0
SAVED_SHARE = {"": 0.50, ",recompute": 0.15}


def _param_bytes(case: Case) -> int:
    """norm weight and bias, fc weight and bias, proj weight and bias."""
    _, d, h = case.shape
    return (2 * d * h + h + 3 * d) * case.torch_dtype.itemsize


def target_notes(rows: list) -> list:
    """Verdict lines (benchmarks/run.py adds them after the speed targets) on recompute's cost and the
    bytes saved for backward, of each fusedlm backend that ran with and without recompute."""
    by_key = {(r.case, r.provider, r.mode): r for r in rows}
    lines = []
    for r in rows:
        if not (r.provider.startswith("fusedlm[") and "," not in r.provider and r.mode == "forward+backward"):
            continue
        backend, name = r.provider[len("fusedlm["):-1], f"{r.case.variant} {r.case.label} {r.case.dtype}"
        rc = by_key.get((r.case, f"fusedlm[{backend},recompute]", "forward+backward"))
        six = by_key.get((r.case, "six GEMMs", "forward"))
        if rc and six and rc.median_ms and r.median_ms and six.median_ms:
            gemm = six.median_ms / 2
            cost = (rc.median_ms - r.median_ms) / gemm
            verdict = "met" if cost <= RECOMPUTE_GEMMS else "MISSED"
            lines.append(f"target {verdict}: {name} fusedlm[{backend},recompute] forward+backward adds "
                         f"{rc.median_ms - r.median_ms:.1f} ms, {cost:.2f} of one GEMM's {gemm:.1f} ms (the six "
                         f"GEMMs' forward over two; goal <= {RECOMPUTE_GEMMS:.2f})")
        eager, params = by_key.get((r.case, "eager", "forward+backward")), _param_bytes(r.case)
        for suffix, goal in SAVED_SHARE.items():
            mine = by_key.get((r.case, f"fusedlm[{backend}{suffix}]", "forward+backward"))
            if not (mine and eager and mine.saved_bytes is not None and eager.saved_bytes):
                continue
            share = (mine.saved_bytes - params) / (eager.saved_bytes - params)
            verdict = "met" if share <= goal else "MISSED"
            lines.append(f"target {verdict}: {name} fusedlm[{backend}{suffix}] saves {share:.2%} of eager's bytes "
                         f"for backward beyond the parameters ({(mine.saved_bytes - params) / 2**20:.1f} MB against "
                         f"{(eager.saved_bytes - params) / 2**20:.1f}; goal <= {goal:.0%})")
    return lines


def cases(preset: str, device: str, dtypes: list) -> list:
    return [Case(OP, v, shape, dt, device) for v in VARIANTS for shape in PRESETS[(device, preset)] for dt in dtypes
            if not (device == "cpu" and dt == "float16")]


def baseline(case: Case) -> str:
    return VARIANTS[case.variant].baseline


def make_inputs(case: Case) -> Inputs:
    n, d, h = case.shape
    kw = dict(device=case.device, dtype=case.torch_dtype)
    torch.manual_seed(0)

    def leaf(t):
        return t.to(**kw).requires_grad_()

    dev = case.device
    tensors = {
        "x": leaf(torch.randn(n, d, device=dev)),
        "norm_weight": leaf(1 + 0.1 * torch.randn(d, device=dev)),
        "norm_bias": leaf(0.1 * torch.randn(d, device=dev)),
        "fc_weight": leaf(torch.randn(h, d, device=dev) / d ** 0.5),
        "fc_bias": leaf(0.1 * torch.randn(h, device=dev)),
        "proj_weight": leaf(torch.randn(d, h, device=dev) / h ** 0.5),
        "proj_bias": leaf(0.1 * torch.randn(d, device=dev)),
    }
    return Inputs(tensors, (torch.randn(n, d, **kw),))


def min_bytes(case: Case, mode: str) -> int:
    n, d, h = case.shape
    s = case.torch_dtype.itemsize
    weights = 2 * d * h * s
    fwd = 2 * n * d * s + weights
    bwd = 3 * n * d * s + 2 * weights
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


# --- providers -------------------------------------------------------------------------------

def _fused(backend: str, recompute: bool):
    def run(t):
        return fusedlm.layernorm_mlp(t["x"], t["norm_weight"], t["norm_bias"], t["fc_weight"], t["fc_bias"],
                                     t["proj_weight"], t["proj_bias"], eps=EPS, activation=ACTIVATION,
                                     residual=True, recompute=recompute, backend=backend)
    return run


def _eager(t):
    x = t["x"]
    xn = F.layer_norm(x, (x.shape[-1],), t["norm_weight"], t["norm_bias"], EPS)
    a = F.gelu(F.linear(xn, t["fc_weight"], t["fc_bias"]), approximate="tanh")
    return x + F.linear(a, t["proj_weight"], t["proj_bias"])


def _six_gemms(t):
    return F.linear(F.linear(t["x"], t["fc_weight"]), t["proj_weight"])


def _transformer_engine(case: Case):
    if case.device != "cuda":
        return None, "Transformer Engine runs on NVIDIA GPUs only"
    if importlib.util.find_spec("transformer_engine") is None:
        return None, "transformer_engine is not installed"
    try:
        import transformer_engine.pytorch as te
    except ImportError as exc:
        return None, f"transformer_engine does not import: {exc}"
    n, d, h = case.shape
    module = te.LayerNormMLP(d, h, eps=EPS, activation="gelu", params_dtype=case.torch_dtype).to(case.device)
    return (lambda t: t["x"] + module(t["x"])), ""


def _liger(case: Case):
    if case.device != "cuda":
        return None, "liger-kernel runs on GPUs only"
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "liger-kernel is not installed"
    return None, "liger-kernel has no fused LayerNorm + MLP (only separate norm and GEGLU/SwiGLU kernels)"


def providers(case: Case) -> list:
    out = []
    for recompute in (False, True):
        suffix = ",recompute" if recompute else ""
        if case.device == "cpu":
            if dispatch.has_cpp_kernel("layernorm_mlp_fwd", "CPU"):
                out.append(Provider(f"fusedlm[cpu{suffix}]", _fused("cpu", recompute), "fusedlm"))
            else:
                out.append(Provider(f"fusedlm[cpu{suffix}]", None, "fusedlm",
                                    f"the extension fusedlm._C is not built ({dispatch._C_ERROR})"))
        else:
            if dispatch.has_cpp_kernel("layernorm_mlp_fwd", "CUDA"):
                out.append(Provider(f"fusedlm[cuda{suffix}]", _fused("cuda", recompute), "fusedlm"))
            else:
                out.append(Provider(f"fusedlm[cuda{suffix}]", None, "fusedlm",
                                    "fusedlm._C was built without CUDA kernels"))
            if not dispatch._triton_importable():
                out.append(Provider(f"fusedlm[triton{suffix}]", None, "fusedlm", "triton is not installed"))
            elif importlib.util.find_spec("fusedlm.kernels.layernorm_mlp") is None:
                out.append(Provider(f"fusedlm[triton{suffix}]", None, "fusedlm",
                                    "fusedlm.kernels.layernorm_mlp is missing"))
            else:
                out.append(Provider(f"fusedlm[triton{suffix}]", _fused("triton", recompute), "fusedlm"))
    if case.device == "cpu":
        out.append(Provider("fusedlm[triton]", None, "fusedlm",
                            "Triton needs a GPU here; its CPU interpreter is a test tool, not a performance path"))
    out.append(Provider("eager", _eager, "peer"))
    out.append(Provider("compile(eager)", _eager, "compile"))
    out.append(Provider("six GEMMs", _six_gemms, "floor"))
    fn, why = _transformer_engine(case)
    out.append(Provider("TransformerEngine", fn, "peer", why))
    fn, why = _liger(case)
    out.append(Provider("liger", fn, "peer", why))
    return out
