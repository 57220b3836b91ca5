"""Modules over fusedlm's ops, for building models or swapping into existing ones.

    LayerNorm(n_embd, bias=True, eps=1e-5, *, norm="layernorm")          fusedlm.layer_norm
    CausalSelfAttention(n_embd, n_head, bias=True, *, n_kv_head=None)     c_attn -> fusedlm.attention -> c_proj
    LayerNormMLP(n_embd, n_hidden=None, bias=True, *, activation=...)     fusedlm.layernorm_mlp
    LinearCrossEntropyLoss(ignore_index=-100, reduction="mean", ...)      fusedlm.linear_cross_entropy

Every module takes backend= ("auto", "cpu", "cuda", "triton", "reference"), passed to its op on every
call. LayerNorm and CausalSelfAttention are the GPT's own (python/fusedlm/model.py), as is the MLP
that LayerNormMLP extends with its norm. fusedlm.nn.functional.scaled_dot_product_attention has
torch's signature.
"""
from __future__ import annotations

import torch.nn as nn

from fusedlm import ops, reference
from fusedlm.model import MLP, CausalSelfAttention, LayerNorm, _check_backend
from fusedlm.nn import functional
from fusedlm.validation import check_choice

__all__ = ["CausalSelfAttention", "LayerNorm", "LayerNormMLP", "LinearCrossEntropyLoss", "functional"]


class LayerNormMLP(MLP):
    """The pre-norm feed-forward sub-block in one op: y = x + c_proj(act(c_fc(norm(x)))) (without
    "x +" when residual=False). Parameters: ln (weight, and bias for "layernorm" with bias=True), c_fc
    ((2 n_hidden, n_embd) for the gated activations "swiglu" and "geglu": gate rows first), c_proj.
    n_hidden defaults to 4 n_embd. recompute=True keeps only x for backward and recomputes the rest.
    """

    def __init__(self, n_embd: int, n_hidden: int | None = None, bias: bool = True, *, activation: str = "gelu_tanh",
                 norm: str = "layernorm", eps: float = 1e-5, residual: bool = True, recompute: bool = False,
                 backend: str = "auto"):
        super().__init__(n_embd, 4 * n_embd if n_hidden is None else n_hidden, bias, activation=activation,
                         recompute=recompute, backend=backend)
        self.ln = LayerNorm(n_embd, bias and norm == "layernorm", eps, norm=norm, backend=backend)
        self.residual = residual

    def forward(self, x):
        return super().forward(x, self.ln, residual=self.residual)


class LinearCrossEntropyLoss(nn.Module):
    """forward(x (..., d), weight (V, d), target (...) int64, bias=None) -> the cross-entropy of the
    logits x weight^T + bias, without forming them (fusedlm.linear_cross_entropy; its options here)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, *, backend: str = "auto"):
        super().__init__()
        check_choice("LinearCrossEntropyLoss", "reduction", reduction, reference.REDUCTIONS)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.softcap = label_smoothing, z_loss, softcap
        self.backend = _check_backend("LinearCrossEntropyLoss", backend)

    def forward(self, x, weight, target, bias=None):
        return ops.linear_cross_entropy(x, weight, target, bias, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing,
                                        z_loss=self.z_loss, softcap=self.softcap, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, backend={self.backend!r}")
