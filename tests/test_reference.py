"""The reference ops against naive float64 formulas written another way (loops, explicit masks),
and their gradients against finite differences (torch.autograd.gradcheck)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fusedlm import reference as ref

F64 = torch.float64


def rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=F64) * scale


def assert_close(a, b, tol=1e-10):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a, b, rtol=tol, atol=tol, equal_nan=False), f"max err {(a - b).abs().max():.3e}"


# --- attention ------------------------------------------------------------------------------

def naive_attention(q, k, v, causal, scale):
    """Row by row: an explicit visibility list per query, kv head by integer division."""
    b_, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.zeros(b_, hq, nq, v.shape[-1], dtype=F64)
    lse = torch.full((b_, hq, nq), float("-inf"), dtype=F64)
    for b in range(b_):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(nq):
                visible = [j for j in range(nk) if not causal or j - (nk - nq) <= i]
                if not visible:
                    continue
                s = torch.stack([(q[b, h, i] * k[b, kh, j]).sum() * scale for j in visible])
                m = s.max()
                w = torch.exp(s - m)
                out[b, h, i] = sum(w[n] * v[b, kh, j] for n, j in enumerate(visible)) / w.sum()
                lse[b, h, i] = m + torch.log(w.sum())
    return out, lse


ATTN_SHAPES = [  # B, Hq, Hkv, Nq, Nk, D
    (1, 1, 1, 1, 1, 1),
    (2, 4, 2, 17, 37, 16),   # Nq < Nk (prefill after a cache), GQA 2
    (1, 3, 1, 23, 7, 8),     # Nq > Nk: causal rows 0..15 see no key; MQA
    (2, 2, 2, 19, 19, 5),
    (1, 6, 3, 1, 97, 4),     # decode: one query against a long cache
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_naive(shape, causal):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = rand(b, hq, nq, d), rand(b, hkv, nk, d), rand(b, hkv, nk, d)
    scale = 0.7 if d == 5 else None
    out, lse = ref.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    want_out, want_lse = naive_attention(q, k, v, causal, 1 / math.sqrt(d) if scale is None else scale)
    assert out.dtype == F64 and lse.dtype == F64 and lse.shape == (b, hq, nq)
    assert_close(out, want_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert_close(lse[finite], want_lse[finite])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(ref.attention(q, k, v, causal=causal, scale=scale), out)


def test_attention_fully_masked_rows_are_zero_and_grads_finite():
    q = rand(1, 2, 9, 4, scale=3).requires_grad_()
    k = rand(1, 1, 4, 4).requires_grad_()
    v = rand(1, 1, 4, 4).requires_grad_()
    out, lse = ref.attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5]))


def test_attention_low_precision_dtypes():
    q, k, v = rand(2, 4, 33, 16), rand(2, 2, 33, 16), rand(2, 2, 33, 16)
    want = ref.attention(q, k, v, causal=True)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out, lse = ref.attention(q.to(dt), k.to(dt), v.to(dt), causal=True, return_lse=True)
        assert out.dtype == dt and lse.dtype == torch.float32
        assert (out.double() - want).abs().max() < tol


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(5, 5), (3, 7), (7, 3)])
def test_attention_gradcheck(nq, nk, causal):
    q = rand(1, 4, nq, 3).requires_grad_()
    k = rand(1, 2, nk, 3).requires_grad_()
    v = rand(1, 2, nk, 3).requires_grad_()
    masked_rows = causal and nq > nk  # lse = -inf there, which finite differences cannot handle
    if masked_rows:
        fn = lambda q, k, v: ref.attention(q, k, v, causal=causal, scale=0.8)  # noqa: E731
    else:
        fn = lambda q, k, v: ref.attention(q, k, v, causal=causal, scale=0.8, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


# --- layer_norm and layernorm_mlp ---------------------------------------------------------

def naive_norm(x, weight, bias, eps, norm):
    """Row by row, with the variance as E[x^2] - E[x]^2 (fine in float64)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        s1, s2 = rows[r].sum() / n, (rows[r] * rows[r]).sum() / n
        if norm == "layernorm":
            out[r] = (rows[r] - s1) / torch.sqrt(s2 - s1 * s1 + eps)
        else:
            out[r] = rows[r] / torch.sqrt(s2 + eps)
        out[r] = out[r] * weight + (bias if bias is not None else 0.0)
    return out.reshape(x.shape)


@pytest.mark.parametrize("norm", ref.NORMS)
@pytest.mark.parametrize("use_residual", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (17, 97), (2, 3, 123)], ids=str)
def test_layer_norm_matches_naive(shape, use_bias, use_residual, norm):
    x = rand(*shape, scale=2) + 0.5
    weight, bias = rand(shape[-1]), rand(shape[-1]) if use_bias else None
    residual = rand(*shape) if use_residual else None
    got = ref.layer_norm(x, weight, bias, eps=1e-5, norm=norm, residual=residual)
    h = x + residual if use_residual else x
    want = naive_norm(h, weight, bias, 1e-5, norm)
    if use_residual:
        assert_close(got[1], h, tol=0)
        got = got[0]
    assert_close(got, want)


def test_layer_norm_low_precision_dtype():
    x, w, b = rand(17, 97), rand(97), rand(97)
    want = naive_norm(x, w, b, 1e-5, "layernorm")
    y = ref.layer_norm(x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert (y.double() - want).abs().max() < 0.1


@pytest.mark.parametrize("norm", ref.NORMS)
@pytest.mark.parametrize("use_residual", [False, True])
def test_layer_norm_gradcheck(norm, use_residual):
    x, w, b = rand(4, 7).requires_grad_(), rand(7).requires_grad_(), rand(7).requires_grad_()
    res = rand(4, 7).requires_grad_()
    if use_residual:
        fn = lambda x, w, b, r: ref.layer_norm(x, w, b, norm=norm, residual=r)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b, res))
    else:
        fn = lambda x, w, b: ref.layer_norm(x, w, b, norm=norm)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b))


NAIVE_ACT = {
    "gelu": lambda u: 0.5 * u * (1 + torch.erf(u / math.sqrt(2))),
    "gelu_tanh": lambda u: 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3))),
    "relu": lambda u: torch.where(u > 0, u, torch.zeros_like(u)),
    "silu": lambda u: u / (1 + torch.exp(-u)),
}


def naive_act(u, activation):
    if activation not in ref.GATED_ACTIVATIONS:
        return NAIVE_ACT[activation](u)
    h = u.shape[-1] // 2
    gate = NAIVE_ACT["silu" if activation == "swiglu" else "gelu"](u[..., :h])
    return gate * u[..., h:]


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("norm", ref.NORMS)
@pytest.mark.parametrize("residual", [True, False])
def test_layernorm_mlp_matches_naive(activation, norm, residual):
    d, h = 24, 40
    gated = activation in ref.GATED_ACTIVATIONS
    x = rand(3, 17, d)
    nw, nb = rand(d), (rand(d) if norm == "layernorm" else None)
    fw, fb = rand(2 * h if gated else h, d, scale=0.3), rand(2 * h if gated else h)
    pw, pb = rand(d, h, scale=0.3), (rand(d) if residual else None)
    got = ref.layernorm_mlp(x, nw, nb, fw, fb, pw, pb, eps=1e-6, norm=norm, activation=activation,
                            residual=residual)
    u = torch.einsum("btd,hd->bth", naive_norm(x, nw, nb, 1e-6, norm), fw) + fb
    want = torch.einsum("bth,dh->btd", naive_act(u, activation), pw)
    want = want + (pb if pb is not None else 0) + (x if residual else 0)
    assert_close(got, want)


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_layernorm_mlp_gradcheck(activation):
    d, h = 5, 6
    rows = 2 * h if activation in ref.GATED_ACTIVATIONS else h
    args = [rand(3, d), rand(d), rand(d), rand(rows, d), rand(rows), rand(d, h), rand(d)]
    x, nw, nb, fw, fb, pw, pb = (a.requires_grad_() for a in args)
    kw = dict(activation=activation)
    with_all = lambda x, nw, nb, fw, fb, pw, pb: ref.layernorm_mlp(  # noqa: E731
        x, nw, nb, fw, fb, pw, pb, norm="layernorm", residual=True, **kw)
    no_biases = lambda x, nw, fw, pw: ref.layernorm_mlp(  # noqa: E731
        x, nw, None, fw, None, pw, None, norm="rmsnorm", residual=False, **kw)
    assert torch.autograd.gradcheck(with_all, (x, nw, nb, fw, fb, pw, pb))
    assert torch.autograd.gradcheck(no_biases, (x, nw, fw, pw))


def test_activate_rejects_unknown_name():
    with pytest.raises(ValueError, match="activation"):
        ref.activate(rand(3, 4), "tanh")


# --- linear_cross_entropy, lm_head_softmax ------------------------------------------------

def naive_linear_ce(x, w, target, bias, ignore_index, reduction, smoothing, z_loss, softcap):
    """Token by token: explicit logits, log-softmax by hand, a python sum over kept tokens."""
    xs, ts = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    losses, lses = [], []
    for n in range(xs.shape[0]):
        logit = (w * xs[n]).sum(-1) + (bias if bias is not None else 0)
        if softcap is not None:
            logit = softcap * torch.tanh(logit / softcap)
        m = logit.max()
        lse = m + torch.log(torch.exp(logit - m).sum())
        lses.append(lse)
        if ts[n] == ignore_index:
            losses.append(torch.zeros((), dtype=F64))
            continue
        logp = logit - lse
        loss = -(1 - smoothing) * logp[ts[n]] - smoothing * logp.sum() / logp.numel() + z_loss * lse * lse
        losses.append(loss)
    losses, lses = torch.stack(losses), torch.stack(lses).reshape(target.shape)
    kept = int((ts != ignore_index).sum())
    if reduction == "none":
        return losses.reshape(target.shape), lses
    total = losses.sum()
    return (total if reduction == "sum" else total / max(kept, 1)), lses


CE_CASES = [  # smoothing, z_loss, softcap, bias
    (0.0, 0.0, None, False),
    (0.1, 0.0, None, True),
    (0.0, 1e-3, None, False),
    (0.2, 1e-2, 5.0, True),
]


@pytest.mark.parametrize("reduction", ref.REDUCTIONS)
@pytest.mark.parametrize("case", CE_CASES, ids=str)
@pytest.mark.parametrize("lead", [(1,), (17,), (2, 9)], ids=str)
def test_linear_cross_entropy_matches_naive(lead, case, reduction):
    smoothing, z_loss, softcap, use_bias = case
    d, vocab = 24, 97
    x, w = rand(*lead, d), rand(vocab, d, scale=0.5)
    bias = rand(vocab) if use_bias else None
    target = torch.randint(0, vocab, lead)
    if lead != (1,):
        target[..., ::3] = -100
    kw = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap)
    loss, lse = ref.linear_cross_entropy(x, w, target, bias, return_lse=True, **kw)
    want_loss, want_lse = naive_linear_ce(x, w, target, bias, -100, reduction, smoothing, z_loss, softcap)
    assert loss.dtype == F64 and lse.shape == target.shape
    assert_close(loss, want_loss)
    assert_close(lse, want_lse)
    if z_loss == 0 and softcap is None:  # the contract: F.cross_entropy's value
        logits = F.linear(x, w, bias).reshape(-1, vocab)
        torch_loss = F.cross_entropy(logits, target.reshape(-1), reduction=reduction, label_smoothing=smoothing)
        assert_close(loss.reshape(torch_loss.shape), torch_loss)


def test_linear_cross_entropy_ignore_index_and_all_ignored():
    x, w = rand(5, 8), rand(11, 8)
    target = torch.full((5,), 3)
    target[1] = 7
    got = ref.linear_cross_entropy(x, w, target, ignore_index=3, reduction="none")
    assert torch.equal(got == 0, target == 3)
    all_ignored = torch.full((5,), -100)
    for reduction in ("mean", "sum"):
        loss = ref.linear_cross_entropy(x, w, all_ignored, reduction=reduction)
        assert loss.item() == 0.0
    xr = x.clone().requires_grad_()
    ref.linear_cross_entropy(xr, w, all_ignored).backward()
    assert torch.equal(xr.grad, torch.zeros_like(xr))


def test_linear_cross_entropy_float32_outputs():
    x, w, t = rand(6, 16).float(), rand(33, 16).float(), torch.randint(0, 33, (6,))
    loss, lse = ref.linear_cross_entropy(x.bfloat16(), w.bfloat16(), t, return_lse=True)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    want = ref.linear_cross_entropy(x.double(), w.double(), t)
    assert abs(loss.item() - want.item()) < 0.05


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_gradcheck(reduction):
    x, w, b = rand(2, 3, 4).requires_grad_(), rand(7, 4).requires_grad_(), rand(7).requires_grad_()
    target = torch.tensor([[1, -100, 6], [0, 2, 2]])

    def fn(x, w, b):
        return ref.linear_cross_entropy(x, w, target, b, reduction=reduction, label_smoothing=0.1,
                                        z_loss=1e-2, softcap=3.0, return_lse=True)

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
def test_lm_head_softmax_matches_naive(temperature):
    x, w, b = rand(2, 17, 8), rand(97, 8), rand(97)
    probs = ref.lm_head_softmax(x, w, b, temperature=temperature)
    logits = torch.einsum("btd,vd->btv", x, w) + b
    e = torch.exp((logits - logits.max(-1, keepdim=True).values) / temperature)
    assert_close(probs, e / e.sum(-1, keepdim=True))
    assert ref.lm_head_softmax(x.float(), w.float()).dtype == torch.float32
    assert torch.autograd.gradcheck(lambda x, w: ref.lm_head_softmax(x, w, temperature=temperature),
                                    (x[0, :3].clone().requires_grad_(), w[:7].clone().requires_grad_()))


# --- sample -------------------------------------------------------------------------------

def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sample_greedy():
    x, w, b = rand(3, 17, 8), rand(97, 8), rand(97)
    argmax = (F.linear(x, w, b)).argmax(-1)
    ids = ref.sample(x, w, b, temperature=0)
    assert ids.dtype == torch.int64 and ids.shape == (3, 17)
    assert torch.equal(ids, argmax)
    assert torch.equal(ref.sample(x, w, b, top_k=1, generator=gen(0)), argmax)
    assert torch.equal(ref.sample(x, w, b, top_p=1e-9, generator=gen(0)), argmax)


def test_sample_generator_reproducible():
    x, w = rand(64, 8), rand(97, 8)
    a = ref.sample(x, w, top_k=20, top_p=0.9, generator=gen(7))
    b = ref.sample(x, w, top_k=20, top_p=0.9, generator=gen(7))
    assert torch.equal(a, b)


def naive_top_p_set(p_row, top_p):
    """The smallest set of most probable tokens whose mass reaches top_p, by a python loop."""
    kept, mass = set(), 0.0
    for v in sorted(range(len(p_row)), key=lambda v: -float(p_row[v])):
        kept.add(v)
        mass += float(p_row[v])
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.5), (10, 0.6)])
def test_sample_support_restricted(top_k, top_p):
    rows, draws, vocab = 6, 400, 31
    x, w = rand(rows, 8), rand(vocab, 8)
    ids = ref.sample(x.repeat(draws, 1), w, top_k=top_k, top_p=top_p, generator=gen(3)).reshape(draws, rows)
    logits = F.linear(x, w)
    for r in range(rows):
        allowed = set(range(vocab))
        if top_k is not None:
            allowed = set(logits[r].topk(top_k).indices.tolist())
        if top_p is not None:
            p = torch.softmax(logits[r].masked_fill(~torch.isin(torch.arange(vocab), torch.tensor(sorted(allowed))),
                                                    float("-inf")), -1)
            allowed = naive_top_p_set(p, top_p)
        seen = set(ids[:, r].tolist())
        assert seen <= allowed, f"row {r}: sampled {sorted(seen - allowed)} outside the allowed set"
        assert len(seen) > 1 or len(allowed) == 1  # really sampled, not greedy


# chi-square critical values at p = 0.001 by degrees of freedom (scipy.stats.chi2.ppf(0.999, dof))
CHI2_CRIT_0_001 = {3: 16.266, 5: 20.515, 7: 24.322}


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.7, None), (1.3, 6)])
def test_sample_frequencies_match_softmax(temperature, top_k):
    """Goodness of fit of 40 000 seeded draws to lm_head_softmax's probabilities (renormalised
    over the top k): deterministic, and a wrong distribution fails by a wide margin."""
    vocab, draws = 8, 40_000
    x, w = rand(1, 6), rand(vocab, 6, scale=0.4)
    ids = ref.sample(x.expand(draws, 6), w, temperature=temperature, top_k=top_k, generator=gen(11))
    probs = ref.lm_head_softmax(x, w, temperature=temperature)[0]
    support = torch.arange(vocab) if top_k is None else probs.topk(top_k).indices
    expected = probs[support] / probs[support].sum() * draws
    assert expected.min() >= 5, "chi-square needs >= 5 expected draws per cell"
    counts = torch.bincount(ids, minlength=vocab).double()
    assert counts.sum() == counts[support].sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = len(support) - 1
    try:
        from scipy.stats import chi2
        crit = float(chi2.ppf(0.999, dof))
    except ImportError:
        crit = CHI2_CRIT_0_001[dof]
    assert stat < crit, f"chi-square {stat:.1f} >= {crit:.1f} (dof {dof})"
