r"""fusedlm.attention: softmax(q k^T * scale + mask) v over heads, without the N x N matrix.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); Hq % Hkv == 0 (query head h reads kv head h // (Hq / Hkv)).
    causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned, as in KV-cache decode).
    A query row that sees no key returns zeros and lse = -inf.

Backends: "reference" today; the fused kernels arrive with the attention issue, and until then
asking for "cpu", "cuda" or "triton" is a BackendError, never a silent fallback.
"""
from __future__ import annotations

import torch

from fusedlm import dispatch, reference
from fusedlm.validation import check_same, check_tensor, fmt_shape

OP = "attention"
MAX_HEAD_DIM = 256


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """Scaled dot-product attention; returns (B, Hq, Nq, D) in q's dtype, and with
    return_lse=True also the log-sum-exp of the scaled scores, (B, Hq, Nq) float32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D (B, H, N, D), got shape {fmt_shape(t.shape)}")
    check_same(OP, "q", q, "k", k)
    check_same(OP, "q", q, "v", v)
    (b, hq, _, d), (bk, hkv, nk, dk) = q.shape, k.shape
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have the same shape, got {fmt_shape(k.shape)} and {fmt_shape(v.shape)}")
    if bk != b:
        raise ValueError(f"{OP}: k must have q's batch size {b}, got {bk}")
    if dk != d:
        raise ValueError(f"{OP}: k must have q's head dim {d}, got {dk}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim must be <= {MAX_HEAD_DIM}, got {d}")
    if hq % hkv != 0:
        raise ValueError(f"{OP}: q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if scale is not None and not scale > 0:
        raise ValueError(f"{OP}: scale must be > 0 or None, got {scale}")
    dispatch.resolve(OP, backend, q.device, native_op=None, triton=False)
    return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
