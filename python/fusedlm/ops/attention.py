r"""fusedlm.attention: softmax(q k^T * scale + mask) v over heads, without the N x N matrix.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); Hq % Hkv == 0 (query head h reads kv head h // (Hq / Hkv)).
    causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned, as in KV-cache decode).
    A query row that sees no key returns zeros and lse = -inf.

The kernel op schema (kernels/attention.py implements it; C++ kernels will implement the same):

    fusedlm::attention_fwd_triton(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)
        q, k, v may be strided (the head dim dense); out (B, Hq, Nq, D) contiguous in q's dtype;
        lse (B, Hq, Nq) float32, natural log, -inf for a row that sees no key.
    fusedlm::attention_bwd_triton(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                  Tensor? dlse, bool causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)
        dlse: the gradient reaching lse (return_lse=True), or None; dk, dv are summed over the query
        heads of each GQA group, deterministically; all three contiguous.

Backends: "triton" (FlashAttention-2, kernels/attention.py) and "reference". The C++ CPU and CUDA
kernels are not in yet: asking for "cpu" or "cuda" is a BackendError, never a silent fallback.
"""
from __future__ import annotations

import math

import torch

from fusedlm import dispatch, reference
from fusedlm.validation import check_same, check_tensor, fmt_shape

OP = "attention"
MAX_HEAD_DIM = 256
MIN_KERNEL_HEAD_DIM = 16  # the smallest tl.dot tile


# --- Triton custom ops --------------------------------------------------------------------

@torch.library.custom_op("fusedlm::attention_fwd_triton", mutates_args=())
def _fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import attention as kernels

    return kernels.attention_fwd(q, k, v, causal, scale)


@torch.library.custom_op("fusedlm::attention_bwd_triton", mutates_args=())
def _bwd_triton(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import attention as kernels

    return kernels.attention_bwd(dout, q, k, v, out, lse, dlse, causal, scale)


@torch.library.register_fake("fusedlm::attention_fwd_triton")
def _fwd_fake(q, k, v, causal, scale):
    b, hq, n_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, n_q), dtype=torch.float32)


@torch.library.register_fake("fusedlm::attention_bwd_triton")
def _bwd_fake(dout, q, k, v, out, lse, dlse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_triton(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("fusedlm::attention_fwd_triton", _backward, setup_context=_setup_context)


# --- the public function -------------------------------------------------------------------


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """Scaled dot-product attention; returns (B, Hq, Nq, D) in q's dtype, and with
    return_lse=True also the log-sum-exp of the scaled scores, (B, Hq, Nq) float32.

    backend="triton" takes float32, bfloat16 and float16 with head dims 16..256 that are multiples of 8,
    and raises BackendError for anything else; "auto" gives such inputs (float64, D = 12) to the reference."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t)
        if t.dim() != 4:
            raise ValueError(f"{OP}: {name} must be 4-D (B, H, N, D), got shape {fmt_shape(t.shape)}")
    check_same(OP, "q", q, "k", k)
    check_same(OP, "q", q, "v", v)
    (b, hq, _, d), (bk, hkv, _, dk) = q.shape, k.shape
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
    chosen = dispatch.resolve(OP, backend, q.device, native_op=None, triton=True, dtype=q.dtype)
    kernel_takes = d % 8 == 0 and d >= MIN_KERNEL_HEAD_DIM
    if chosen == "reference" or (backend == "auto" and not kernel_takes):  # auto: D = 12, ... too
        return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    if not kernel_takes:
        raise dispatch.BackendError(f"{OP}: backend={chosen!r} cannot run these inputs: it takes head dims "
                                    f"{MIN_KERNEL_HEAD_DIM}..{MAX_HEAD_DIM} that are multiples of 8, got {d}")
    out, lse = _fwd_triton(q, k, v, bool(causal), float(1.0 / math.sqrt(d) if scale is None else scale))
    return (out, lse) if return_lse else out
