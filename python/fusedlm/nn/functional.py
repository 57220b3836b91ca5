"""Functional forms with torch's signatures, computed by fusedlm's kernels where they apply."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedlm import dispatch
from fusedlm.ops.attention import MAX_HEAD_DIM, MAX_SCALE, MIN_TRITON_HEAD_DIM, OP, attention
from fusedlm.validation import FLOAT32_TINY


def _kernel_takes(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether fusedlm.attention (backend "auto") computes SDPA's result for these arguments with a kernel."""
    if attn_mask is not None or dropout_p != 0.0:
        return False
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.numel() > 0 for t in tensors):
        return False
    if any(t.device != query.device or t.dtype != query.dtype for t in tensors):
        return False
    (b, hq, nq, d), (bk, hkv, nk, dk) = query.shape, key.shape
    if value.shape != key.shape or bk != b or dk != d or d > MAX_HEAD_DIM or hq % hkv != 0:
        return False
    if hq != hkv and not enable_gqa:  # torch raises there; let it
        return False
    if is_causal and nq != nk:  # torch's causal mask is aligned top-left, fusedlm's bottom-right
        return False
    if scale is not None and not (isinstance(scale, (int, float)) and FLOAT32_TINY <= scale <= MAX_SCALE):
        return False
    chosen = dispatch.resolve(OP, "auto", query.device, native_op="attention_fwd", triton=True,
                              dtype=query.dtype)
    if chosen == "triton":
        return d % 8 == 0 and d >= MIN_TRITON_HEAD_DIM
    return chosen != "reference"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, computed by fusedlm.attention when it applies:

    - no attn_mask and dropout_p == 0;
    - query, key, value 4-D (B, H, N, D), non-empty, on one device in one dtype that a kernel takes
      there (CPU: float32, bfloat16; GPU: float32, bfloat16, float16), value of key's shape, D <= 256;
    - Hq == Hkv, or enable_gqa=True with Hq % Hkv == 0 (grouped-query attention without repeating k, v);
    - is_causal only with Nq == Nk: torch aligns the causal mask top-left (query i sees keys j <= i),
      fusedlm bottom-right (j <= i + Nk - Nq); the two agree when Nq == Nk;
    - scale None or a positive number in float32's normal range whose product with log2(e) fits float32.

    Anything else goes to torch's function unchanged, errors included, so this is a drop-in
    replacement (e.g. `torch.nn.functional.scaled_dot_product_attention = this` in a model's module).
    """
    if _kernel_takes(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return attention(query, key, value, causal=bool(is_causal), scale=scale)
    kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}  # torch < 2.5 has no enable_gqa
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, **kwargs)
