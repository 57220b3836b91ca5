"""End-to-end benchmark of fusedlm.GPT: one training step's forward and backward of the whole model.

One variant, GPT-2's architecture (pre-norm blocks, learned positions, tied output weights, tanh
GELU, biases) with the loss over every position. fusedlm.GPT runs every layer on the fused ops of
one backend (fusedlm[cpu], fusedlm[cuda], fusedlm[triton]): layer_norm for ln_1 and ln_f, attention,
layernorm_mlp for ln_2 + the MLP + the residual add, and linear_cross_entropy for the loss (no
logits). The baseline is fusedlm.reference.GPT, the same modules on the plain PyTorch reference ops
(eager, as a nanoGPT user would write it: attention with its (T, T) scores, F.linear + F.cross_entropy
with the (B T, V) logits); a peer is torch.compile of it. Both models start from one set of weights.

The case shape is (batch, seq_len, n_layer, n_embd, n_head, vocab). The model's parameters are
leaves of the inputs, so that the harness resets their gradients outside the timed region, and
the output is the loss (one gradient, 1.0). Peak memory includes the weights' gradients (the same
for every provider); saved MB counts every tensor autograd keeps, weights included.
"""
from __future__ import annotations

import torch

import fusedlm
from fusedlm import dispatch, reference

from .harness import Case, Inputs, Provider, Variant, float32_cases

OP = "gpt"
TITLE = "gpt (fusedlm.GPT, a training step of the whole model)"


VARIANTS = {
    "gpt2": Variant("reference", "GPT-2 architecture, loss over every position, against fusedlm.reference.GPT "
                                 "(eager plain PyTorch)"),
}

# (batch, seq_len, n_layer, n_embd, n_head, vocab): GPT-2 small (12 x 768, 12 heads, 124M parameters),
# and on a GPU also GPT-2 medium (24 x 1024, 16 heads).
PRESETS = {
    ("cpu", "quick"): [(2, 256, 12, 768, 12, 50304)],
    ("cpu", "full"): [(2, 256, 12, 768, 12, 50304), (4, 1024, 12, 768, 12, 50304)],
    ("cuda", "quick"): [(8, 1024, 12, 768, 12, 50304)],
    ("cuda", "full"): [(8, 1024, 12, 768, 12, 50304), (8, 1024, 24, 1024, 16, 50304)],
}
MODES = ("forward", "forward+backward")
# A CPU step of GPT-2 small at 512 tokens takes about 2.5 s: a few reps, not 30.
REPEATS = {("cpu", "quick"): 3, ("cpu", "full"): 3, ("cuda", "quick"): 20, ("cuda", "full"): 20}


def cases(preset: str, device: str, dtypes: list) -> list:
    return float32_cases(OP, VARIANTS, PRESETS[(device, preset)], device, preset, dtypes)


def baseline(case: Case) -> str:
    return VARIANTS[case.variant].baseline


def _config(case: Case) -> fusedlm.GPTConfig:
    _, seq, n_layer, n_embd, n_head, vocab = case.shape
    return fusedlm.GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=seq)


def _backends(case: Case) -> list:
    """The fused backends that can run here, by provider name."""
    out = []
    native = "CPU" if case.device == "cpu" else "CUDA"
    if all(dispatch.has_cpp_kernel(op, native) for op in
           ("layer_norm_fwd", "attention_fwd", "layernorm_mlp_fwd", "linear_cross_entropy_fwd")):
        out.append(case.device)
    if case.device == "cuda" and dispatch._triton_importable():
        out.append("triton")
    return out


def make_inputs(case: Case) -> Inputs:
    batch, seq = case.shape[:2]
    config = _config(case)
    torch.manual_seed(0)
    ref = reference.GPT(config).to(device=case.device, dtype=case.torch_dtype)
    tensors = {"model:reference": ref}
    for backend in _backends(case):
        fused = fusedlm.GPT(config, backend=backend).to(device=case.device, dtype=case.torch_dtype)
        fused.load_state_dict(ref.state_dict())
        tensors[f"model:fusedlm[{backend}]"] = fused
    for key, model in list(tensors.items()):
        tensors.update({f"{key}.{name}": p for name, p in model.named_parameters()})
    tensors["idx"] = torch.randint(0, config.vocab_size, (batch, seq), device=case.device)
    tensors["targets"] = torch.randint(0, config.vocab_size, (batch, seq), device=case.device)
    return Inputs(tensors, (torch.tensor(1.0, device=case.device),))


def min_bytes(case: Case, mode: str) -> int:
    return 0  # GEMM-bound: no meaningful traffic floor


def _step(key: str):
    return lambda t: t[key](t["idx"], t["targets"])[1]


def providers(case: Case) -> list:
    ready = _backends(case)
    out = []
    for backend in (case.device, "triton"):
        name = f"fusedlm[{backend}]"
        if backend in ready:
            out.append(Provider(name, _step(f"model:{name}"), "fusedlm"))
        elif backend == "triton" and case.device == "cpu":
            out.append(Provider(name, None, "fusedlm",
                                "Triton needs a GPU here; its CPU interpreter is a test tool, not a performance path"))
        else:
            why = (f"the extension fusedlm._C is not built ({dispatch._C_ERROR})" if dispatch._C is None
                   else "triton is not installed" if backend == "triton"
                   else f"fusedlm._C lacks a {backend} kernel of one of the model's ops")
            out.append(Provider(name, None, "fusedlm", why))
    out.append(Provider(baseline(case), _step("model:reference"), "peer"))
    out.append(Provider("compile(reference)", _step("model:reference"), "compile"))
    return out
