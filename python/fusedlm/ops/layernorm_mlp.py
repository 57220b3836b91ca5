r"""fusedlm.layernorm_mlp: the pre-norm feed-forward sub-block in one op.

    y = x + proj(act(fc(norm(x))))        (without "x +" when residual=False)

    x: (..., d); fc_weight: (h, d), or (2h, d) for the gated activations (rows [0, h) gate a,
    [h, 2h) up b: swiglu = silu(a) * b, geglu = gelu(a) * b); proj_weight: (d, h).

Forward, per token (row) x of width d, statistics in float32 (see fusedlm.layer_norm):

    xn   = norm(x) = xhat * norm_weight (+ norm_bias),   xhat = (x - mean) * rstd   (rmsnorm: x * rstd)
    u    = xn fc_weight^T + fc_bias                      "pre_act", width fc_out = h or 2h
    a    = f(u)                                          (gated: f(u_a) * u_b), width h
    y    = (x +) a proj_weight^T + proj_bias

Backward, with g = dy:

    da   = g proj_weight                                 dproj_weight = g^T a,  dproj_bias = sum_rows g
    du   = da * f'(u)                                    (gated: du_a = da u_b f'(u_a), du_b = da f(u_a))
    dxn  = du fc_weight                                  dfc_weight = du^T xn,  dfc_bias = sum_rows du
    dx   = norm_backward(dxn) (+ g)                      dnorm_weight = sum_rows dxn * xhat, dnorm_bias = sum_rows dxn
    norm_backward: rstd * (dxn w - <dxn w> - xhat <dxn w xhat>)   (<.> row means; rmsnorm drops <dxn w>)

f and f' of each activation are listed in csrc/cpu/layernorm_mlp.h. Weight and bias gradients
are accumulated in float32 in a fixed order (the same bits on every run) and returned in the
parameters' dtype.

Saved for backward (besides the parameters): x and, with recompute=False, pre_act u (fc_out values
per token, x's dtype). Never the normalised x, the activation output, or anything of width 2h twice.
The norm statistics are not saved either: the backward recomputes them from x with the forward's
kernel (the same bits), one read of x it makes anyway to recompute xn. recompute=True keeps only x
and runs the fc GEMM again in backward. Per token at d=768, h=3072: eager nn.LayerNorm + nn.Linear
+ GELU + nn.Linear saves x, xn, u, a and the statistics (fp32 30728 bytes, bf16 15364); this op
15360 / 7680 (recompute=False, 49.99% of eager) or 3072 / 1536 (recompute=True, 10.0%).

The kernels process tokens in blocks (csrc/torch/layernorm_mlp.cpp: CPU; layernorm_mlp_cuda.cpp:
CUDA): per block the norm, the GEMMs (ATen: MKL/oneDNN, cuBLAS) and fused element-wise passes,
so that the (block, h) intermediates never exist for all tokens and stay in cache between the
GEMM that writes them and the one that reads them. All backends implement one schema:

    fwd(x, norm_weight, norm_bias?, fc_weight, fc_bias?, proj_weight, proj_bias?, eps, rms,
        activation, residual, recompute) -> (y, mean, rstd, pre_act)
        x (M, d) contiguous; y (M, d); mean (M,) float32 ((0,) for rmsnorm); rstd (M,) float32;
        pre_act (M, fc_out) in x's dtype, or (0,) when recompute: u as this backend's backward takes
        it, with fc_bias on CUDA and Triton (the GEMM's epilogue adds it), without it on the CPU (the
        element-wise passes add it where they read u; the forward then writes nothing back).
    bwd(dy, x, norm_weight, norm_bias?, fc_weight, fc_bias?, proj_weight, proj_bias?, pre_act, eps, rms,
        activation, residual)
        -> (dx, dnorm_weight, dnorm_bias, dfc_weight, dfc_bias, dproj_weight, dproj_bias)
        pre_act of shape (0,): recompute it. Gradients of absent biases have shape (0,).

Measured on the 2-core development CPU at 4096 x 768 x 3072 (forward+backward, interleaved medians,
`make bench`, 2026-12-01, commit 2687bcc; README.md has the table): the op's time over the six GEMMs
alone, fp32 1.001x (eager 1.08x), bf16 1.045x (eager 1.15x; 0.959x in the make bench of 5180730 the
same day: the bf16 ratio moves with the machine's noise around the issue's 1.04x). Timed apart, its
bf16 forward is 2.4 ms over the GEMMs' (its norm, activation and residual passes) and its backward
2.7 ms (its passes, less what the weight-gradient GEMMs in their faster orientation save);
recompute=True adds 1.04 (fp32) and 0.98 (bf16) of one GEMM's time. Every parallel region costs
milliseconds on a machine whose cores are taken by other processes, and the token blocks multiply
them (about ten per block): under load averages of 5-10 the ratio grows to 1.2-1.5x
(csrc/torch/layernorm_mlp.cpp has the block-size measurements).
On the CPU the forward's act is f of pre + bias in float32, the backward's f and f' are taken at
pre + bias rounded to x's dtype (csrc/cpu/layernorm_mlp_act.h).

`fusedlm::layernorm_mlp_fwd` / `_bwd` are the C++ ops (CPU and CUDA); `fusedlm::layernorm_mlp_fwd_triton`
/ `_bwd_triton` wrap the Triton launchers of kernels/layernorm_mlp.py.
"""
from __future__ import annotations

import torch

from fusedlm import dispatch, reference
from fusedlm.ops import autograd
from fusedlm.validation import check_choice, check_flag, check_number, check_same, check_shape, check_tensor

OP = "layernorm_mlp"


# --- Triton custom ops --------------------------------------------------------------------

@torch.library.custom_op("fusedlm::layernorm_mlp_fwd_triton", mutates_args=())
def _fwd_triton(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
    eps: float, rms: bool, activation: str, residual: bool, recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import layernorm_mlp as kernels

    return kernels.layernorm_mlp_fwd(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                                     eps, rms, activation, residual, recompute)


@torch.library.custom_op("fusedlm::layernorm_mlp_bwd_triton", mutates_args=())
def _bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
    fc_weight: torch.Tensor, fc_bias: torch.Tensor | None, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
    pre_act: torch.Tensor, eps: float, rms: bool, activation: str, residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import layernorm_mlp as kernels

    return kernels.layernorm_mlp_bwd(dy, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                                     pre_act, eps, rms, activation, residual)


# --- fake (meta) implementations, shared by the C++ and Triton ops -------------------------

def _fwd_fake(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps, rms, activation,
              residual, recompute):
    m = x.shape[0]
    mean = x.new_empty((0,) if rms else (m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    pre_act = x.new_empty((0,) if recompute else (m, fc_weight.shape[0]))
    return torch.empty_like(x), mean, rstd, pre_act


def _bwd_fake(dy, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, pre_act, eps, rms,
              activation, residual):
    def grad(p, like):
        return torch.empty_like(p) if p is not None else like.new_empty((0,))

    return (torch.empty_like(x), torch.empty_like(norm_weight), grad(norm_bias, norm_weight),
            torch.empty_like(fc_weight), grad(fc_bias, fc_weight), torch.empty_like(proj_weight),
            grad(proj_bias, proj_weight))


# --- autograd, shared: forward op -> backward op -------------------------------------------

def _setup_context(ctx, inputs, output):
    x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps, rms, activation, residual, _ = inputs
    _, mean, rstd, pre_act = output
    ctx.mark_non_differentiable(mean, rstd, pre_act)
    # The statistics and pre_act never get a gradient: without this the engine would hand the
    # backward a zero-filled (tokens, fc_out) dpre_act on every call (~2% of a CPU step).
    ctx.set_materialize_grads(False)
    # Not the statistics: the backward recomputes them from x with the forward's kernel (the same bits).
    ctx.save_for_backward(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, pre_act)
    ctx.eps, ctx.rms, ctx.activation, ctx.residual = eps, rms, activation, residual


def _make_backward(bwd_op):
    def backward(ctx, dy, dmean, drstd, dpre_act):
        x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, pre_act = ctx.saved_tensors
        if dy is None:  # y is in the graph but got no gradient: every input gradient is zero
            return (None,) * 12
        dx, dnw, dnb, dfcw, dfcb, dpw, dpb = bwd_op(
            dy.contiguous(), x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, pre_act, ctx.eps,
            ctx.rms, ctx.activation, ctx.residual,
        )
        return (dx, dnw, dnb if norm_bias is not None else None, dfcw, dfcb if fc_bias is not None else None,
                dpw, dpb if proj_bias is not None else None, None, None, None, None, None)

    return backward


# backend -> the forward op with its autograd (fusedlm.ops.autograd); "cpu" and "cuda" share the C++
# op that carries both kernels.
_FWD = {}
torch.library.register_fake("fusedlm::layernorm_mlp_fwd_triton")(_fwd_fake)
torch.library.register_fake("fusedlm::layernorm_mlp_bwd_triton")(_bwd_fake)
_FWD["triton"] = autograd.register(_fwd_triton, _make_backward(_bwd_triton), _setup_context)
if dispatch.has_cpp_kernel("layernorm_mlp_fwd", "CPU") or dispatch.has_cpp_kernel("layernorm_mlp_fwd", "CUDA"):
    torch.library.register_fake("fusedlm::layernorm_mlp_fwd")(_fwd_fake)
    torch.library.register_fake("fusedlm::layernorm_mlp_bwd")(_bwd_fake)
    native = autograd.register(torch.ops.fusedlm.layernorm_mlp_fwd.default,
                               _make_backward(torch.ops.fusedlm.layernorm_mlp_bwd.default), _setup_context)
    _FWD.update(cpu=native, cuda=native)


# --- the public function -------------------------------------------------------------------

def layernorm_mlp(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, *, eps=1e-5,
                  norm="layernorm", activation="gelu_tanh", residual=True, recompute=False, backend="auto"):
    """y = x + proj(act(fc(norm(x)))) (no "x +" when residual=False); shapes and math in the module docstring.

    Args:
        x: (..., d) float32 or bfloat16 (float16 on the GPU backends; float64 on the reference).
        norm_weight, norm_bias: (d,); norm_bias must be None for rmsnorm.
        fc_weight: (h, d), or (2h, d) for "swiglu" / "geglu"; fc_bias: (fc_weight.shape[0],) or None.
        proj_weight: (d, h); proj_bias: (d,) or None. Every tensor in x's dtype and on x's device.
        norm: "layernorm" or "rmsnorm". activation: "gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu".
        recompute: keep only x and the norm statistics for backward and recompute the fc GEMM there
            (one more GEMM, far less memory); the reference backend ignores it.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see fusedlm.dispatch).

    Returns y of x's shape and dtype.
    """
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
    check_number(OP, "eps", eps, float32=True)
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be > 0, got {eps}")
    check_flag(OP, "residual", residual)
    check_flag(OP, "recompute", recompute)

    chosen = dispatch.resolve(OP, backend, x.device, native_op="layernorm_mlp_fwd", triton=True, dtype=x.dtype)
    if chosen == "reference":
        return reference.layernorm_mlp(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                                       eps=eps, norm=norm, activation=activation, residual=residual)

    fwd = _FWD[chosen]

    def contiguous(t):
        return t.contiguous() if t is not None else None

    # With no gradient to take (inference, torch.no_grad) nothing is saved, so the forward runs as with
    # recompute: no (tokens, fc_out) pre_act is written, only block buffers (the same y, bit for bit).
    params = (x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias)
    saves = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    shape = x.shape
    y, _, _, _ = fwd(x.reshape(-1, d).contiguous(), norm_weight.contiguous(), contiguous(norm_bias),
                     fc_weight.contiguous(), contiguous(fc_bias), proj_weight.contiguous(), contiguous(proj_bias),
                     float(eps), norm == "rmsnorm", activation, bool(residual), bool(recompute) or not saves)
    return y.view(shape)
