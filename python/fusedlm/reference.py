"""Plain PyTorch implementations of every fusedlm op and of the GPT model.

The ground truth for the tests (run in float64) and the baseline for the benchmarks (run in
the benchmark's dtype). Written for clarity, never for speed: each function is the formula.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x, weight, bias=None, *, eps=1e-5, norm="layernorm", residual=None):
    """LayerNorm / RMSNorm over the last dimension, in x's dtype; statistics in float32 (or float64)."""
    h = x + residual if residual is not None else x
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    hf = h.to(acc)
    if norm == "layernorm":
        mean = hf.mean(-1, keepdim=True)
        var = (hf - mean).pow(2).mean(-1, keepdim=True)
        xhat = (hf - mean) * torch.rsqrt(var + eps)
    else:
        xhat = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = xhat * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    return (y, h) if residual is not None else y
