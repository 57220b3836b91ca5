r"""fusedlm.layernorm_mlp: the pre-norm feed-forward sub-block in one op.

    y = x + proj(act(fc(norm(x))))        (without "x +" when residual=False)

    x: (..., d); fc_weight: (h, d), or (2h, d) for the gated activations (rows [0, h) gate a,
    [h, 2h) up b: swiglu = silu(a) * b, geglu = gelu(a) * b); proj_weight: (d, h).

Backends: "reference" today; the fused kernels arrive with the layernorm+feedforward issue,
and until then asking for "cpu", "cuda" or "triton" is a BackendError.
"""
from __future__ import annotations

from fusedlm import dispatch, reference
from fusedlm.validation import check_choice, check_same, check_shape, check_tensor

OP = "layernorm_mlp"


def layernorm_mlp(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, eps=1e-5,
                  norm="layernorm", activation="gelu_tanh", residual=True, recompute=False, backend="auto"):
    """y = x + proj(act(fc(norm(x)))); see the module docstring for shapes. `recompute` trades
    memory for one more GEMM in the fused backends; the reference ignores it."""
    check_choice(OP, "norm", norm, reference.NORMS)
    check_choice(OP, "activation", activation, reference.ACTIVATIONS)
    check_tensor(OP, "x", x, min_ndim=1)
    d = x.shape[-1]
    check_tensor(OP, "norm_weight", norm_weight, ndim=1)
    check_shape(OP, "norm_weight", norm_weight, (d,), " (the last dimension of x)")
    if norm_bias is not None:
        if norm == "rmsnorm":
            raise ValueError(f"{OP}: rmsnorm takes no norm_bias, got one of shape {tuple(norm_bias.shape)}")
        check_tensor(OP, "norm_bias", norm_bias, ndim=1)
        check_shape(OP, "norm_bias", norm_bias, (d,), " (the last dimension of x)")
    check_tensor(OP, "fc_weight", fc_weight, ndim=2)
    if fc_weight.shape[1] != d:
        raise ValueError(f"{OP}: fc_weight must have shape (h, {d}), got {tuple(fc_weight.shape)}")
    fc_out = fc_weight.shape[0]
    if activation in reference.GATED_ACTIVATIONS and fc_out % 2:
        raise ValueError(f"{OP}: a gated activation ({activation}) needs fc_weight of height 2h, got odd height {fc_out}")
    h = fc_out // 2 if activation in reference.GATED_ACTIVATIONS else fc_out
    if fc_bias is not None:
        check_tensor(OP, "fc_bias", fc_bias, ndim=1)
        check_shape(OP, "fc_bias", fc_bias, (fc_out,), " (the height of fc_weight)")
    check_tensor(OP, "proj_weight", proj_weight, ndim=2)
    check_shape(OP, "proj_weight", proj_weight, (d, h), " (d, h)")
    if proj_bias is not None:
        check_tensor(OP, "proj_bias", proj_bias, ndim=1)
        check_shape(OP, "proj_bias", proj_bias, (d,), " (d,)")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("fc_weight", fc_weight),
                    ("fc_bias", fc_bias), ("proj_weight", proj_weight), ("proj_bias", proj_bias)):
        if t is not None:
            check_same(OP, "x", x, name, t)
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be > 0, got {eps}")
    dispatch.resolve(OP, backend, x.device, native_op=None, triton=False)
    return reference.layernorm_mlp(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                                   eps=eps, norm=norm, activation=activation, residual=residual)
