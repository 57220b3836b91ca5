"""fusedlm.patch / unpatch: the fused kernels swapped into fusedlm's GPT and into transformers models.

A patched model's outputs and gradients stay within the error budget of the unpatched model (both
against the unpatched model in float64), the fused kernels really run (calls counted), cases a
kernel cannot take fall back to the model's own code, and unpatch restores the model exactly.
"""
import copy
import pickle
import subprocess
import sys

import pytest
import torch
from harness import assert_within_budget

import fusedlm
from fusedlm import patching, reference

VOCAB = 97


@pytest.fixture
def counted(monkeypatch):
    """Calls of fusedlm.attention and fusedlm.layer_norm made by patched transformers modules."""
    calls = {"attention": 0, "layer_norm": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(patching, "attention", counting("attention", patching.attention))
    monkeypatch.setattr(patching, "layer_norm", counting("layer_norm", patching.layer_norm))
    return calls


def test_patch_reference_gpt_runs_it_fused():
    config = fusedlm.GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, block_size=32)
    ref = reference.GPT(config)
    fused = fusedlm.GPT(config)
    fused.load_state_dict(ref.state_dict())
    idx, targets = torch.randint(0, VOCAB, (2, 19)), torch.randint(0, VOCAB, (2, 19))
    logits, loss_ref = ref(idx, targets)
    report = fusedlm.patch(ref)
    assert report.kind == "fusedlm.GPT" and report.attention == 2 and report.layernorm_mlp == 2 and report.loss
    assert all(m.backend == "auto" for m in ref.modules() if hasattr(m, "backend"))
    logits_p, loss_p = ref(idx, targets)
    assert logits is not None and logits_p is None  # the fused loss forms no logits
    assert torch.equal(loss_p, fused(idx, targets)[1])  # the same kernels as fusedlm.GPT
    with pytest.raises(ValueError, match="already patched"):
        fusedlm.patch(ref)
    fusedlm.unpatch(ref)
    assert all(m.backend == "reference" for m in ref.modules() if hasattr(m, "backend"))
    assert torch.equal(ref(idx, targets)[1], loss_ref)
    with pytest.raises(ValueError, match="not patched"):
        fusedlm.unpatch(ref)


def test_patch_rejects_unknown_models():
    with pytest.raises(TypeError, match="neither a fusedlm GPT nor a transformers PreTrainedModel"):
        fusedlm.patch(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fusedlm.patch("gpt2")


# --- transformers ---------------------------------------------------------------------------

transformers_params = [pytest.param("gpt2", id="gpt2"), pytest.param("llama", id="llama-gqa")]


def hf_model(kind, dtype=torch.float32):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    if not hasattr(transformers.PreTrainedModel, "set_attn_implementation"):
        pytest.skip(f"transformers {transformers.__version__} has no PreTrainedModel.set_attn_implementation "
                    "(about 4.54 and later)")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype).eval()


@pytest.mark.parametrize("kind", transformers_params)
def test_patched_transformers_model_matches_float64(kind, counted):
    """Logits, loss and every parameter's gradient of the patched model (fp32), against the unpatched
    model in float64, within twice the unpatched fp32 model's own error."""
    idx = torch.randint(0, VOCAB, (2, 23))
    results = {}
    for name, dtype, patched in (("fused", torch.float32, True), ("torch", torch.float32, False),
                                 ("ref64", torch.float64, False)):
        model = hf_model(kind, dtype)
        if patched:
            report = fusedlm.patch(model)
            assert report.kind == "transformers" and report.attention == 2
            assert (report.layer_norm, report.rms_norm) == ((5, 0) if kind == "gpt2" else (0, 5))
        out = model(idx, labels=idx)
        out.loss.backward()
        results[name] = (out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert counted["attention"] == 2 and counted["layer_norm"] == 5  # one forward: every layer took a kernel
    assert_within_budget(results["fused"][0], results["ref64"][0], results["torch"][0], name="logits")
    assert_within_budget(results["fused"][1], results["ref64"][1], results["torch"][1], name="loss")
    for n, g in results["ref64"][2].items():
        assert_within_budget(results["fused"][2][n], g, results["torch"][2][n], name=f"grad {n}",
                             atol=1e-5 * g.abs().max().item())


@pytest.mark.parametrize("kind", transformers_params)
def test_patched_generation_matches_and_unpatch_restores(kind, counted):
    model = hf_model(kind)
    idx = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        logits = model(idx).logits
        greedy = model.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0)
        implementation = model.config._attn_implementation
        fusedlm.patch(model)
        assert model.config._attn_implementation == patching.ATTENTION_NAME
        patched = model.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0)
        # prefill, then one query per step against the cache: every step on the kernel
        assert counted["attention"] == 2 * 8
        fusedlm.unpatch(model)
        assert model.config._attn_implementation == implementation
        assert all("forward" not in vars(m) for m in model.modules())
        assert torch.equal(model(idx).logits, logits)
    assert torch.equal(patched, greedy)


@pytest.mark.parametrize("kind", transformers_params)
def test_padding_mask_falls_back_to_transformers_attention(kind, counted):
    """A left-padded batch needs a mask: the patched attention hands it to transformers' sdpa (same
    result as unpatched); the norms still run fused."""
    model = hf_model(kind)
    idx = torch.randint(1, VOCAB, (2, 11))
    mask = torch.ones_like(idx)
    mask[0, :4] = 0
    with torch.no_grad():
        expected = model(idx, attention_mask=mask).logits
        fusedlm.patch(model)
        got = model(idx, attention_mask=mask).logits
    assert counted["attention"] == 0 and counted["layer_norm"] == 5
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0, 4:], expected[0, 4:], rtol=1e-5, atol=1e-5)


def test_norm_the_kernel_cannot_take_runs_the_module_forward(counted):
    """A float64 norm (no kernel takes float64) and an input whose dtype differs from the weight's go to
    the module's own forward: its result, or its error."""
    model = hf_model("gpt2")
    fusedlm.patch(model)
    ln = model.transformer.ln_f.double()
    x64 = torch.randn(3, 64, dtype=torch.float64)
    assert torch.equal(ln(x64), torch.nn.functional.layer_norm(x64, (64,), ln.weight, ln.bias, ln.eps))
    with pytest.raises(RuntimeError):
        ln(torch.randn(3, 64))  # float32 x, float64 weight: torch.nn.LayerNorm's own error
    assert counted["layer_norm"] == 0
    ln.float()
    x = torch.randn(3, 64)
    torch.testing.assert_close(ln(x), torch.nn.LayerNorm.forward(ln, x))
    assert counted["layer_norm"] == 1


def test_other_model_types_keep_their_attention(counted):
    """A model type outside HF_ATTENTION_MODELS (some branch on the name "sdpa" or cannot run sdpa):
    its attention is left alone, said in the report; its LayerNorms are fused."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)).eval()
    idx = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        expected = model(idx).last_hidden_state
        implementation = model.config._attn_implementation
        report = fusedlm.patch(model)
        got = model(idx).last_hidden_state
    assert report.attention == 0 and any("model type 'bert'" in n for n in report.notes)
    assert model.config._attn_implementation == implementation
    assert report.layer_norm == 5 and counted["layer_norm"] == 5 and counted["attention"] == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shared_config_is_patched_once():
    a = hf_model("llama")
    b = type(a)(a.config).eval()  # one config object, as from_pretrained twice with one config
    report_a = fusedlm.patch(a)
    assert report_a.attention == 2 and b.config._attn_implementation == patching.ATTENTION_NAME
    report_b = fusedlm.patch(b)  # b's config already says "fusedlm": nothing to record or restore
    assert report_b.attention == 0 and any("shared with a patched model" in n for n in report_b.notes)
    fusedlm.unpatch(b)
    fusedlm.unpatch(a)
    assert a.config._attn_implementation == "sdpa"


def test_patched_model_pickles_and_copies():
    model = hf_model("gpt2")
    idx = torch.randint(0, VOCAB, (1, 9))
    fusedlm.patch(model)
    with torch.no_grad():
        expected = model(idx).logits
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert clone.transformer.ln_f.forward.args[0] is clone.transformer.ln_f  # bound to the copy
            assert torch.equal(clone(idx).logits, expected)
            fusedlm.unpatch(clone)
    assert "forward" in vars(model.transformer.ln_f)  # the original is still patched


def test_patched_model_loads_in_a_new_process(tmp_path):
    """torch.save of a patched model, torch.load in a fresh interpreter: loading registers the attention
    implementation its config names (before, transformers raised: '`fusedlm` is not a valid attention
    implementation'), and the logits are the same bits."""
    model = hf_model("llama")
    fusedlm.patch(model)
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.save((idx, model(idx).logits), tmp_path / "expected.pt")
    torch.save(model, tmp_path / "model.pt")
    script = (f"import torch, fusedlm\n"
              f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
              f"idx, logits = torch.load({str(tmp_path / 'expected.pt')!r})\n"
              f"with torch.no_grad():\n    assert torch.equal(m(idx).logits, logits)\n"
              f"fusedlm.unpatch(m)\nprint(m.config._attn_implementation)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("sdpa")


def test_an_instance_forward_is_kept_and_restored(counted):
    """An instance forward already on a norm (as accelerate's offloading hooks install) serves the calls
    the kernel cannot take while patched, and is back in place after unpatch."""
    model = hf_model("gpt2")
    ln = model.transformer.ln_f
    hook_calls = []

    def hook(x):
        hook_calls.append(1)
        return torch.nn.LayerNorm.forward(ln, x)
    ln.forward = hook
    fusedlm.patch(model)
    ln(torch.randn(2, 64))  # the kernel takes it
    assert counted["layer_norm"] == 1 and hook_calls == []
    ln.double()
    ln(torch.randn(2, 64, dtype=torch.float64))  # float64: the previous forward, the hook
    assert hook_calls == [1]
    fusedlm.unpatch(model)
    assert vars(ln)["forward"] is hook


def test_nested_patching_is_refused():
    model = hf_model("gpt2")
    fusedlm.patch(model)
    with pytest.raises(ValueError, match="a module of it, is already patched"):
        fusedlm.patch(model.transformer)
    fusedlm.unpatch(model)
    fusedlm.patch(model.transformer)
    with pytest.raises(ValueError, match="a module of it, is already patched"):
        fusedlm.patch(model)
    fusedlm.unpatch(model.transformer)
