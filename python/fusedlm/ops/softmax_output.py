r"""The softmax output: the vocabulary projection with its softmax.

    linear_cross_entropy: loss = CE(softcap(x W^T + b), target) (+ z_loss * lse^2 per token)
    lm_head_softmax:      probs = softmax((x W^T + b) / temperature), float32
    sample:               ids ~ probs after top-k / top-p filtering (argmax when temperature == 0)

Backends: "reference" today; the fused kernels, which never hold an (N, V) logits tensor,
arrive with the softmax-output issue, and until then asking for "cpu", "cuda" or "triton"
is a BackendError.
"""
from __future__ import annotations

import torch

from fusedlm import dispatch, reference
from fusedlm.validation import check_choice, check_same, check_shape, check_tensor

REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int64, torch.int32)


def _check_projection(op, x, weight, bias):
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=2)
    check_same(op, "x", x, "weight", weight)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (V, {x.shape[-1]}) (d from x), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_same(op, "x", x, "bias", bias)
        check_shape(op, "bias", bias, (weight.shape[0],), " (V,)")


def linear_cross_entropy(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False, backend="auto"):
    """Cross-entropy of the projection x @ weight.T + bias against target, as
    F.cross_entropy(F.linear(x, weight, bias), target, ...) with optional softcap and z_loss."""
    op = "linear_cross_entropy"
    _check_projection(op, x, weight, bias)
    check_tensor(op, "target", target, dtypes=TARGET_DTYPES, allow_empty=x.numel() == 0)
    check_shape(op, "target", target, tuple(x.shape[:-1]), " (the leading dimensions of x)")
    if target.device != x.device:
        raise ValueError(f"{op}: target is on {target.device} but x is on {x.device}")
    check_choice(op, "reduction", reduction, REDUCTIONS)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be > 0 or None, got {softcap}")
    if target.device.type == "cpu":  # a free check on the host; GPU kernels guard their reads instead
        bad = (target != ignore_index) & ((target < 0) | (target >= weight.shape[0]))
        if bad.any():
            first = target[bad][0].item()
            raise ValueError(f"{op}: target holds {first}, outside [0, {weight.shape[0]}) and not ignore_index "
                             f"({ignore_index})")
    dispatch.resolve(op, backend, x.device, native_op=None, triton=False)
    return reference.linear_cross_entropy(x, weight, target.long(), bias, ignore_index=ignore_index,
                                          reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                          softcap=softcap, return_lse=return_lse)


def lm_head_softmax(x, weight, bias=None, *, temperature=1.0, backend="auto"):
    """Next-token probabilities softmax((x @ weight.T + bias) / temperature), (..., V) float32."""
    op = "lm_head_softmax"
    _check_projection(op, x, weight, bias)
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")
    dispatch.resolve(op, backend, x.device, native_op=None, triton=False)
    return reference.lm_head_softmax(x, weight, bias, temperature=temperature)


def sample(x, weight, bias=None, *, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Token ids (x.shape[:-1], int64) drawn from lm_head_softmax after top-k / top-p filtering;
    temperature=0 is greedy argmax. A seeded torch.Generator makes draws repeat."""
    op = "sample"
    _check_projection(op, x, weight, bias)
    if not temperature >= 0:
        raise ValueError(f"{op}: temperature must be >= 0, got {temperature}")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"{op}: top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{op}: top_p must be in (0, 1] or None, got {top_p}")
    return reference.sample(x, weight, bias, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
