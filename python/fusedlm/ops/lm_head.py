r"""Generation from the language-model head: next-token probabilities and sampling.

    lm_head_softmax:  probs = softmax((x W^T + b) / T), float32, (..., V)
    sample:           ids ~ probs after top-k / top-p filtering; argmax of the logits when T == 0

Forward, per token with logits z = x W^T + b (V of them), in float32 whatever x's dtype:

    u = z / T,   m = max_v u_v,   p_v = exp(u_v - m) / sum_w exp(u_w - m)

(the max subtracted, so no exp overflows for any logit or temperature). Backward, for a user who
calls it while training, with g = dL/dp the upstream gradient of a token's probabilities:

    dz = p * (g - sum_v g_v p_v) / T,   dx = dz W,   dW = dz^T x,   db = sum_tokens dz

computed with ATen from the saved x, W and p (the output: nothing extra is kept); dW and db in
float32, cast to W's dtype. The forward is the fused part (the row pass reads each logit twice
and writes each probability once more than the GEMM); the backward is three GEMMs either way.

The C++ op schema (csrc/torch/lm_head*.cpp; the Triton op `lm_head_softmax_triton` has the same):

    lm_head_softmax(x, weight, bias?, temperature) -> probs
        x: (N, d) contiguous float32 / bfloat16 (float16 too on CUDA and Triton); weight: (V, d) and
        bias: (V,) of x's dtype; temperature >= MIN_TEMPERATURE (4.2e-39: log2(e)/T finite in float32). probs: (N, V) float32.

CPU: the GEMM through ATen (MKL/oneDNN), straight into probs for float32, per token chunk into a
bf16 buffer for bf16 (the logits rounded as F.linear rounds them); then one OpenMP / AVX-512 row
pass (csrc/cpu/lm_head.cpp) that scales by 1 / T, takes the max and writes the normalised
probabilities. CUDA: the same with cuBLAS and a block per row (csrc/cuda/lm_head.cu). Triton:
kernels/lm_head.py, the GEMM tiles with the bias, temperature and per-tile max / sum in their
epilogue, then a normalising pass.

sample's filtering (top-k, then top-p on what top-k left, then a draw from the renormalised rest)
follows fusedlm.reference.sample, applied to the probabilities instead of the logits: top-k keeps
the tokens whose probability is >= the k-th largest, which are the reference's tokens except where
two different logits round to one float32 probability (both are kept). Its draws come from
torch.multinomial with the given generator, so a seeded generator repeats them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedlm import dispatch, reference
from fusedlm.ops import autograd
from fusedlm.ops.softmax_output import _check_projection
from fusedlm.validation import check_number

OP = "lm_head_softmax"


# --- Triton custom op ---------------------------------------------------------------------------

@torch.library.custom_op("fusedlm::lm_head_softmax_triton", mutates_args=())
def _fwd_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    from fusedlm.kernels import lm_head as kernels

    return kernels.lm_head_softmax(x, weight, bias, temperature)


# --- fake (meta) implementation and autograd, shared by the C++ and Triton ops ---------------------

def _fake(x, weight, bias, temperature):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, temperature = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.has_bias = bias is not None
    ctx.temperature = temperature


def _backward(ctx, dprobs):
    x, weight, probs = ctx.saved_tensors
    g = dprobs.float()
    dz = probs * (g - (g * probs).sum(-1, keepdim=True)) / ctx.temperature  # (N, V) float32
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = (dz.to(x.dtype) @ weight) if need_x else None  # in x's dtype, as autograd of F.linear gives it
    dweight = (dz.t() @ x.float()).to(weight.dtype) if need_w else None
    dbias = dz.sum(0).to(weight.dtype) if ctx.has_bias and need_b else None
    return dx, dweight, dbias, None


# backend -> the op with its autograd (fusedlm.ops.autograd); "cpu" and "cuda" share the C++ op
# that carries both kernels.
_FWD = {}
torch.library.register_fake("fusedlm::lm_head_softmax_triton")(_fake)
_FWD["triton"] = autograd.register(_fwd_triton, _backward, _setup_context)
if dispatch.has_cpp_kernel("lm_head_softmax", "CPU") or dispatch.has_cpp_kernel("lm_head_softmax", "CUDA"):
    torch.library.register_fake("fusedlm::lm_head_softmax")(_fake)
    native = autograd.register(torch.ops.fusedlm.lm_head_softmax.default, _backward, _setup_context)
    _FWD.update(cpu=native, cuda=native)


# --- the public functions --------------------------------------------------------------------

# The smallest temperature: the kernels scale logit differences by log2(e) / T (the base-2
# exponent), which must be finite in float32.
MIN_TEMPERATURE = 1.4426950408889634 / torch.finfo(torch.float32).max


def _check_temperature(op, temperature, *, greedy):
    check_number(op, "temperature", temperature)
    if (temperature == 0 and greedy) or temperature >= MIN_TEMPERATURE:
        return
    least = "0 (greedy) or >= " if greedy else ">= "
    raise ValueError(f"{op}: temperature must be {least}{MIN_TEMPERATURE:.3g} (log2(e) / temperature must be "
                     f"finite in float32), got {temperature!r}")


def lm_head_softmax(x, weight, bias=None, *, temperature=1.0, backend="auto"):
    """Next-token probabilities softmax((x @ weight.T + bias) / temperature) in one fused pass.

    Args:
        x: (..., d) float32, bfloat16 or float16 (float16: cuda / triton; float64: reference).
        weight: (V, d), bias: (V,) or None, both of x's dtype.
        temperature: >= MIN_TEMPERATURE (about 4.2e-39, so that log2(e)/T is finite in float32); the logits are divided by it before the softmax.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see fusedlm.dispatch).

    Returns (..., V) float32 probabilities (float64 on the reference backend for float64 inputs),
    differentiable with respect to x, weight and bias.
    """
    _check_projection(OP, x, weight, bias)
    _check_temperature(OP, temperature, greedy=False)
    chosen = dispatch.resolve(OP, backend, x.device, native_op="lm_head_softmax", triton=True, dtype=x.dtype)
    if chosen == "reference":
        return reference.lm_head_softmax(x, weight, bias, temperature=temperature)
    d, vocab = x.shape[-1], weight.shape[0]
    probs = _FWD[chosen](x.reshape(-1, d).contiguous(), weight.contiguous(),
                         bias.contiguous() if bias is not None else None, float(temperature))
    return probs.view(*x.shape[:-1], vocab)


def _check_generator(op, generator, device):
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen = generator.device
    if gen.type != device.type or (gen.index is not None and device.index is not None and gen.index != device.index):
        raise ValueError(f"{op}: generator is on {gen} but x is on {device}")


def filter_top_k_top_p(probs, top_k=None, top_p=None):
    """(rows, V) probabilities with the tokens outside top-k, then outside top-p of what is left,
    set to 0, renormalised to sum 1 per row (fusedlm.reference.sample's rules, on probabilities)."""
    vocab = probs.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(probs, int(top_k), dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p is not None and top_p < 1.0:
        kept = probs / probs.sum(-1, keepdim=True)  # the softmax of what top-k left
        sorted_probs, order = torch.sort(kept, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first is always kept).
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop_sorted[:, 0] = False
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(x, weight, bias=None, *, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Token ids (x.shape[:-1], int64): one draw per token of x from lm_head_softmax (backend "auto")
    after top-k / top-p filtering; temperature=0 is the greedy argmax of the logits (the lowest index
    among ties), where top_k and top_p do not matter. A seeded torch.Generator makes draws repeat.

    Args: as lm_head_softmax, plus top_k: None or an integer >= 1; top_p: None or in (0, 1];
    generator: None or a torch.Generator on x's device. temperature: 0 (greedy) or >= MIN_TEMPERATURE.
    A row of NaN probabilities (NaN or +inf logits, from NaN or inf in x, weight or bias; with
    temperature=0, a NaN logit): a ValueError for CPU tensors; on a GPU that row's id is -1 (raising
    would cost a host sync per draw, and torch.multinomial's device-side check, in recent torch, ends
    the process's CUDA context). Replace or check -1 before the ids index anything (an embedding
    lookup of -1 asserts on a GPU too), e.g. torch.where(ids < 0, pad_id, ids). A -inf bias entry (a
    masked token) is fine: its probability is 0.
    """
    op = "sample"
    _check_projection(op, x, weight, bias)
    _check_temperature(op, temperature, greedy=True)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{op}: top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{op}: top_p must be in (0, 1] or None, got {top_p!r}")
    _check_generator(op, generator, x.device)
    with torch.no_grad():  # token ids carry no gradient
        if temperature == 0:  # greedy; a row with a NaN logit has no argmax: the error, or -1 on a GPU
            logits = F.linear(x, weight, bias)
            ids = logits.argmax(dim=-1)
            nan_rows = torch.isnan(logits).any(-1)
            if logits.device.type == "cpu":
                if bool(nan_rows.any()):
                    raise ValueError(f"{op}: the logits of some row are NaN: x, weight or bias holds NaN or inf")
                return ids
            return torch.where(nan_rows, torch.full_like(ids, -1), ids)
        probs = lm_head_softmax(x, weight, bias, temperature=temperature)
        probs = filter_top_k_top_p(probs.reshape(-1, weight.shape[0]), top_k, top_p)
        # NaN or inf in x, weight or bias make a row NaN. On the CPU (synchronous anyway) that is this
        # error; on a GPU it is id -1 for the row, without a host sync.
        if probs.device.type == "cpu":
            if not bool(torch.isfinite(probs).all()):
                raise ValueError(f"{op}: the probabilities of some row are NaN: x, weight or bias holds NaN or inf")
            ids = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
        else:
            ids = draw_or_minus_one(probs, generator)
    return ids.reshape(x.shape[:-1])


def draw_or_minus_one(probs, generator=None):
    """One draw per row of (rows, V) non-negative weights, without a host sync and without a check that
    can stop the process: argmax_v p_v / q_v with q_v ~ Exp(1) picks v with probability p_v / sum p
    (the exponential race; torch.multinomial draws one sample the same way, so a seeded generator gives
    its ids). A row that is no distribution (NaN, inf, a negative entry, or all zeros) gives -1."""
    valid = torch.isfinite(probs).all(-1) & (probs >= 0).all(-1) & (probs.sum(-1) > 0)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    ids = (probs / q).argmax(-1)
    return torch.where(valid, ids, torch.full_like(ids, -1))
