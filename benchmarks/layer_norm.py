"""Benchmark of fusedlm.layer_norm: LayerNorm and RMSNorm, alone and with the residual add.

Variants (y = norm(h) * weight (+ bias)):
    layernorm         h = x                     baseline F.layer_norm
    residual          h = x + residual, -> (y, h)   baseline eager `h = x + r; F.layer_norm(h)`
    rmsnorm           h = x                     baseline F.rms_norm
    residual_rmsnorm  h = x + residual, -> (y, h)   baseline eager `h = x + r; F.rms_norm(h)`

Every input (x, weight, bias, residual) is a leaf that needs a gradient (a training step);
the residual forms take a gradient for both y and h, as in a residual stream.

Minimum traffic, in (M, N) tensors: forward reads x (and residual) and writes y (and h):
2, or 4 with the residual; backward reads dy (and dh) and h, writes dx: 3, or 4. The GB/s
column is these bytes over the median time (weights and the 8 bytes of statistics per row
are left out).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import dispatch, reference

from .harness import Case, Inputs, Provider

OP = "layer_norm"
TITLE = "layer_norm (fusedlm.layer_norm)"
EPS = 1e-5


@dataclass(frozen=True)
class Variant:
    norm: str
    residual: bool
    baseline: str
    title: str

    @property
    def bias(self) -> bool:
        return self.norm == "layernorm"


VARIANTS = {
    "layernorm": Variant("layernorm", False, "F.layer_norm", "LayerNorm"),
    "residual": Variant("layernorm", True, "add+F.layer_norm",
                        "residual form: (LayerNorm(x + r), x + r), against eager `h = x + r; F.layer_norm(h)`"),
    "rmsnorm": Variant("rmsnorm", False, "F.rms_norm", "RMSNorm"),
    "residual_rmsnorm": Variant("rmsnorm", True, "add+F.rms_norm",
                                "residual form: (RMSNorm(x + r), x + r), against eager `h = x + r; F.rms_norm(h)`"),
}

# (variants, shapes (M, N)) per device and preset. The target is 8192 x 768 on the CPU.
PRESETS = {
    ("cpu", "quick"): (("layernorm", "residual", "rmsnorm"), [(8192, 768)]),
    ("cpu", "full"): (tuple(VARIANTS), [(2048, 768), (8192, 768), (32768, 768), (8192, 2048), (8192, 4096),
                                        (2048, 8192)]),
    ("cuda", "quick"): (("layernorm", "residual", "rmsnorm"), [(8192, 768), (32768, 4096)]),
    ("cuda", "full"): (tuple(VARIANTS), [(2048, 768), (8192, 768), (32768, 768), (8192, 4096), (32768, 4096),
                                         (8192, 8192), (32768, 8192)]),
}


# The targets on the CPU at 8192 x 768, forward+backward, fp32 and bf16: the fused op at least
# as fast as F.layer_norm, and the residual form at least 1.15x eager add + F.layer_norm.
TARGETS = {("cpu", "layernorm", (8192, 768)): 1.0, ("cpu", "residual", (8192, 768)): 1.15}


def target(case: Case) -> float | None:
    """The least forward+backward speed-up over the baseline the fusedlm backend must reach, if any."""
    return TARGETS.get((case.device, case.variant, tuple(case.shape)))


def cases(preset: str, device: str, dtypes: list) -> list:
    variants, shapes = PRESETS[(device, preset)]
    return [Case(OP, v, shape, dt, device) for v in variants for shape in shapes for dt in dtypes]


def baseline(case: Case) -> str:
    return VARIANTS[case.variant].baseline


def make_inputs(case: Case) -> Inputs:
    v = VARIANTS[case.variant]
    m, n = case.shape
    kw = dict(device=case.device, dtype=case.torch_dtype)
    torch.manual_seed(0)

    def leaf(t):
        return t.to(**kw).requires_grad_()

    tensors = {
        "x": leaf(torch.randn(m, n, device=case.device)),
        "weight": leaf(1 + 0.1 * torch.randn(n, device=case.device)),
        "bias": leaf(0.1 * torch.randn(n, device=case.device)) if v.bias else None,
        "residual": leaf(torch.randn(m, n, device=case.device)) if v.residual else None,
    }
    grads = (torch.randn(m, n, **kw),) + ((torch.randn(m, n, **kw),) if v.residual else ())
    return Inputs(tensors, grads)


def min_bytes(case: Case, mode: str) -> int:
    v = VARIANTS[case.variant]
    m, n = case.shape
    tensors = {"forward": 4 if v.residual else 2, "backward": 4 if v.residual else 3}
    tensors["forward+backward"] = tensors["forward"] + tensors["backward"]
    return tensors[mode] * m * n * case.torch_dtype.itemsize


# --- providers -------------------------------------------------------------------------------

def _fused(backend: str, v: Variant):
    def run(t):
        return fusedlm.layer_norm(t["x"], t["weight"], t["bias"], eps=EPS, norm=v.norm, residual=t["residual"],
                                  backend=backend)
    return run


def _reference(v: Variant):
    def run(t):
        return reference.layer_norm(t["x"], t["weight"], t["bias"], eps=EPS, norm=v.norm, residual=t["residual"])
    return run


def _torch_peer(v: Variant):
    def norm(h, t):
        if v.norm == "layernorm":
            return F.layer_norm(h, (h.shape[-1],), t["weight"], t["bias"], EPS)
        return F.rms_norm(h, (h.shape[-1],), t["weight"], EPS)

    def run(t):
        if v.residual:
            h = t["x"] + t["residual"]
            return norm(h, t), h
        return norm(t["x"], t)
    return run


def _liger(v: Variant):
    """liger-kernel's Triton norms (GPU only); it has no residual form to compare."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None, "liger-kernel is not installed"
    try:
        if v.norm == "layernorm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return (lambda t: LigerLayerNormFunction.apply(t["x"], t["weight"], t["bias"], EPS)), ""
        import inspect

        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        params = inspect.signature(LigerRMSNormFunction.forward).parameters
        if "in_place" in params:  # in place, it would overwrite the benchmark's fixed dy
            return (lambda t: LigerRMSNormFunction.apply(t["x"], t["weight"], EPS, 0.0, "llama", False)), ""
        return (lambda t: LigerRMSNormFunction.apply(t["x"], t["weight"], EPS)), ""
    except ImportError as exc:
        return None, f"liger-kernel does not import: {exc}"


def providers(case: Case) -> list:
    v = VARIANTS[case.variant]
    out = []
    if case.device == "cpu":
        if dispatch.has_cpp_kernel("layer_norm_fwd", "CPU"):
            out.append(Provider("fusedlm[cpu]", _fused("cpu", v), "fusedlm"))
        else:
            out.append(Provider("fusedlm[cpu]", None, "fusedlm",
                                f"the extension fusedlm._C is not built ({dispatch._C_ERROR})"))
        out.append(Provider("fusedlm[triton]", None, "fusedlm",
                            "Triton needs a GPU here; its CPU interpreter is a test tool, not a performance path"))
    else:
        if dispatch.has_cpp_kernel("layer_norm_fwd", "CUDA"):
            out.append(Provider("fusedlm[cuda]", _fused("cuda", v), "fusedlm"))
        else:
            out.append(Provider("fusedlm[cuda]", None, "fusedlm", "fusedlm._C was built without CUDA kernels"))
        if not dispatch._triton_importable():
            out.append(Provider("fusedlm[triton]", None, "fusedlm", "triton is not installed"))
        elif importlib.util.find_spec("fusedlm.kernels.layer_norm") is None:
            out.append(Provider("fusedlm[triton]", None, "fusedlm", "fusedlm.kernels.layer_norm is missing"))
        else:
            out.append(Provider("fusedlm[triton]", _fused("triton", v), "fusedlm"))
    out.append(Provider(v.baseline, _torch_peer(v), "peer"))
    out.append(Provider("reference", _reference(v), "reference"))
    out.append(Provider("compile(reference)", _reference(v), "compile"))
    if case.device == "cuda" and not v.residual:
        fn, why = _liger(v)
        out.append(Provider("liger", fn, "peer", why))
    return out
