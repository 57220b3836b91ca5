"""Plain PyTorch implementations of every fusedlm op and of the GPT model.

The ground truth for the tests (run in float64) and the baseline for the benchmarks (run in
the benchmark's dtype). Written for clarity, never for speed: each function is the formula.
Signatures mirror the public ops of DESIGN.md without `backend`; input validation is the
public ops' job (python/fusedlm/ops/), not this module's.

Precision: statistics, scores, softmax and losses are computed in float32 (float64 when the
inputs are float64), whatever the input dtype; GEMMs run in the input dtype, as eager code does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
REDUCTIONS = ("mean", "sum", "none")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --- attention ----------------------------------------------------------------------------

def attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    r"""softmax(q k^T * scale + mask) v, with GQA and bottom-right aligned causal masking.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq % Hkv == 0. Query head h reads kv head
    h // (Hq // Hkv) (repeat_interleave of the kv heads). scale defaults to 1 / sqrt(D).

    causal: query i sees key j iff j <= i + (Nk - Nq), so the last query sees every key
    (KV-cache prefill and decode). For Nq = 3, Nk = 5 (x = visible):

        i=0  x x x . .
        i=1  x x x x .
        i=2  x x x x x

    With Nq > Nk the first Nq - Nk queries see no key: their output is 0 and their lse is
    -inf (never NaN, also in backward).

    Scores and softmax in float32 (float64 for float64 inputs); output in q's dtype.
    return_lse=True also returns lse = log(sum_j exp(s_ij)), (B, Hq, Nq) in that float type.
    """
    acc = _acc_dtype(q)
    n_q, n_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    k = k.repeat_interleave(group, dim=1).to(acc)
    v = v.repeat_interleave(group, dim=1).to(acc)
    s = torch.matmul(q.to(acc), k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    if causal:
        i = torch.arange(n_q, device=q.device).unsqueeze(1)
        j = torch.arange(n_k, device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i + (n_k - n_q), float("-inf"))

    # Row max as a stabiliser only: lse and the softmax do not depend on it, so it is detached.
    # Rows with no visible key have max -inf; shifting by 0 there keeps exp(-inf) = 0, not NaN.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    seen = denom > 0
    denom = torch.where(seen, denom, torch.ones_like(denom))  # 0 / 1 = 0 for unseen rows
    out = torch.matmul(e / denom, v).to(q.dtype)
    if not return_lse:
        return out
    # where(), not the -inf of log(0): its backward sends no gradient into unseen rows.
    lse = torch.where(seen, m + torch.log(denom), torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)


# --- norms and the feed-forward sub-block -------------------------------------------------

def layer_norm(x, weight, bias=None, *, eps=1e-5, norm="layernorm", residual=None):
    r"""LayerNorm / RMSNorm over the last dimension, optionally after a residual add.

    h = x (+ residual), rounded to x's dtype before the statistics are taken; then
        layernorm: y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias   (biased variance)
        rmsnorm:   y = h / sqrt(mean(h^2) + eps) * weight (+ bias)
    Statistics in float32 (float64 for float64 inputs); y in x's dtype.
    Returns y, or (y, h) when residual is given.
    """
    h = x + residual if residual is not None else x
    acc = _acc_dtype(x)
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


def activate(u, activation):
    r"""The feed-forward activation applied to fc's output u.

        gelu      x * Phi(x)                      (exact, erf)
        gelu_tanh 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        relu      max(x, 0)
        silu      x * sigmoid(x)
        swiglu    silu(a) * b     where u = [a | b] along the last dim, a = gate, b = up
        geglu     gelu(a) * b     exact-erf GELU, as in the GEGLU paper (Shazeer 2020);
                                  Gemma's tanh variant is not this activation
    Gated activations halve the last dimension: u (..., 2h) -> (..., h).
    """
    if activation == "gelu":
        return F.gelu(u)
    if activation == "gelu_tanh":
        return F.gelu(u, approximate="tanh")
    if activation == "relu":
        return F.relu(u)
    if activation == "silu":
        return F.silu(u)
    a, b = u.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(a) * b
    if activation == "geglu":
        return F.gelu(a) * b
    raise ValueError(f"activate: activation must be one of {ACTIVATIONS}, got {activation!r}")


def layernorm_mlp(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, *,
                  eps=1e-5, norm="layernorm", activation="gelu_tanh", residual=True):
    r"""The pre-norm feed-forward sub-block: y = x + proj(act(fc(norm(x)))) (no "x +" without residual).

    x: (..., d); norm_weight, norm_bias: (d,); fc_weight: (h, d), or (2h, d) for the gated
    activations (rows [0, h) the gate a, rows [h, 2h) the up projection b); fc_bias: (h,) or
    (2h,); proj_weight: (d, h); proj_bias: (d,); any bias may be None. The norm's statistics are
    float32 (see layer_norm); the GEMMs and the activation run in x's dtype.
    """
    hn = layer_norm(x, norm_weight, norm_bias, eps=eps, norm=norm)
    a = activate(F.linear(hn, fc_weight, fc_bias), activation)
    y = F.linear(a, proj_weight, proj_bias)
    return x + y if residual else y


# --- the softmax output: loss, probabilities, sampling ------------------------------------

def _logits(x, weight, bias, softcap=None):
    """x @ weight^T + bias in x's dtype, then upcast to float32 (float64 for float64) and soft-capped."""
    logits = F.linear(x, weight, bias).to(_acc_dtype(x))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def cross_entropy(logits, target, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, return_lse=False):
    r"""The loss half of linear_cross_entropy, on given logits (..., V) and target (...).

    Per token, with lse = log sum_v exp(logit_v) and eps = label_smoothing:

        loss = (1 - eps) (lse - logit_target) + eps (lse - mean_v logit_v) + z_loss * lse^2

    which is F.cross_entropy(..., label_smoothing=eps) plus the z-loss. Tokens whose target is
    ignore_index contribute 0. reduction "mean" divides by the number of non-ignored tokens
    (0 when every token is ignored, not NaN), "sum" adds, "none" returns target's shape.
    The loss is computed in float32 (float64 for float64 logits). return_lse also returns lse
    (target's shape, same float type), the real log-sum-exp of every row, ignored ones included.
    """
    logits = logits.to(_acc_dtype(logits))
    lse = torch.logsumexp(logits, dim=-1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    target_logit = logits.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    loss = lse - target_logit
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - logits.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse.pow(2)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "mean":
        loss = loss.sum() / valid.sum().clamp(min=1).to(loss.dtype)
    elif reduction == "sum":
        loss = loss.sum()
    return (loss, lse) if return_lse else loss


def linear_cross_entropy(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False):
    r"""Cross entropy of the vocabulary projection: cross_entropy(softcap(x @ weight^T + bias), target).

    x: (..., d); weight: (V, d); bias: (V,) or None; target: (...) int64.
    softcap: logits -> softcap * tanh(logits / softcap) before the softmax.
    The reference materialises the (..., V) logits (float32, or float64 for float64 inputs);
    the fused op never does. Loss and lse semantics: see cross_entropy.
    """
    return cross_entropy(_logits(x, weight, bias, softcap), target, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                         return_lse=return_lse)


def lm_head_softmax(x, weight, bias=None, *, temperature=1.0):
    r"""Next-token probabilities softmax((x @ weight^T + bias) / temperature), shape (..., V).

    float32 (float64 for float64 inputs); temperature must be > 0 here.
    """
    return torch.softmax(_logits(x, weight, bias) / temperature, dim=-1)


def sample(x, weight, bias=None, *, temperature=1.0, top_k=None, top_p=None, generator=None):
    r"""Draw one token id per row of x from the softmax of its logits; int64, shape x.shape[:-1].

    temperature == 0: greedy argmax of the logits (top_k and top_p do not matter).
    Otherwise, in this order (as Hugging Face's logits processors do):
      1. logits / temperature;
      2. top_k: keep the tokens whose logit is >= the k-th largest (ties with it are kept);
      3. top_p: of what is left, keep the smallest set of most probable tokens whose
         probabilities sum to >= top_p (the most probable token is always kept);
      4. one draw from the renormalised softmax with torch.multinomial(generator=generator).
    """
    logits = _logits(x, weight, bias)
    vocab = logits.shape[-1]
    logits = logits.reshape(-1, vocab)
    if temperature == 0:
        return logits.argmax(dim=-1).reshape(x.shape[:-1])

    logits = logits / temperature
    if top_k is not None and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs_sorted, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p.
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    ids = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return ids.reshape(x.shape[:-1])


# The model lives in its own file (python/fusedlm/model.py); its reference form is this module's API.
from fusedlm import model as _model  # noqa: E402
from fusedlm.model import GPTConfig, KVCache  # noqa: E402


class GPT(_model.GPT):
    """fusedlm.GPT with backend="reference": every layer on this module's ops, plain PyTorch; forward
    returns the logits also when it computes the loss. Same modules and parameter names."""

    BACKEND = "reference"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "activate", "attention", "cross_entropy", "layer_norm",
    "layernorm_mlp", "linear_cross_entropy", "lm_head_softmax", "sample",
]
