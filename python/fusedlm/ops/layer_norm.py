r"""Fused LayerNorm / RMSNorm, optionally with the residual add before it.

Forward, per row of h = x (+ residual), width N, in float32 whatever the input dtype:

    layernorm:  mean = sum(h) / N,  rstd = 1 / sqrt(sum((h - mean)^2) / N + eps),  xhat = (h - mean) * rstd
    rmsnorm:                        rstd = 1 / sqrt(sum(h^2) / N + eps),            xhat = h * rstd
    y = xhat * weight (+ bias)

Backward, with g = dy * weight and the row means <.>:

    layernorm:  dh = rstd * (g - <g> - xhat * <g * xhat>)
    rmsnorm:    dh = rstd * (g - xhat * <g * xhat>)
    dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)   (accumulated in float32)

With `residual`, the op returns (y, h) and the gradient reaching h from later use of the
residual stream is added to dh; dx = dresidual = dh. Memory traffic per row, forward: read x,
residual, write y, h (4 tensors; eager add + norm: 5); backward: read dy, dh_in, h, write dx
(4; eager: 6). Saved for backward: h (or x), weight, and 4-8 bytes of statistics per row.

The three kernels share one op schema:

    fwd(x, weight, bias?, residual?, eps, rms) -> (y, h, mean, rstd)
        x, residual: (M, N) contiguous; h is (0,) without residual; mean is (0,) for rmsnorm;
        mean and rstd are (M,) float32.
    bwd(dy, dh?, h, weight, mean, rstd, rms, has_bias) -> (dx, dweight, dbias)
        dbias is (0,) without bias; dweight and dbias have weight's dtype.

`fusedlm::layer_norm_fwd` / `layer_norm_bwd` are the C++ ops (CPU and CUDA kernels, csrc/torch/layer_norm*.cpp);
`fusedlm::layer_norm_fwd_triton` / `layer_norm_bwd_triton` wrap the Triton launchers (kernels/layer_norm.py).
"""
from __future__ import annotations

import torch

from fusedlm import dispatch, reference
from fusedlm.ops import autograd
from fusedlm.validation import check_choice, check_number, check_same, check_shape, check_tensor

OP = "layer_norm"


# --- Triton custom ops --------------------------------------------------------------------

@torch.library.custom_op("fusedlm::layer_norm_fwd_triton", mutates_args=())
def _fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
    eps: float, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import layer_norm as kernels

    return kernels.layer_norm_fwd(x, weight, bias, residual, eps, rms)


@torch.library.custom_op("fusedlm::layer_norm_bwd_triton", mutates_args=())
def _bwd_triton(
    dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, rms: bool, has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import layer_norm as kernels

    return kernels.layer_norm_bwd(dy, dh, h, weight, mean, rstd, rms, has_bias)


# --- fake (meta) implementations, shared by the C++ and Triton ops -------------------------

def _fwd_fake(x, weight, bias, residual, eps, rms):
    m = x.shape[0]
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0,) if rms else (m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    return y, h, mean, rstd


def _bwd_fake(dy, dh, h, weight, mean, rstd, rms, has_bias):
    dbias = torch.empty_like(weight) if has_bias else weight.new_empty((0,))
    return torch.empty_like(h), torch.empty_like(weight), dbias


# --- autograd, shared: forward op -> backward op -------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms = inputs
    y, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.rms = rms
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None


def _make_backward(bwd_op):
    def backward(ctx, dy, dh, dmean, drstd):
        h, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = bwd_op(
            dy.contiguous(), dh.contiguous() if ctx.has_residual else None,
            h, weight, mean, rstd, ctx.rms, ctx.has_bias,
        )
        if not ctx.has_residual:
            return dx, dweight, (dbias if ctx.has_bias else None), None, None, None
        # dx is the gradient of both x and residual. Handed one tensor object twice, the engine would copy
        # it into x.grad (AccumulateGrad takes a gradient only when nothing else holds it, and the
        # residual's path still does): x gets its own object over dx's storage. Where both could end up
        # as some leaf's .grad (x or residual a leaf), _CopyGrad gives the residual's path a copy.
        return dx.view_as(dx), dweight, (dbias if ctx.has_bias else None), dx, None, None

    return backward


class _CopyGrad(torch.autograd.Function):
    """Identity whose backward hands on a copy of the gradient.

    The backward returns dx's storage as the gradient of both x and residual. When x or residual is
    a leaf (its .grad is kept) and both need a gradient, the engine could store that storage as two
    leaves' .grad (x.grad and residual.grad, or x.grad and the .grad of the leaf residual was
    viewed or cloned from), and an in-place update of one (accumulation over a second backward,
    zero_grad, gradient clipping) would change the other; this gives residual's path its own copy.
    Inside a model both are activations and dx flows on to their producers without a copy.
    """

    generate_vmap_rule = True  # torch.func transforms take it too (functorch style: setup_context)

    @staticmethod
    def forward(t):
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


# backend -> the forward op with its autograd (fusedlm.ops.autograd); "cpu" and "cuda" share the C++
# op that carries both kernels.
_FWD = {}
torch.library.register_fake("fusedlm::layer_norm_fwd_triton")(_fwd_fake)
torch.library.register_fake("fusedlm::layer_norm_bwd_triton")(_bwd_fake)
_FWD["triton"] = autograd.register(_fwd_triton, _make_backward(_bwd_triton), _setup_context)
if dispatch.has_cpp_kernel("layer_norm_fwd", "CPU") or dispatch.has_cpp_kernel("layer_norm_fwd", "CUDA"):
    torch.library.register_fake("fusedlm::layer_norm_fwd")(_fwd_fake)
    torch.library.register_fake("fusedlm::layer_norm_bwd")(_bwd_fake)
    native = autograd.register(torch.ops.fusedlm.layer_norm_fwd.default,
                               _make_backward(torch.ops.fusedlm.layer_norm_bwd.default), _setup_context)
    _FWD.update(cpu=native, cuda=native)


# --- the public function -------------------------------------------------------------------

def layer_norm(x, weight, bias=None, *, eps=1e-5, norm="layernorm", residual=None, backend="auto"):
    """LayerNorm or RMSNorm over the last dimension, optionally after adding `residual`.

    Args:
        x: (..., N) float32, bfloat16 or float16 (float64 on the reference backend).
        weight: (N,), x's dtype. bias: (N,) or None; must be None for rmsnorm.
        eps: added to the variance (layernorm) or the mean square (rmsnorm).
        norm: "layernorm" or "rmsnorm".
        residual: None, or a tensor of x's shape and dtype; then the op returns
            (norm(x + residual), x + residual): the residual add and the next norm in one pass.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see fusedlm.dispatch).

    Returns y of x's shape and dtype, or (y, x + residual) when residual is given.
    """
    check_tensor(OP, "x", x, min_ndim=1)
    check_choice(OP, "norm", norm, reference.NORMS)
    n = x.shape[-1]
    check_tensor(OP, "weight", weight, ndim=1)
    check_same(OP, "x", x, "weight", weight)
    check_shape(OP, "weight", weight, (n,), " (the last dimension of x)")
    if bias is not None:
        if norm == "rmsnorm":
            raise ValueError(f"{OP}: rmsnorm takes no bias, got a bias of shape {tuple(bias.shape)}")
        check_tensor(OP, "bias", bias, ndim=1)
        check_same(OP, "x", x, "bias", bias)
        check_shape(OP, "bias", bias, (n,), " (the last dimension of x)")
    if residual is not None:
        check_tensor(OP, "residual", residual, min_ndim=1)
        check_same(OP, "x", x, "residual", residual)
        check_shape(OP, "residual", residual, tuple(x.shape), " (the shape of x)")
    check_number(OP, "eps", eps, float32=True)
    if not eps > 0:
        raise ValueError(f"{OP}: eps must be > 0, got {eps}")

    chosen = dispatch.resolve(OP, backend, x.device, native_op="layer_norm_fwd", triton=True, dtype=x.dtype)
    if chosen == "reference":
        return reference.layer_norm(x, weight, bias, eps=eps, norm=norm, residual=residual)

    fwd = _FWD[chosen]
    if residual is not None and residual.requires_grad and x.requires_grad and (residual.is_leaf or x.is_leaf):
        residual = _CopyGrad.apply(residual)
    shape, rows = x.shape, x.dim() == 2  # (M, N) needs no view (each view is one more autograd node)
    x2 = (x if rows else x.reshape(-1, n)).contiguous()
    r2 = (residual if rows else residual.reshape(-1, n)).contiguous() if residual is not None else None
    y, h, _, _ = fwd(x2, weight.contiguous(), bias.contiguous() if bias is not None else None, r2, float(eps),
                     norm == "rmsnorm")
    if residual is None:
        return y if rows else y.view(shape)
    return (y, h) if rows else (y.view(shape), h.view(shape))
