"""The reference GPT against Hugging Face's GPT-2 (a tiny random model built offline from a
config), and KV-cache decoding against full recomputation."""
import pytest
import torch
import torch.nn.functional as F

from fusedlm.reference import GPT, GPTConfig, KVCache

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

VOCAB, BLOCK = 97, 64


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(1234)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=BLOCK,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    # Random init leaves the LayerNorms at (1, 0) and biases at 0: perturb them so the
    # comparison also checks that every bias and norm parameter lands in the right place.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def next_token_targets(idx):
    """targets[t] = idx[t + 1]; the last position has no next token (-100). HF's labels=idx
    shifts the same way inside the model."""
    targets = torch.full_like(idx, -100)
    targets[:, :-1] = idx[:, 1:]
    return targets


def test_parameter_names_and_tied_head(hf_model):
    model = GPT.from_hf(hf_model)
    names = {n for n, _ in model.named_parameters()}
    want = {n for n, _ in hf_model.named_parameters()}
    assert names == want
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.block_size == BLOCK and model.config.vocab_size == VOCAB


def test_from_hf_matches_logits_and_loss(hf_model):
    model = GPT.from_hf(hf_model).eval()
    idx = torch.randint(0, VOCAB, (3, 41))
    with torch.no_grad():
        want = hf_model(idx, labels=idx)
        logits, loss = model(idx, next_token_targets(idx))
        logits_only, no_loss = model(idx)
    tol = 1e-5 * max(1.0, want.logits.abs().max().item())
    assert logits.dtype == torch.float32 and logits.shape == (3, 41, VOCAB)
    assert (logits - want.logits).abs().max().item() <= tol
    assert abs(loss.item() - want.loss.item()) <= 1e-5 * max(1.0, want.loss.item())
    assert no_loss is None and torch.equal(logits_only, logits)


def test_from_hf_matches_gradients(hf_model):
    """float64: the gradients of every parameter, the tied embedding's included, agree with HF's."""
    hf64 = transformers.GPT2LMHeadModel(hf_model.config).double().eval()
    hf64.load_state_dict(hf_model.state_dict())
    model = GPT.from_hf(hf64)
    assert model.transformer.wte.weight.dtype == torch.float64
    idx = torch.randint(0, VOCAB, (2, 13))
    # HF's loss upcasts logits to float32 (a downcast here), so take its float64 logits instead.
    hf_logits = hf64(idx).logits
    F.cross_entropy(hf_logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1)).backward()
    model(idx, next_token_targets(idx))[1].backward()
    hf_grads = dict(hf64.named_parameters())
    for name, p in model.named_parameters():
        g = hf_grads[name].grad
        g = g.t() if g.dim() == 2 and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else g
        assert torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12), name


def test_greedy_generation_matches_hf_logits(hf_model):
    model = GPT.from_hf(hf_model).eval()
    idx = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(idx, 10, temperature=0)
    want = idx
    with torch.no_grad():
        for _ in range(10):
            want = torch.cat([want, hf_model(want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, want)


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(5)
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=BLOCK)).double().eval()


def test_kv_cache_forward_matches_full_forward(model64):
    idx = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        full, _ = model64(idx)
        cache = KVCache(model64.config.n_layer)
        parts = [model64(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 11), (11, 12), (12, 30))]
    assert len(cache) == 30
    assert torch.allclose(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sampling", [
    dict(temperature=0),
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=10, top_p=0.9),
], ids=["greedy", "sampled", "top_k_top_p"])
def test_generate_with_cache_matches_without(model64, sampling):
    idx = torch.randint(0, VOCAB, (3, 7))
    with_cache = model64.generate(idx, 25, use_cache=True, generator=torch.Generator().manual_seed(3), **sampling)
    without = model64.generate(idx, 25, use_cache=False, generator=torch.Generator().manual_seed(3), **sampling)
    assert with_cache.shape == (3, 32) and torch.equal(with_cache[:, :7], idx)
    assert torch.equal(with_cache, without)


def test_block_size_limits(model64):
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model64(torch.zeros(1, BLOCK + 1, dtype=torch.long))
    cache = KVCache(model64.config.n_layer)
    model64(torch.zeros(1, 60, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="after 60 cached positions"):
        model64(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
    idx = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="use_cache=False"):
        model64.generate(idx, 6, temperature=0)
    assert model64.generate(idx, 5, temperature=0).shape == (1, 65)  # the last token is never fed
    assert model64.generate(idx, 10, temperature=0, use_cache=False).shape == (1, 70)  # cropped context


def test_training_step_with_dropout():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.1))
    idx = torch.randint(0, VOCAB, (2, 16))
    _, loss = model.train()(idx, next_token_targets(idx))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        a, b = model.eval()(idx)[0], model(idx)[0]
    assert torch.equal(a, b)  # eval mode turns dropout off
