r"""The softmax output for training: the vocabulary projection with its cross-entropy loss.
(Generation, lm_head_softmax and sample, lives in lm_head.py.)

    linear_cross_entropy: loss = CE(softcap(x W^T + b), target) (+ z_loss * lse^2 per token)

linear_cross_entropy, per token with logits z = x W^T + b (V of them), eps = label_smoothing:

    c = softcap * tanh(z / softcap)   (c = z without softcap)
    lse = log sum_v exp(c_v)
    loss = (1 - eps) (lse - c_t) + eps (lse - mean_v c_v) + z_loss * lse^2      (0 when t == ignore_index)

and its gradient, with p = softmax(c) and g the upstream gradient of the token's loss:

    dc_v = g * ((1 + 2 z_loss lse) p_v - (1 - eps) [v == t] - eps / V)
    dz_v = dc_v * (1 - (c_v / softcap)^2)                    (the softcap's chain rule)
    dx = dz W,   dW = dz^T x,   db = sum_tokens dz             (dW, db accumulated in float32)

The C++ backends ("cpu", "cuda") never hold the (N, V) logits. A buffer takes a GEMM's output for
a block of the vocabulary, one fused pass computes max, sum, lse and loss (merged into a running
log-sum-exp per token across blocks), and in backward overwrites the buffer with dz, after which
two GEMMs add to dx and produce that block of dW. "cuda" takes every token in each block (a buffer
of at most 256 MiB in x's dtype, csrc/torch/softmax_output_cuda.cpp, kernels in
csrc/cuda/softmax_output.cu: a block per row), so that each block of dW is one GEMM over all N and
only dx is summed across blocks. "cpu" walks tiles of up to 8192 tokens x a block of the
vocabulary in a float32 buffer of at most 64 MiB (csrc/torch/softmax_output.cpp, kernels in
csrc/cpu/softmax_output.cpp: OpenMP + AVX-512), sized for the caches. Backward recomputes the
logits instead of storing anything V-sized: saved for backward are x, W, b, target and lse (4
bytes per token). Forward costs one GEMM (2NVd flops), backward three.

The C++ op schema:

    linear_cross_entropy_fwd(x, weight, bias?, target, ignore_index, label_smoothing, z_loss, softcap?)
        -> (loss, lse)
        x: (N, d) fp32/bf16/fp16 contiguous; weight: (V, d), bias: (V,) of x's dtype; target: (N,) int64.
        loss: (N,) float32 per token (0 where ignored); lse: (N,) float32 for every token.
    linear_cross_entropy_bwd(dloss, x, weight, bias?, target, lse, ignore_index, label_smoothing, z_loss,
                             softcap?, has_bias) -> (dx, dweight, dbias)
        dloss: (N,) float32, the upstream gradient of each token's loss; dbias is (0,) without bias.

The reduction ("mean" over the non-ignored tokens, 0 when all are ignored; "sum"; "none") is done
here on the per-token losses, so autograd hands the op a per-token gradient that covers every
reduction and any upstream scaling. lse is returned with return_lse=True but carries no gradient.
A target outside [0, V) that is not ignore_index raises for CPU tensors (checked here, except
under torch.compile and torch.func transforms); the kernels never read it (that token's loss is
NaN, its gradient 0).

The Triton backend ("triton": kernels/softmax_output.py, fusedlm::linear_cross_entropy_{fwd,bwd}_triton)
takes the same schema. Forward in the Cut Cross-Entropy manner: no buffer at all; logit tiles live in
registers and the log-sum-exp is taken online over vocabulary blocks. Backward by vocabulary slabs of
at most 256 MiB (N x C): per slab cuBLAS recomputes the logits, a Triton kernel turns them into dz in
place, and cuBLAS GEMMs write dW's rows of the slab and add to a float32 dX; deterministic, no atomics.
It shares the fake and autograd registrations below with the C++ ops.

Backends for linear_cross_entropy: "cpu", "cuda", "triton" and "reference".
"""
from __future__ import annotations

import torch

from fusedlm import dispatch, reference
from fusedlm.ops import autograd
from fusedlm.validation import check_choice, check_flag, check_number, check_same, check_shape, check_tensor

TARGET_DTYPES = (torch.int64, torch.int32)


def _check_projection(op, x, weight, bias):
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=2)
    check_same(op, "x", x, "weight", weight)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape (V, {x.shape[-1]}) (d from x), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_same(op, "x", x, "bias", bias)
        check_shape(op, "bias", bias, (weight.shape[0],), " (V,)")


# --- Triton custom ops (kernels/softmax_output.py), same schema as the C++ ops ----------------

@torch.library.custom_op("fusedlm::linear_cross_entropy_fwd_triton", mutates_args=())
def _fwd_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import softmax_output as kernels

    return kernels.linear_cross_entropy_fwd(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap)


@torch.library.custom_op("fusedlm::linear_cross_entropy_bwd_triton", mutates_args=())
def _bwd_triton(
    dloss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    lse: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float | None,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fusedlm.kernels import softmax_output as kernels

    return kernels.linear_cross_entropy_bwd(dloss, x, weight, bias, target, lse, ignore_index, label_smoothing,
                                            z_loss, softcap, has_bias)


# --- fake (meta) implementations and autograd, shared by the C++ and Triton ops --------------

def _fwd_fake(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap):
    n = x.shape[0]
    return x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


def _bwd_fake(dloss, x, weight, bias, target, lse, ignore_index, label_smoothing, z_loss, softcap, has_bias):
    dbias = weight.new_empty((weight.shape[0],)) if has_bias else x.new_empty((0,))
    return torch.empty_like(x), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap = inputs
    loss, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(x, weight, bias, target, lse)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap)


def _make_backward(bwd_op):
    def backward(ctx, dloss, dlse):
        x, weight, bias, target, lse = ctx.saved_tensors
        dx, dweight, dbias = bwd_op(dloss.float().contiguous(), x, weight, bias, target, lse, *ctx.options,
                                    bias is not None)
        return dx, dweight, (dbias if bias is not None else None), None, None, None, None, None

    return backward


# backend -> the forward op with its autograd (fusedlm.ops.autograd); "cpu" and "cuda" share the C++
# op that carries both kernels.
_FWD = {}
torch.library.register_fake("fusedlm::linear_cross_entropy_fwd_triton")(_fwd_fake)
torch.library.register_fake("fusedlm::linear_cross_entropy_bwd_triton")(_bwd_fake)
_FWD["triton"] = autograd.register(_fwd_triton, _make_backward(_bwd_triton), _setup_context)
if dispatch.has_cpp_kernel("linear_cross_entropy_fwd", "CPU") or \
        dispatch.has_cpp_kernel("linear_cross_entropy_fwd", "CUDA"):
    torch.library.register_fake("fusedlm::linear_cross_entropy_fwd")(_fwd_fake)
    torch.library.register_fake("fusedlm::linear_cross_entropy_bwd")(_bwd_fake)
    native = autograd.register(torch.ops.fusedlm.linear_cross_entropy_fwd.default,
                               _make_backward(torch.ops.fusedlm.linear_cross_entropy_bwd.default), _setup_context)
    _FWD.update(cpu=native, cuda=native)


# --- the public functions --------------------------------------------------------------------

def linear_cross_entropy(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False, backend="auto"):
    """Cross-entropy of the projection x @ weight.T + bias against target, as
    F.cross_entropy(F.linear(x, weight, bias), target, ...) with optional softcap and z_loss.

    Args:
        x: (..., d) float32, bfloat16 or float16 (float64 on the reference backend).
        weight: (V, d), bias: (V,) or None, both of x's dtype. target: (...) int64 or int32.
        ignore_index: tokens with this target add 0 to the loss and are left out of the mean.
        reduction: "mean", "sum" or "none" (per-token losses of target's shape).
        label_smoothing: eps in [0, 1); z_loss: >= 0, adds z_loss * lse^2 per token;
        softcap: None, or > 0: logits -> softcap * tanh(logits / softcap).
        return_lse: also return lse (target's shape, float32, no gradient on the kernel backends).
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see fusedlm.dispatch).

    Returns the float32 loss (a scalar, or target's shape for "none"), and lse with return_lse.
    """
    op = "linear_cross_entropy"
    _check_projection(op, x, weight, bias)
    check_tensor(op, "target", target, dtypes=TARGET_DTYPES, allow_empty=x.numel() == 0)
    check_shape(op, "target", target, tuple(x.shape[:-1]), " (the leading dimensions of x)")
    if target.device != x.device:
        raise ValueError(f"{op}: target is on {target.device} but x is on {x.device}")
    check_choice(op, "reduction", reduction, reference.REDUCTIONS)
    check_number(op, "ignore_index", ignore_index, integer=True)
    check_number(op, "label_smoothing", label_smoothing)
    check_number(op, "z_loss", z_loss, float32=True)
    if softcap is not None:
        check_number(op, "softcap", softcap, float32=True)
    check_flag(op, "return_lse", return_lse)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{op}: softcap must be > 0 or None, got {softcap}")
    # A free check on the host for CPU tensors (a data-dependent branch, so not while compiling or
    # under a torch.func transform); the kernels guard their reads instead.
    if target.device.type == "cpu" and not torch.compiler.is_compiling() and not autograd.functorch_active():
        bad = (target != ignore_index) & ((target < 0) | (target >= weight.shape[0]))
        if bad.any():
            first = target[bad][0].item()
            raise ValueError(f"{op}: target holds {first}, outside [0, {weight.shape[0]}) and not ignore_index "
                             f"({ignore_index})")
    chosen = dispatch.resolve(op, backend, x.device, native_op="linear_cross_entropy_fwd", triton=True,
                              dtype=x.dtype)
    if chosen == "reference":
        return reference.linear_cross_entropy(x, weight, target.long(), bias, ignore_index=ignore_index,
                                              reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                              softcap=softcap, return_lse=return_lse)

    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    t1 = target.reshape(-1).long().contiguous()
    fwd = _FWD[chosen]
    loss, lse = fwd(
        x2, weight.contiguous(), bias.contiguous() if bias is not None else None, t1, int(ignore_index),
        float(label_smoothing), float(z_loss), float(softcap) if softcap is not None else None)
    if reduction == "mean":
        count = (t1 != ignore_index).sum().clamp(min=1).to(loss.dtype)
        loss = loss.sum() / count
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.view(target.shape)
    return (loss, lse.view(target.shape)) if return_lse else loss

