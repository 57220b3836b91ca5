r"""fusedlm.attention: softmax(q k^T * scale + mask) v over heads, without the N x N matrix.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); Hq % Hkv == 0 (query head h reads kv head h // (Hq / Hkv)).
    causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned, as in KV-cache decode).
    A query row that sees no key returns zeros and lse = -inf.

Forward (FlashAttention-2, every kernel backend), per block of queries over blocks of keys, in float32:

    s = q k^T * scale;  m' = max(m, rowmax s);  p = exp(s - m');  l = l e^(m - m') + rowsum p
    acc = acc e^(m - m') + p v;  out = acc / l;  lse = m + log l
Backward, with P recomputed from lse and dlse the gradient reaching lse (return_lse=True):

    delta = rowsum(dO * O) - dlse;  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - delta)
    dK = scale dS^T Q;  dQ = scale dS K

The kernel op schema, one for the C++ ops (fusedlm::attention_fwd / attention_bwd: the CPU kernels of
csrc/cpu/attention.cpp and the CUDA kernels of csrc/cuda) and one for the Triton launchers
(fusedlm::attention_fwd_triton / attention_bwd_triton, kernels/attention.py):

    attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)
        q, k, v may be strided (the head dim dense); out (B, Hq, Nq, D) contiguous in q's dtype;
        lse (B, Hq, Nq) float32, natural log, -inf for a row that sees no key.
    attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse,
                  bool causal, float scale) -> (Tensor dq, Tensor dk, Tensor dv)
        dlse: the gradient reaching lse, or None; dk, dv are summed over the query heads of each
        GQA group, deterministically (same bits on every run); all three contiguous.

Memory: O(N) beyond the inputs and outputs (lse, and per-thread tiles on the CPU); the backward saves
q, k, v, out and lse. Traffic: forward reads q once and K, V once per query block (halved by causal
block skipping), writes out and lse.

Backends: "cpu" (float32 / bfloat16, any head dim 1..256; AVX-512 tile kernels with a portable
fallback, FUSEDLM_CPU_ISA=scalar forces it; bf16 with an even head dim on an avx512_bf16 CPU runs its
GEMMs as bf16 dot products, rounding P and dS to bf16 for them as FlashAttention does; FUSEDLM_CPU_BF16=0
takes fp32 copies instead, what AVX-512 CPUs without avx512_bf16 run), "cuda" (CUDA tensors, head dims 64, 80, 96, 128; mma.sync
tensor-core kernels for fp16/bf16, CUDA cores for fp32), "triton" (head dims 16..256 that are multiples
of 8) and "reference". "auto" takes "cpu" for CPU tensors and "triton" for CUDA tensors (both passed their
tests on an H200, benchmarks/RESULTS.md), and the reference for what its kernel cannot take.
"""
from __future__ import annotations

import math

import torch

from fusedlm import dispatch, reference
from fusedlm.ops import autograd
from fusedlm.validation import FLOAT32_MAX, check_flag, check_number, check_same, check_tensor, fmt_shape

OP = "attention"
MAX_HEAD_DIM = 256
CUDA_HEAD_DIMS = (64, 80, 96, 128)  # the head dims csrc/cuda/attention_*.cu specialise
MIN_TRITON_HEAD_DIM = 16  # the smallest tl.dot tile (the C++ CPU kernel takes any head dim)
# The kernels' base-2 exponent, scale * log2(e), is a float32: the largest scale it holds.
MAX_SCALE = FLOAT32_MAX / math.log2(math.e)


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


# --- fake (meta) implementations and autograd, shared by the C++ and Triton ops -------------

def _fwd_fake(q, k, v, causal, scale):
    b, hq, n_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, n_q), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, dlse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _make_backward(bwd_op):
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    return backward


# backend -> the forward op with its autograd (fusedlm.ops.autograd); "cpu" and "cuda" share the C++
# op that carries both kernels.
_FWD = {}
torch.library.register_fake("fusedlm::attention_fwd_triton")(_fwd_fake)
torch.library.register_fake("fusedlm::attention_bwd_triton")(_bwd_fake)
_FWD["triton"] = autograd.register(_fwd_triton, _make_backward(_bwd_triton), _setup_context)
if dispatch.has_cpp_kernel("attention_fwd", "CPU") or dispatch.has_cpp_kernel("attention_fwd", "CUDA"):
    torch.library.register_fake("fusedlm::attention_fwd")(_fwd_fake)
    torch.library.register_fake("fusedlm::attention_bwd")(_bwd_fake)
    native = autograd.register(torch.ops.fusedlm.attention_fwd.default,
                               _make_backward(torch.ops.fusedlm.attention_bwd.default), _setup_context)
    _FWD.update(cpu=native, cuda=native)


# --- the public function -------------------------------------------------------------------


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend="auto"):
    """Scaled dot-product attention; returns (B, Hq, Nq, D) in q's dtype, and with
    return_lse=True also the log-sum-exp of the scaled scores, (B, Hq, Nq) float32.

    backend="cpu" takes float32 and bfloat16 with any head dim up to 256; "triton" takes float32, bfloat16
    and float16 with head dims 16..256 that are multiples of 8; "cuda" float32, bfloat16 and float16
    with head dims 64, 80, 96 and 128; each raises BackendError for anything
    else. "auto" gives what its kernel does not take (float64, fp16 on the CPU) to the reference."""
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
    check_flag(OP, "causal", causal)
    check_flag(OP, "return_lse", return_lse)
    if scale is not None:
        check_number(OP, "scale", scale, float32=True)
        if not scale > 0:
            raise ValueError(f"{OP}: scale must be > 0 or None, got {scale}")
        if scale > MAX_SCALE:
            raise ValueError(f"{OP}: scale * log2(e) must fit in float32 (at most {MAX_SCALE:.4g}), got {scale}")
    chosen = dispatch.resolve(OP, backend, q.device, native_op="attention_fwd", triton=True, dtype=q.dtype)
    if chosen == "reference":
        return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
    if chosen == "triton" and not (d % 8 == 0 and d >= MIN_TRITON_HEAD_DIM):
        if backend == "auto":  # e.g. D = 12 on a GPU
            return reference.attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse)
        raise dispatch.BackendError(f"{OP}: backend='triton' cannot run these inputs: it takes head dims "
                                    f"{MIN_TRITON_HEAD_DIM}..{MAX_HEAD_DIM} that are multiples of 8, got {d}")
    if chosen == "cuda" and d not in CUDA_HEAD_DIMS:
        raise dispatch.BackendError(f"{OP}: backend='cuda' cannot run these inputs: it takes head dims "
                                    f"{', '.join(map(str, CUDA_HEAD_DIMS))}, got {d} (backend='triton' covers it)")
    out, lse = _FWD[chosen](q, k, v, bool(causal), float(1.0 / math.sqrt(d) if scale is None else scale))
    return (out, lse) if return_lse else out
