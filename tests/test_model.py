"""fusedlm.GPT and fusedlm.nn against the float64 reference: the three fused ops end to end.

The fused model and fusedlm.reference.GPT share modules and parameter names; a state dict moves
between them, and the fused model's loss and every parameter's gradient stay within the error
budget of the reference model run in the same dtype (both against the reference in float64).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from harness import ATOL, assert_within_budget, backend_device, backend_params

import fusedlm
from fusedlm import reference
from fusedlm.nn import functional as fnn

VOCAB, BLOCK = 97, 48


def small_config(**kw):
    # head_dim 64: one the CUDA attention kernels specialise (they take 64, 80, 96, 128)
    return fusedlm.GPTConfig(**{**dict(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=128, block_size=BLOCK), **kw})


def models(config, backend, dtype, device):
    """(fused model, reference in dtype, reference in float64), one set of weights."""
    ref64 = reference.GPT(config).double().to(device)
    state = ref64.state_dict()
    ref = reference.GPT(config).to(device=device, dtype=dtype)
    ref.load_state_dict(state)
    fused = fusedlm.GPT(config, backend=backend).to(device=device, dtype=dtype)
    fused.load_state_dict(state)
    return fused, ref, ref64


def batch(device, b=2, t=37, ignore=0.2):
    idx = torch.randint(0, VOCAB, (b, t), device=device)
    targets = torch.randint(0, VOCAB, (b, t), device=device)
    targets[torch.rand(b, t, device=device) < ignore] = -100
    return idx, targets


DTYPE_CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    *[pytest.param(p.values[0], dtype, id=f"{p.id}-{name}", marks=p.marks)
      for p in backend_params(cpu=False) for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))],
]


@pytest.mark.parametrize("backend,dtype", DTYPE_CASES)
def test_loss_and_gradients_match_reference(backend, dtype):
    device = backend_device(backend)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter (no GPU here)")
    fused, ref, ref64 = models(small_config(), backend, dtype, device)
    idx, targets = batch(device)
    results = {}
    for name, model in (("fused", fused), ("ref", ref), ("ref64", ref64)):
        logits, loss = model(idx, targets)
        loss.backward()
        results[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        assert (logits is None) == (name == "fused")  # the fused loss never forms the logits
    # Floors of the model's dtype, scaled to each value's magnitude (the loss is about 4.6; most gradients
    # are far below 1, where an absolute bf16 floor of 1.6e-2 would exceed them whole).
    loss64 = results["ref64"][0]
    assert_within_budget(results["fused"][0].float(), loss64, results["ref"][0].float(), name="loss",
                         atol=ATOL[dtype] * loss64.abs().item())
    for n, g64 in results["ref64"][1].items():
        assert_within_budget(results["fused"][1][n], g64, results["ref"][1][n], name=f"grad {n}",
                             atol=ATOL[dtype] * g64.abs().max().item())


def test_logits_without_targets_match_reference():
    fused, ref, ref64 = models(small_config(), "cpu", torch.float32, "cpu")
    idx, _ = batch("cpu", t=29)
    with torch.no_grad():
        out = [m(idx) for m in (fused, ref, ref64)]
    assert all(loss is None for _, loss in out)
    assert_within_budget(out[0][0], out[2][0], out[1][0], name="logits")


def test_state_dicts_interchange():
    config = small_config()
    fused, ref = fusedlm.GPT(config), reference.GPT(config)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert fused.backend == "auto" and ref.backend == "reference"
    assert fused.lm_head.weight is fused.transformer.wte.weight  # tied
    assert all(m.backend == "auto" for m in fused.modules() if hasattr(m, "backend"))
    assert all(m.backend == "reference" for m in ref.modules() if hasattr(m, "backend"))
    with pytest.raises(ValueError, match="GPT: backend must be one of"):
        fusedlm.GPT(config, backend="fast")


def test_kv_cache_decode_matches_full_forward():
    """Prefill, then one token at a time: the fused attention against the cache (Nq < Nk, causal
    aligned bottom-right) gives the logits of one full forward."""
    fused, _, _ = models(small_config(), "cpu", torch.float32, "cpu")
    idx, _ = batch("cpu", t=30)
    with torch.no_grad():
        full, _ = fused(idx)
        cache = fusedlm.KVCache(fused.config.n_layer)
        parts = [fused(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 11), (11, 12), (12, 13), (13, 30))]
    assert len(cache) == 30
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_reference():
    fused, ref, _ = models(small_config(), "cpu", torch.float32, "cpu")
    idx, _ = batch("cpu", b=3, t=5)
    out = fused.generate(idx, 20, temperature=0)
    assert out.shape == (3, 25) and torch.equal(out[:, :5], idx)
    assert torch.equal(out, ref.generate(idx, 20, temperature=0))


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=10, top_p=0.9)],
                         ids=["sampled", "top_k_top_p"])
def test_sampled_generation_repeats_and_uses_the_cache(sampling):
    fused, _, _ = models(small_config(), "cpu", torch.float32, "cpu")
    idx, _ = batch("cpu", b=3, t=7)
    runs = [fused.generate(idx, 15, use_cache=cache, generator=torch.Generator().manual_seed(3), **sampling)
            for cache in (True, True, False)]
    assert runs[0].shape == (3, 22)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_from_hf_matches_reference():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=BLOCK, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).eval()
    fused = fusedlm.GPT.from_hf(hf)
    ref64 = reference.GPT.from_hf(hf.double())
    ref = reference.GPT.from_hf(hf.float())
    assert fused.backend == "auto" and fusedlm.GPT.from_hf(hf.float(), backend="reference").backend == "reference"
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="takes a transformers GPT2LMHeadModel, got a LlamaForCausalLM"):
        fusedlm.GPT.from_hf(llama)
    idx, targets = batch("cpu")
    with torch.no_grad():
        losses = [m(idx, targets)[1] for m in (fused, ref, ref64)]
    assert_within_budget(losses[0], losses[2], losses[1], name="loss")


def test_torch_compile_fullgraph_training_step():
    fused, _, _ = models(small_config(n_layer=1), "cpu", torch.float32, "cpu")
    idx, targets = batch("cpu")
    compiled = torch.compile(fused, fullgraph=True)
    _, loss_c = compiled(idx, targets)
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in fused.named_parameters()}
    fused.zero_grad(set_to_none=True)
    _, loss = fused(idx, targets)
    loss.backward()
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for n, p in fused.named_parameters():
        torch.testing.assert_close(grads_c[n], p.grad, rtol=1e-4, atol=1e-6, msg=f"grad {n}")


# --- fusedlm.nn ----------------------------------------------------------------------------

@pytest.mark.parametrize("activation,norm,bias,residual", [
    ("gelu_tanh", "layernorm", True, True),
    ("swiglu", "rmsnorm", False, True),
    ("geglu", "layernorm", True, False),
])
def test_layernorm_mlp_module(activation, norm, bias, residual):
    mods = {dt: fusedlm.nn.LayerNormMLP(48, 97, bias, activation=activation, norm=norm, residual=residual,
                                        backend="reference" if dt != torch.float32 else "cpu").to(dt)
            for dt in (torch.float32, torch.float64)}
    mods[torch.float64].load_state_dict(mods[torch.float32].state_dict())
    ref32 = fusedlm.nn.LayerNormMLP(48, 97, bias, activation=activation, norm=norm, residual=residual,
                                    backend="reference")
    ref32.load_state_dict(mods[torch.float32].state_dict())
    assert mods[torch.float32].c_fc.weight.shape == ((194 if activation in ("swiglu", "geglu") else 97), 48)
    assert (mods[torch.float32].ln.bias is None) == (norm == "rmsnorm" or not bias)
    x = torch.randn(3, 5, 48)
    outs = {}
    for name, m, dt in (("fused", mods[torch.float32], torch.float32), ("ref", ref32, torch.float32),
                        ("ref64", mods[torch.float64], torch.float64)):
        xi = x.detach().to(dt).clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y))
        outs[name] = (y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()})
    assert_within_budget(outs["fused"][0], outs["ref64"][0], outs["ref"][0], name="y")
    assert_within_budget(outs["fused"][1], outs["ref64"][1], outs["ref"][1], name="dx")
    for n, g in outs["ref64"][2].items():
        assert_within_budget(outs["fused"][2][n], g, outs["ref"][2][n], name=f"grad {n}")


@pytest.mark.parametrize("norm,bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_layer_norm_module(norm, bias):
    ln = fusedlm.nn.LayerNorm(97, bias, 1e-5, norm=norm, backend="cpu")
    with torch.no_grad():
        ln.weight.normal_()
        if bias:
            ln.bias.normal_()
    x, r = torch.randn(3, 7, 97), torch.randn(3, 7, 97)
    y, h = ln(x, r)
    params = (ln.weight.double(), ln.bias.double() if bias else None)
    y64, h64 = reference.layer_norm(x.double(), *params, norm=norm, residual=r.double())
    y32, _ = reference.layer_norm(x, ln.weight, ln.bias, norm=norm, residual=r)
    assert_within_budget(y, y64, y32, name="y")
    torch.testing.assert_close(h, (x + r))
    assert_within_budget(ln(x), reference.layer_norm(x.double(), *params, norm=norm),
                         reference.layer_norm(x, ln.weight, ln.bias, norm=norm), name="y without residual")


def test_causal_self_attention_gqa_module():
    attn = fusedlm.nn.CausalSelfAttention(64, 8, n_kv_head=2, backend="cpu")
    assert attn.c_attn.weight.shape == ((8 + 2 * 2) * 8, 64)
    x = torch.randn(2, 19, 64, dtype=torch.float64)
    attn64 = fusedlm.nn.CausalSelfAttention(64, 8, n_kv_head=2, backend="reference").double()
    attn64.load_state_dict(attn.state_dict())
    # the reference by hand: repeat each k, v head for its group of 4 query heads, then causal softmax
    qkv = attn64.c_attn(x)
    q, k, v = (z.view(2, 19, -1, 8).transpose(1, 2) for z in qkv.split((64, 16, 16), dim=2))
    k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attn64.c_proj(y.transpose(1, 2).reshape(2, 19, 64))
    torch.testing.assert_close(attn64(x), expected)
    torch.testing.assert_close(attn(x.float()), expected.float(), rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_loss_module():
    loss_fn = fusedlm.nn.LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, backend="cpu")
    x, w = torch.randn(31, 32, requires_grad=True), torch.randn(123, 32, requires_grad=True)
    t = torch.randint(0, 123, (31,))
    loss = loss_fn(x, w, t)
    loss.backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref64 = reference.linear_cross_entropy(x64, w64, t, reduction="sum", label_smoothing=0.1)
    ref64.backward()
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference.linear_cross_entropy(x32, w32, t, reduction="sum", label_smoothing=0.1)
    ref.backward()
    assert_within_budget(loss.detach(), ref64.detach(), ref.detach(), name="loss")
    assert_within_budget(x.grad, x64.grad, x32.grad, name="dx")
    assert_within_budget(w.grad, w64.grad, w32.grad, name="dweight")
    with pytest.raises(ValueError, match="LinearCrossEntropyLoss: reduction"):
        fusedlm.nn.LinearCrossEntropyLoss(reduction="avg")


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="n_embd \\(60\\) must be a multiple of n_head \\(8\\)"):
        fusedlm.nn.CausalSelfAttention(60, 8)
    with pytest.raises(ValueError, match="n_head \\(8\\) must be a multiple of n_kv_head \\(3\\)"):
        fusedlm.nn.CausalSelfAttention(64, 8, n_kv_head=3)
    with pytest.raises(ValueError, match="LayerNorm: norm='rmsnorm' has no bias"):
        fusedlm.nn.LayerNorm(16, bias=True, norm="rmsnorm")
    with pytest.raises(ValueError, match="MLP: activation"):
        fusedlm.nn.LayerNormMLP(16, activation="tanh")
    with pytest.raises(ValueError, match="LayerNorm: backend"):
        fusedlm.nn.LayerNorm(16, backend="gpu")
    with pytest.raises(ValueError, match="n_head must be a positive integer, got 0"):
        fusedlm.nn.CausalSelfAttention(64, 0)
    with pytest.raises(ValueError, match="n_kv_head must be a positive integer, got 0"):
        fusedlm.nn.CausalSelfAttention(64, 8, n_kv_head=0)
    with pytest.raises(ValueError, match="x must be 3-D \\(B, T, n_embd\\), got shape \\(5, 64\\)"):
        fusedlm.nn.CausalSelfAttention(64, 8)(torch.randn(5, 64))


def test_kv_cache_and_generate_arguments_are_checked():
    with pytest.raises(ValueError, match="KVCache: n_layer must be a positive integer"):
        fusedlm.KVCache(0)
    cache = fusedlm.KVCache(2)
    k = torch.randn(2, 4, 3, 8)
    with pytest.raises(ValueError, match="layer 2 out of range for a cache of 2 layers"):
        cache.update(2, k, k)
    with torch.no_grad():
        cache.update(0, k, k)
        with pytest.raises(ValueError, match="a new batch needs a new cache"):
            cache.update(0, k[:1], k[:1])
    assert len(cache) == 3  # the refused update left the cache as it was
    model = fusedlm.GPT(small_config())
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer, got -3"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), -3)


def test_kv_cache_under_autograd_concatenates():
    """With gradients enabled (even when only the queries need them) the cache never writes into tensors
    that attention saved for backward."""
    fused, _, _ = models(small_config(), "cpu", torch.float32, "cpu")
    idx, _ = batch("cpu", t=12)
    cache = fusedlm.KVCache(fused.config.n_layer)
    logits = torch.cat([fused(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 12))], dim=1)
    logits.sum().backward()
    assert all(p.grad is not None for p in fused.parameters())
    torch.testing.assert_close(logits.detach(), fused(idx)[0].detach(), rtol=1e-5, atol=1e-5)


# --- fusedlm.nn.functional.scaled_dot_product_attention ------------------------------------

def qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))


@pytest.mark.parametrize("shape,kw", [
    ((2, 4, 4, 33, 33, 32), dict(is_causal=True)),
    ((2, 4, 4, 17, 40, 32), dict()),
    ((1, 8, 2, 25, 25, 64), dict(is_causal=True, enable_gqa=True)),
    ((1, 3, 3, 9, 9, 16), dict(scale=0.3)),
], ids=["causal", "nq_ne_nk", "gqa", "scale"])
def test_sdpa_fused_where_it_applies(shape, kw):
    q, k, v = qkv(*shape)
    assert fnn._kernel_takes(q, k, v, None, 0.0, kw.get("is_causal", False), kw.get("scale"),
                             kw.get("enable_gqa", False))
    out = fnn.scaled_dot_product_attention(q, k, v, **kw)
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)
    assert_within_budget(out, ref64, F.scaled_dot_product_attention(q, k, v, **kw), name="sdpa")


@pytest.mark.parametrize("case", ["mask", "dropout", "causal_nq_ne_nk", "float64", "three_d", "gqa_flag_off",
                                  "empty", "value_dim"])
def test_sdpa_falls_back_to_torch(case):
    q, k, v = qkv(2, 4, 4, 9, 13, 16)
    kw = {}
    if case == "mask":
        kw = dict(attn_mask=torch.rand(9, 13) > 0.3)
    elif case == "dropout":
        kw = dict(dropout_p=0.5)
    elif case == "causal_nq_ne_nk":  # torch aligns the mask top-left: not fusedlm's semantics
        kw = dict(is_causal=True)
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "three_d":
        q, k, v = q[0], k[0], v[0]
    elif case == "gqa_flag_off":
        q, k, v = qkv(2, 4, 2, 9, 9, 16)
    elif case == "empty":
        q, k, v = qkv(0, 4, 4, 9, 9, 16)
    elif case == "value_dim":
        v = torch.randn(2, 4, 13, 24)
    assert not fnn._kernel_takes(q, k, v, kw.get("attn_mask"), kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                                 None, False)
    if case == "gqa_flag_off":  # torch's own error, unchanged
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v)
        with pytest.raises(RuntimeError):
            fnn.scaled_dot_product_attention(q, k, v)
        return
    torch.manual_seed(7)
    out = fnn.scaled_dot_product_attention(q, k, v, **kw)
    torch.manual_seed(7)
    expected = F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(out, expected)


def test_sdpa_gradients_through_the_kernel():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 21, 21, 32))
    fnn.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q64, k64, v64, is_causal=True).sum().backward()
    for g, t in zip(grads, (q64, k64, v64)):
        torch.testing.assert_close(g, t.grad.float(), rtol=1e-4, atol=1e-5 * math.sqrt(21))


def test_gpt_without_biases_matches_reference():
    fused, ref, ref64 = models(small_config(bias=False), "cpu", torch.float32, "cpu")
    assert fused.transformer.ln_f.bias is None and fused.transformer.h[0].mlp.c_fc.bias is None
    idx, targets = batch("cpu")
    losses = [m(idx, targets)[1] for m in (fused, ref, ref64)]
    assert_within_budget(losses[0].detach(), losses[2].detach(), losses[1].detach(), name="loss")


def test_gpt_training_step_with_dropout():
    """Dropout on the residual branches: the MLP's residual add leaves the fused op (residual=False) so the
    dropout sits between them; eval mode turns it off and gives the fused op back."""
    torch.manual_seed(0)
    model = fusedlm.GPT(small_config(dropout=0.1)).train()
    idx, targets = batch("cpu")
    _, loss = model(idx, targets)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        a, b = model.eval()(idx)[0], model(idx)[0]
    assert torch.equal(a, b)
