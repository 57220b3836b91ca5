"""The Triton launchers of layernorm_mlp (kernels/layernorm_mlp.py), called directly with the op schema's
arguments, against fusedlm.reference in float64 under the error-budget rule: forward (y, the norm
statistics, pre_act) and every gradient.

The grid norm x activation x bias x residual x recompute (96 points) is sampled so that the interpreter
stays fast: all 12 (norm, activation) pairs, each with one of the 8 (bias, residual, recompute) settings
in rotation (every setting appears, and each flag is on and off for every norm), on small odd shapes.
Also: fp16 (bf16 only on a GPU), saturated activations (exp overflow inside sigmoid / tanh), recompute
giving the saved path's bits, deterministic gradients, M = 0, and bad inputs.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fusedlm import reference
from harness import ATOL, assert_within_budget, backend_device

pytestmark = pytest.mark.triton

EPS = 1e-5
SHAPES = ((17, 48, 64), (130, 97, 200), (1, 97, 64), (130, 48, 200))  # (M, d, h)
SETTINGS = list(itertools.product((True, False), repeat=3))  # (bias, residual, recompute)
CASES = [
    (norm, activation, *SETTINGS[(3 * i + j) % 8], SHAPES[(i + j) % len(SHAPES)])
    for i, activation in enumerate(reference.ACTIVATIONS) for j, norm in enumerate(reference.NORMS)
]
GRAD_NAMES = ("x", "norm_weight", "norm_bias", "fc_weight", "fc_bias", "proj_weight", "proj_bias")


def _case_id(case):
    norm, activation, bias, residual, recompute, (m, d, h) = case
    flags = "-".join(name for name, on in (("bias", bias), ("residual", residual), ("recompute", recompute)) if on)
    return f"{norm}-{activation}-{flags or 'plain'}-{m}x{d}x{h}"


def _inputs(norm, activation, bias, m, d, h, fc_scale=1.0):
    """float64 (x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias), fresh and random, scaled
    so that every activation (the gate, when gated) sees inputs of size about fc_scale."""
    fc_out = 2 * h if activation in reference.GATED_ACTIVATIONS else h
    f64 = dict(dtype=torch.float64)
    fc_weight = torch.randn(fc_out, d, **f64) / d ** 0.5
    fc_weight[:h] *= fc_scale  # the activation's input (the gate when gated)
    return (
        torch.randn(m, d, **f64) * 2 + 0.5,
        1 + 0.2 * torch.randn(d, **f64),
        0.2 * torch.randn(d, **f64) if bias and norm == "layernorm" else None,
        fc_weight,
        0.2 * torch.randn(fc_out, **f64) if bias else None,
        torch.randn(d, h, **f64) / h ** 0.5,
        0.2 * torch.randn(d, **f64) if bias else None,
    )


def _on_device(inputs, dtype=torch.float32):
    device = backend_device("triton")
    return [t.to(device, dtype) if t is not None else None for t in inputs]


def _reference(inputs, dy, dtype, norm, activation, residual):
    """(y, pre_act, gradients) of fusedlm.reference run in `dtype` (None for absent parameters)."""
    leaves = [t.to(dtype).requires_grad_() if t is not None else None for t in inputs]
    x, nw, nb, fw, fb = leaves[:5]
    y = reference.layernorm_mlp(*leaves, eps=EPS, norm=norm, activation=activation, residual=residual)
    pre = torch.nn.functional.linear(reference.layer_norm(x, nw, nb, eps=EPS, norm=norm), fw, fb)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy.to(dtype)))
    return y.detach(), pre.detach(), [next(grads) if t is not None else None for t in leaves]


def _stats(x, rms):
    """(mean, rstd) of the rows of x as the reference takes them: float32 (float64 for float64 x)."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    var = x.pow(2).mean(-1) if rms else x.var(-1, unbiased=False)
    return x.mean(-1), torch.rsqrt(var + EPS)


def _check_case(case, dtype, fc_scale=1.0):
    from fusedlm.kernels import layernorm_mlp as kernels

    norm, activation, bias, residual, recompute, (m, d, h) = case
    rms = norm == "rmsnorm"
    inputs = _inputs(norm, activation, bias, m, d, h, fc_scale)
    dy = torch.randn(m, d, dtype=torch.float64)
    y64, pre64, grads64 = _reference(inputs, dy, torch.float64, norm, activation, residual)
    y_t, pre_t, grads_t = _reference(inputs, dy, dtype, norm, activation, residual)

    args = _on_device(inputs, dtype)
    y, mean, rstd, pre = kernels.layernorm_mlp_fwd(*args, EPS, rms, activation, residual, recompute)
    assert y.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    assert_within_budget(y.cpu(), y64, y_t, name="y")
    (mean64, rstd64), (mean32, rstd32) = (_stats(inputs[0].to(t), rms) for t in (torch.float64, dtype))
    assert_within_budget(rstd.cpu(), rstd64, rstd32, name="rstd", atol=ATOL[torch.float32])
    if rms:
        assert mean.shape == (0,)
    else:
        assert_within_budget(mean.cpu(), mean64, mean32, name="mean", atol=ATOL[torch.float32])
    if recompute:
        assert pre.shape == (0,)
    else:
        assert pre.dtype == dtype
        assert_within_budget(pre.cpu(), pre64, pre_t, name="pre_act")

    grads = kernels.layernorm_mlp_bwd(dy.to(args[0]), *args, pre, EPS, rms, activation, residual)
    for name, g, g64, g_t, param in zip(GRAD_NAMES, grads, grads64, grads_t, inputs):
        if param is None:
            assert g.shape == (0,), f"d{name}: gradient of an absent parameter must be empty, got {tuple(g.shape)}"
        else:
            assert g.dtype == dtype, f"d{name}: {g.dtype}"
            assert_within_budget(g.cpu(), g64, g_t, name=f"d{name}")
    return args, (mean, rstd, pre), grads


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_and_gradients_fp32(case):
    _check_case(case, torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_saturated_activations(activation):
    """Pre-activations of size ~40: exp overflows inside sigmoid / tanh, yet values and derivatives stay finite."""
    _check_case(("layernorm", activation, True, False, False, (17, 48, 64)), torch.float32, fc_scale=40.0)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                          reason="bf16 arithmetic is wrong in the Triton interpreter (no CUDA GPU here)")),
], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [
    ("layernorm", "geglu", True, True, False, (17, 48, 64)),
    ("rmsnorm", "gelu_tanh", False, False, True, (17, 48, 64)),
], ids=_case_id)
def test_forward_and_gradients_16bit(case, dtype):
    _check_case(case, dtype)


def test_recompute_matches_saved_pre_act_and_gradients_are_deterministic():
    """recompute=True recomputes pre_act bit for bit, so both paths give the same gradients; two backward
    runs give the same bits (no atomics)."""
    from fusedlm.kernels import layernorm_mlp as kernels

    args = _on_device(_inputs("layernorm", "swiglu", True, 33, 48, 64))
    dy = torch.randn(33, 48).to(args[0])
    saved = kernels.layernorm_mlp_fwd(*args, EPS, False, "swiglu", True, False)
    again = kernels.layernorm_mlp_fwd(*args, EPS, False, "swiglu", True, True)
    assert torch.equal(saved[0], again[0])
    grads = [kernels.layernorm_mlp_bwd(dy, *args, outputs[3], EPS, False, "swiglu", True)
             for outputs in (saved, again, saved)]
    for a, b, c in zip(*grads):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_relu_keeps_nan():
    """A NaN pre-activation stays NaN through relu, as torch.relu (tl.maximum(x, 0) gave 0): the
    token whose x holds a NaN comes out NaN, the others as the reference."""
    from fusedlm.kernels import layernorm_mlp as kernels

    args = list(_inputs("layernorm", "relu", False, 5, 16, 32))
    args[0][2, 3] = float("nan")
    ref = reference.layernorm_mlp(*args, eps=EPS, activation="relu", residual=False)
    y = kernels.layernorm_mlp_fwd(*_on_device(args), EPS, False, "relu", False, False)[0].cpu().double()
    assert y[2].isnan().all() and ref[2].isnan().all()
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(y[keep], ref[keep], rtol=1e-4, atol=1e-5)


def test_empty_batch():
    from fusedlm.kernels import layernorm_mlp as kernels

    args = _on_device(_inputs("layernorm", "gelu", True, 0, 48, 64))
    y, mean, rstd, pre = kernels.layernorm_mlp_fwd(*args, EPS, False, "gelu", True, False)
    assert y.shape == (0, 48) and mean.shape == rstd.shape == (0,) and pre.shape == (0, 64)
    grads = kernels.layernorm_mlp_bwd(torch.empty_like(y), *args, pre, EPS, False, "gelu", True)
    assert grads[0].shape == (0, 48)
    for g, param in zip(grads[1:], args[1:]):
        assert g.shape == param.shape and not g.any()


def test_bad_inputs_name_the_op_and_argument():
    from fusedlm.kernels import layernorm_mlp as kernels

    args = _on_device(_inputs("layernorm", "gelu", True, 4, 16, 32))
    with pytest.raises(TypeError, match="layernorm_mlp: the triton backend takes float32, bfloat16 or float16 x"):
        kernels.layernorm_mlp_fwd(args[0].double(), *args[1:], EPS, False, "gelu", True, False)
    with pytest.raises(ValueError, match="layernorm_mlp: activation must be one of"):
        kernels.layernorm_mlp_fwd(*args, EPS, False, "tanh", True, False)
    with pytest.raises(ValueError, match=r"layernorm_mlp: the triton backend takes x of shape \(M, d\)"):
        kernels.layernorm_mlp_fwd(args[0][None], *args[1:], EPS, False, "gelu", True, False)


def test_launch_classes_and_report_cover_every_table_entry():
    """A launch takes the entries of its class (dtype, GPU, widths multiple of 16 or not), and the GPU static
    report (static_report_specs) compiles every entry of every kernel's table in every dtype of its class."""
    from fusedlm.kernels import layernorm_mlp as kernels
    from fusedlm.kernels import layernorm_mlp_bwd as bwd_kernels

    f32, f16 = torch.empty(1), torch.empty(1, dtype=torch.float16)
    assert kernels._config_class({"X_ptr": f32, "n_rows": 7, "d": 96, "h": 128}) == "fp32"
    assert kernels._config_class({"X_ptr": f32, "n_rows": 16, "d": 97, "h": 128}) == "odd32"
    assert kernels._config_class({"A_ptr": f16, "n_rows": 16, "n_a": 64, "n_b": 200}) == "odd16"
    specs = {(s["kernel"], s["dtype"], s["config"])
             for s in kernels.static_report_specs() + bwd_kernels.static_report_specs()}
    for fn, table in kernels._TABLES.items():
        for cls, entries in table.items():
            for bm, bn, bk, warps, stages in entries:
                for dtype in kernels.CLASS_DTYPES[cls]:
                    config = f"{cls}: {bm}x{bn}x{bk}, {warps} warps, {stages} stages"
                    assert (fn.__name__, dtype, config) in specs, (fn.__name__, dtype, config)
