"""fusedlm.patch(model) / fusedlm.unpatch(model): the fused kernels in an existing model, in place.

    report = fusedlm.patch(model)      # what was swapped, by kind
    fusedlm.unpatch(model)             # everything back as it was

fusedlm.GPT / fusedlm.reference.GPT (python/fusedlm/model.py): every module's backend becomes "auto",
so the whole model runs fused: attention, layer_norm, layernorm_mlp (ln_2 + MLP + residual) and the
loss by linear_cross_entropy (the model then returns logits None with targets, as fusedlm.GPT does).

Hugging Face transformers models (attention: releases with PreTrainedModel.set_attn_implementation,
about 4.54 and later, which route attention through AttentionInterface):
  - attention, for the model types of HF_ATTENTION_MODELS (GPT-2 and the Llama family) running
    transformers' "sdpa" attention: the implementation becomes "fusedlm", registered once with
    AttentionInterface (and, for its masks, with sdpa's mask builder). `hf_attention` runs
    fusedlm.attention when no mask is needed (causal prefill without padding, decoding against the
    cache) and the tensors suit a kernel; otherwise (a padding mask, a sliding window, dropout in
    training, fp16 on the CPU, ...) transformers' own sdpa attention, unchanged. GQA heads are read
    without repeating k, v. Other model types keep their attention (some branch on the name "sdpa",
    some cannot run sdpa at all: attention sinks, logit softcapping); the report says so.
  - norms: torch.nn.LayerNorm modules, and the RMSNorm of Llama, Mistral and Qwen2 (weight * x / rms(x)),
    get a forward by fusedlm.layer_norm; a call the kernel cannot take (weight and x in different
    dtypes, no affine weight, ...) runs the module's previous forward (an instance forward that was
    there, e.g. an offloading hook, or the class's).
  Not fused in them: the MLP (layernorm_mlp fuses the norm, the MLP and the residual add, which
  live in the decoder layer's forward) and the loss (the model's forward forms the logits).

unpatch restores the attention implementation, the norms' previous forwards and the modules' backends.
A model, or a module of it, is patched once: patching again, or patching a part of a patched model
(or a model containing a patched part), is an error.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fusedlm import dispatch, model as gpt_model
from fusedlm.nn.functional import _kernel_takes
from fusedlm.ops import attention, layer_norm
from fusedlm.validation import FLOAT32_MAX, FLOAT32_TINY

ATTENTION_NAME = "fusedlm"
# transformers model types whose attention patch() swaps: their modeling code calls the attention
# interface with sdpa's arguments and never branches on the implementation's name.
HF_ATTENTION_MODELS = ("gpt2", "llama", "mistral", "qwen2")
# RMSNorm classes whose forward is weight * (x / sqrt(mean(x^2) + variance_epsilon)), computed in float32
# and rounded to x's dtype before the weight: fusedlm.layer_norm(norm="rmsnorm") up to that rounding.
# (Gemma's RMSNorm scales by 1 + weight: not this formula, so not listed.)
RMS_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_STATE = "_fusedlm_patch"


@dataclass
class PatchReport:
    """What patch() swapped: counts by kind, and notes on what it left alone."""
    kind: str                      # "fusedlm.GPT" or "transformers"
    attention: int = 0             # attention layers now on fusedlm.attention (where it applies)
    layer_norm: int = 0            # LayerNorm modules
    rms_norm: int = 0              # RMSNorm modules
    layernorm_mlp: int = 0         # norm + MLP + residual sub-blocks (fusedlm.GPT only)
    loss: bool = False             # linear_cross_entropy for the loss (fusedlm.GPT only)
    notes: list = field(default_factory=list)


# --- transformers' attention interface ------------------------------------------------------

def hf_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                 position_bias=None, **kwargs):
    """An attention function for transformers' AttentionInterface (sdpa's signature and result:
    query (B, Hq, Nq, D), key and value (B, Hkv, Nk, D) -> ((B, Nq, Hq, D), None)).

    fusedlm.attention where no mask is needed; transformers' sdpa_attention_forward otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    causal = causal and q_len > 1 and attention_mask is None
    plain = (attention_mask is None and position_bias is None and dropout == 0.0 and kwargs.get("s_aux") is None
             and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False))
    if plain:
        k, v = key, value
        if causal and key.shape[2] > q_len:
            # As transformers' sdpa does: a prefill into an empty static cache, whose slots past q_len
            # hold nothing yet (torch's causal mask is aligned top-left; fusedlm's bottom-right)
            k, v = key[:, :, :q_len], value[:, :, :q_len]
        if _kernel_takes(query, k, v, None, 0.0, causal, scaling, True):
            return attention(query, k, v, causal=causal, scale=scaling).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, position_bias=position_bias, **kwargs)


class _PatchState(dict):
    """What unpatch needs, kept on the patched model. Unpickling a patched transformers model (in another
    process too) registers the attention function again, which its config names."""

    def __reduce__(self):
        # pickle restores the items, then calls __setstate__ (with this placeholder state)
        return (_PatchState, (), True, None, iter(self.items()))

    def __setstate__(self, _):
        if "attn_implementation" in self:
            _register_hf_attention()


def _register_hf_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, hf_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


# --- norms ----------------------------------------------------------------------------------

def _norm_kernel_takes(x, weight, eps) -> bool:
    return (isinstance(weight, torch.Tensor) and weight.dtype == x.dtype and weight.device == x.device
            and x.dim() >= 1 and x.numel() > 0 and weight.shape == (x.shape[-1],)
            and FLOAT32_TINY <= eps <= FLOAT32_MAX
            and dispatch.resolve("layer_norm", "auto", x.device, native_op="layer_norm_fwd", triton=True,
                                 dtype=x.dtype) != "reference")


def _fallback(module, previous, x):
    return previous(x) if previous is not None else type(module).forward(module, x)


def _layer_norm_forward(module, previous, x):
    """nn.LayerNorm's forward by fusedlm.layer_norm (bound with functools.partial, which pickles)."""
    bias_ok = module.bias is None or (module.bias.dtype == x.dtype and module.bias.device == x.device)
    if bias_ok and len(module.normalized_shape) == 1 and _norm_kernel_takes(x, module.weight, module.eps):
        return layer_norm(x, module.weight, module.bias, eps=module.eps)
    return _fallback(module, previous, x)


def _rms_norm_forward(module, previous, x):
    if _norm_kernel_takes(x, module.weight, module.variance_epsilon):
        return layer_norm(x, module.weight, None, eps=module.variance_epsilon, norm="rmsnorm")
    return _fallback(module, previous, x)


_FUSED_FORWARDS = (_layer_norm_forward, _rms_norm_forward)


def _norm_forward(module):
    """The fused forward for this module, or None when it is no norm patch() knows."""
    if type(module) is nn.LayerNorm:
        return _layer_norm_forward, "layer_norm"
    if type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon"):
        return _rms_norm_forward, "rms_norm"
    return None, None


def _has_fused_forward(module) -> bool:
    forward = vars(module).get("forward")
    return isinstance(forward, functools.partial) and forward.func in _FUSED_FORWARDS


# --- patch / unpatch ------------------------------------------------------------------------

def _is_transformers_model(model) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def patch(model: nn.Module) -> PatchReport:
    """Swap fusedlm's kernels into `model` in place; returns what was swapped (see the module docstring).
    Raises TypeError for a model it does not know, ValueError when it is already patched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    if any(hasattr(m, _STATE) or _has_fused_forward(m) for m in model.modules()):
        raise ValueError("patch: this model, or a module of it, is already patched; call fusedlm.unpatch on "
                         "what was patched first")
    if isinstance(model, gpt_model.GPT):
        return _patch_gpt(model)
    if _is_transformers_model(model):
        return _patch_transformers(model)
    raise TypeError(f"patch: {type(model).__name__} is neither a fusedlm GPT nor a transformers PreTrainedModel")


def _patch_gpt(model) -> PatchReport:
    previous = {m: m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), str)}
    for m in previous:
        m.backend = "auto"
    blocks = len(model.transformer.h)
    object.__setattr__(model, _STATE, _PatchState(backends=previous))
    return PatchReport("fusedlm.GPT", attention=blocks, layer_norm=blocks + 1, layernorm_mlp=blocks, loss=True)


def _patch_transformers(model) -> PatchReport:
    report = PatchReport("transformers")
    state = _PatchState(norms=[])
    config = model.config
    model_type = getattr(config, "model_type", None)
    current = getattr(config, "_attn_implementation", None)
    if not hasattr(model, "set_attn_implementation"):
        report.notes.append("attention not patched: this transformers release has no set_attn_implementation "
                            "(about 4.54 and later have it)")
    elif model_type not in HF_ATTENTION_MODELS:
        report.notes.append(f"attention not patched: model type {model_type!r} is not one of {HF_ATTENTION_MODELS}")
    elif current != "sdpa":
        report.notes.append(f"attention not patched: the model runs {current!r} attention, not 'sdpa'"
                            + (" (its config is shared with a patched model)" if current == ATTENTION_NAME else ""))
    else:
        _register_hf_attention()
        state["attn_implementation"] = current
        model.set_attn_implementation(ATTENTION_NAME)
        report.attention = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    for m in model.modules():
        forward, kind = _norm_forward(m)
        if forward is not None:
            previous = vars(m).get("forward")  # an instance forward already there (a hook), or None
            m.forward = functools.partial(forward, m, previous)
            state["norms"].append((m, previous))
            setattr(report, kind, getattr(report, kind) + 1)
    report.notes.append("not fused: the MLP (its norm and residual add live in the decoder layer) and the loss "
                        "(the model's forward forms the logits)")
    object.__setattr__(model, _STATE, state)
    return report


def unpatch(model: nn.Module) -> None:
    """Undo patch(model). Raises ValueError when the model is not patched."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("unpatch: this model is not patched")
    for m, backend in state.get("backends", {}).items():
        m.backend = backend
    for m, previous in state.get("norms", ()):
        if previous is None:
            del m.forward  # the instance attribute; the class's forward shows again
        else:
            m.forward = previous
    if "attn_implementation" in state:
        model.set_attn_implementation(state["attn_implementation"])
    object.__delattr__(model, _STATE)
