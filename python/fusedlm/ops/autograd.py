"""Autograd for the fused ops: torch.library.register_autograd, plus an eager fast path that runs
the same two functions.

Every fused op is a forward custom op and a backward custom op, linked by
`torch.library.register_autograd(fwd, backward, setup_context=...)`. That registration is what
torch.compile, torch.export, `torch.library.opcheck` and torch.jit.trace see. Called eagerly, it
runs through torch's generic Python autograd kernel: the dispatcher calls back into Python, which
fills in the default arguments, builds an autograd.Function and redispatches. torch.func's grad
transforms refuse it (torch.library's Function has no setup_context staticmethod for them).

`register` makes that registration and returns an `AutogradOp`, which the public functions call
with the forward op's arguments:

- in eager mode with a gradient to record, a plain torch.autograd.Function runs the op below the
  autograd key and then the same `setup_context` and `backward`;
- in eager mode without one (grad mode off, or no input that needs a gradient), the op below the
  autograd key;
- under torch.func transforms (grad, vjp, jacrev, vmap and their compositions, e.g. per-sample
  gradients as vmap(grad(f))), the same Function in functorch's form (forward without ctx, then
  setup_context): functorch runs its forward one level down and vmaps forward, setup_context and
  backward (generate_vmap_rule), the custom ops inside through torch's per-sample batching
  fallback. Forward-mode transforms (jvp, jacfwd) have no rule and raise;
- under torch.compile, torch.jit.trace and torch.func.functionalize, the op itself, through its
  registration (a trace records the custom op, not a Python Function it could not save).

Each op's Function is its own subclass, so that profiles and anomaly tracebacks name the op
(`fusedlm_layer_norm_fwdBackward`).

Every path runs the backward once-differentiable: the backward ops have no derivative, and a
second derivative (a gradient taken with create_graph=True and differentiated again, grad of
grad) raises an error naming the op instead of torch's fallback warning and zeros (under
torch.compile, AOTAutograd's own error on double backward comes first).

The time this saves is host time per call, which decides the speed of small ops (and of mid-sized
ones on a GPU, where the kernels take microseconds): `python -m fusedlm.benchmarks.overhead`.
"""
from __future__ import annotations

import torch

# False sends every eager call through the registration (torch.library's autograd kernel), as before
# this fast path existed; benchmarks/overhead.py times both. torch.func transforms take the Function
# either way (the registration has no functorch support).
EAGER_FAST_PATH = True

_below_autograd = torch._C._AutoDispatchBelowAutograd
# True inside a torch.func transform (grad, vmap, functionalize, ...)
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _differentiating_transform() -> bool:
    """Whether the innermost torch.func transform is grad (also vjp, jacrev), jvp or vmap: those take
    the functorch-form Function; functionalize takes the op itself (it has no rule for a Function)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    return retrieve_current_functorch_interpreter().key() != TransformType.Functionalize


class _Eager(torch.autograd.Function):
    """forward(ctx, op, *args): the op's outputs; backward: op.backward's gradients, one per arg.
    Subclassed once per op (AutogradOp), for the node's name."""

    @staticmethod
    def forward(ctx, op, *args):
        with _below_autograd():
            output = op.fwd(*args)
        op.setup_context(ctx, args, output)
        ctx.op = op
        return output

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[1:]  # as the registered backward sees it: one entry per op argument
        try:
            result = ctx.op.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (None, *result) if isinstance(result, tuple) else (None, result)


class _Func(torch.autograd.Function):
    """_Eager in the form torch.func transforms take: forward without ctx, then setup_context, and a
    vmap rule generated from the three (the ops inside through torch's batching fallback). Slower to
    call than _Eager (autograd.Function binds the arguments of this form by their signature), so it
    serves the transforms only. Subclassed once per op too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op, *args):
        if functorch_active():  # a level below the transform that called it (vmap): no autograd key to skip
            return op.fwd(*args)
        with _below_autograd():
            return op.fwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op = inputs[0]
        op.setup_context(ctx, inputs[1:], output)
        ctx.op = op

    backward = _Eager.backward


def _qualified_name(fwd) -> str:
    """"fusedlm::layer_norm_fwd": an OpOverload's name(), or a custom_op's qualified name."""
    return fwd._qualname if hasattr(fwd, "_qualname") else fwd.name()


class AutogradOp:
    """A forward custom op with its autograd: call it with the op's arguments."""

    def __init__(self, fwd, backward, setup_context):
        self.fwd, self.backward, self.setup_context = fwd, backward, setup_context
        name = _qualified_name(fwd)
        self.function = type(name.replace("::", "_"), (_Eager,), {})
        self.transformable = type(name.replace("::", "_"), (_Func,), {})

    def __call__(self, *args):
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.fwd(*args)
        if functorch_active() and _differentiating_transform():  # the registration has no functorch support
            return self.transformable.apply(self, *args)
        if not EAGER_FAST_PATH:
            return self.fwd(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.function.apply(self, *args)
        with _below_autograd():  # nothing to record: straight to the kernel
            return self.fwd(*args)


class _NoSecondDerivative(torch.autograd.Function):
    """forward(message, n, *tensors): tensors[:n] (a backward's gradients) as they are, now in the
    graph of all `tensors` (the gradients and the saved inputs they were computed from); backward
    raises `message`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, n, *tensors):
        # detach, not a view: the gradients stay changeable in place (a hook's g.mul_, g.add_)
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


class _SavedOnce:
    """A backward's ctx whose saved tensors are unpacked once, for the backward and for
    _once_differentiable (torch.utils.checkpoint allows one unpack per backward)."""

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", ctx.saved_tensors)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


def _once_differentiable(name: str, backward):
    """`backward` run under no_grad. The backward ops have no derivative of their own: torch's
    fallback would only warn and give zero second derivatives. With create_graph=True (and inside
    torch.func.grad, which always records) the gradients instead carry a node, linked to everything
    they were computed from, that raises naming the op if anything differentiates them."""
    message = (f"{name}: the fused op's backward is not differentiable: no second derivatives (a gradient "
               "taken with create_graph=True differentiated again, or torch.func.grad of torch.func.grad)")

    def wrapped(ctx, *grads):
        if not torch.is_grad_enabled():  # the usual backward, without create_graph
            return backward(ctx, *grads)
        ctx = _SavedOnce(ctx)
        with torch.no_grad():
            result = backward(ctx, *grads)
        sources = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not sources:
            return result
        outs = result if isinstance(result, tuple) else (result,)
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        marked = iter(_NoSecondDerivative.apply(message, len(tensors), *tensors, *sources))
        outs = tuple(next(marked) if isinstance(o, torch.Tensor) else o for o in outs)
        return outs if isinstance(result, tuple) else outs[0]

    return wrapped


def register(fwd, backward, setup_context) -> AutogradOp:
    """torch.library.register_autograd(fwd, backward, setup_context=setup_context), and the op to call;
    both paths run `backward` once-differentiable (_once_differentiable).

    fwd: a custom op (a torch.library.custom_op function, or an OpOverload such as
    torch.ops.fusedlm.layer_norm_fwd.default)."""
    public = _qualified_name(fwd).split("::")[-1].removesuffix("_triton").removesuffix("_fwd")  # layer_norm_fwd_triton: layer_norm
    backward = _once_differentiable(public, backward)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    return AutogradOp(fwd, backward, setup_context)
