"""Backend choice and input checks of the public ops (the kernels' numerics are tested per op)."""
import pytest
import torch

import fusedlm
from fusedlm import dispatch


def test_available_backends_shape():
    got = fusedlm.available_backends()
    assert set(got) == {"cpu", "cuda", "triton", "reference"}
    assert got["reference"] is True
    assert got["cuda"] == (torch.cuda.is_available() and dispatch.has_cpp_kernel("layer_norm_fwd", "CUDA"))


def test_extension_is_built_here():
    """make test builds fusedlm._C first; a missing extension must fail loudly, not skip."""
    assert dispatch._C is not None, dispatch._C_ERROR
    assert fusedlm.available_backends()["cpu"]


def test_auto_takes_the_cpu_kernel_for_cpu_tensors():
    assert dispatch.resolve("layer_norm", "auto", torch.device("cpu"), "layer_norm_fwd", True) == "cpu"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not dispatch._triton_importable():
        pytest.skip("needs the triton package (not installed)")
    with pytest.raises(fusedlm.BackendError, match="layer_norm: backend='triton'.*TRITON_INTERPRET=1"):
        dispatch.resolve("layer_norm", "triton", torch.device("cpu"), "layer_norm_fwd", True)


ATTN_BAD = [
    (dict(q=torch.randn(2, 8, 64)), ValueError, r"attention: q must be 4-D \(B, H, N, D\), got shape \(2, 8, 64\)"),
    (dict(k=torch.randn(2, 3, 7, 16), v=torch.randn(2, 3, 7, 16)), ValueError,
     r"attention: q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (dict(k=torch.randn(3, 2, 7, 16), v=torch.randn(3, 2, 7, 16)), ValueError, "attention: k must have q's batch size 2"),
    (dict(k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8)), ValueError, "attention: k must have q's head dim 16"),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 16))), TypeError, "attention: q must have dtype"),
    (dict(q=torch.randn(2, 4, 5, 272), k=torch.randn(2, 2, 7, 272), v=torch.randn(2, 2, 7, 272)), ValueError,
     "attention: head dim must be <= 256"),
]


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(scale=float("inf")), TypeError, "attention: scale must be a finite number, got inf"),
    (dict(scale=-1.0), ValueError, "attention: scale must be > 0 or None, got -1.0"),
    (dict(scale=1e39), ValueError, "attention: scale must be 0 or of magnitude within float32's normal range"),
    (dict(scale=3e38), ValueError, r"attention: scale \* log2\(e\) must fit in float32 \(at most 2.359e\+38\)"),
    (dict(causal=None), TypeError, "attention: causal must be True or False, got None"),
])
def test_attention_bad_options(kw, exc, msg):
    q = torch.randn(1, 2, 5, 16)
    for backend in ("auto", "reference"):
        with pytest.raises(exc, match=msg):
            fusedlm.attention(q, q, q, backend=backend, **kw)


@pytest.mark.parametrize("over,exc,msg", ATTN_BAD)
def test_attention_bad_inputs(over, exc, msg):
    args = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16))
    args.update(over)
    with pytest.raises(exc, match=msg):
        fusedlm.attention(args["q"], args["k"], args["v"])


def test_layernorm_mlp_bad_inputs():
    x, nw, fw, pw = torch.randn(3, 8), torch.ones(8), torch.randn(15, 8), torch.randn(8, 15)
    with pytest.raises(ValueError, match="layernorm_mlp: a gated activation .* odd height 15"):
        fusedlm.layernorm_mlp(x, nw, None, fw, None, pw, None, activation="swiglu")
    with pytest.raises(ValueError, match="layernorm_mlp: rmsnorm takes no norm_bias"):
        fusedlm.layernorm_mlp(x, nw, torch.zeros(8), fw, None, pw, None, norm="rmsnorm")
    with pytest.raises(ValueError, match="layernorm_mlp: activation must be one of"):
        fusedlm.layernorm_mlp(x, nw, None, fw, None, pw, None, activation="tanh")
    with pytest.raises(ValueError, match=r"layernorm_mlp: proj_weight must have shape \(8, 15\)"):
        fusedlm.layernorm_mlp(x, nw, None, fw, None, pw.t(), None)
    with pytest.raises(TypeError, match="layernorm_mlp: x must have dtype"):
        fusedlm.layernorm_mlp(x.long(), nw, None, fw, None, pw, None)


def test_linear_cross_entropy_bad_inputs():
    x, w = torch.randn(3, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: target holds 11, outside \[0, 11\)"):
        fusedlm.linear_cross_entropy(x, w, torch.tensor([0, 11, 2]))
    with pytest.raises(TypeError, match="linear_cross_entropy: target must have dtype"):
        fusedlm.linear_cross_entropy(x, w, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"linear_cross_entropy: weight must have shape \(V, 8\)"):
        fusedlm.linear_cross_entropy(x, torch.randn(11, 7), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="linear_cross_entropy: reduction must be one of"):
        fusedlm.linear_cross_entropy(x, w, torch.tensor([0, 1, 2]), reduction="avg")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("op,native_op", [("layer_norm", "layer_norm_fwd"), ("attention", "attention_fwd"),
                                          ("layernorm_mlp", "layernorm_mlp_fwd"),
                                          ("linear_cross_entropy", "linear_cross_entropy_fwd"),
                                          ("lm_head_softmax", "lm_head_softmax")])
def test_auto_on_cuda_takes_the_first_gpu_kernel_listed_or_the_reference(op, native_op):
    chosen = dispatch.resolve(op, "auto", torch.device("cuda"), native_op=native_op, triton=True, dtype=torch.bfloat16)
    assert chosen == (dispatch.AUTO_GPU[op][0] if dispatch.AUTO_GPU[op] else "reference")
