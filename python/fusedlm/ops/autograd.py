"""Autograd for the fused ops: torch.library.register_autograd, plus an eager fast path that runs
the same two functions.

Every fused op is a forward custom op and a backward custom op, linked by
`torch.library.register_autograd(fwd, backward, setup_context=...)`. That registration is what
torch.compile, torch.export, `torch.library.opcheck`, torch.jit.trace and torch.func.vmap see
(torch.func's grad transforms refuse it: torch.library's Function has no setup_context staticmethod
for them, with or without this module). Called eagerly, it runs through
torch's generic Python autograd kernel: the dispatcher calls back into Python, which fills in the
default arguments, builds an autograd.Function and redispatches.

`register` makes that registration and returns an `AutogradOp`, which the public functions call
with the forward op's arguments:

- in eager mode with a gradient to record, a plain torch.autograd.Function runs the op below the
  autograd key and then the same `setup_context` and `backward`;
- in eager mode without one (grad mode off, or no input that needs a gradient), the op below the
  autograd key;
- under torch.compile, torch.jit.trace and torch.func transforms, the op itself, through its
  registration (a trace records the custom op, not a Python Function it could not save).

Each op's Function is its own subclass, so that profiles and anomaly tracebacks name the op
(`fusedlm_layer_norm_fwdBackward`).

The time this saves is host time per call, which decides the speed of small ops (and of mid-sized
ones on a GPU, where the kernels take microseconds): `python -m fusedlm.benchmarks.overhead`.
"""
from __future__ import annotations

import torch

# False sends every call through the registration (torch.library's autograd kernel), as before this
# fast path existed; benchmarks/overhead.py times both.
EAGER_FAST_PATH = True

_below_autograd = torch._C._AutoDispatchBelowAutograd
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


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


class AutogradOp:
    """A forward custom op with its autograd: call it with the op's arguments."""

    def __init__(self, fwd, backward, setup_context):
        self.fwd, self.backward, self.setup_context = fwd, backward, setup_context
        # "fusedlm::layer_norm_fwd" (an OpOverload's name()) or a custom_op's qualified name
        name = fwd._qualname if hasattr(fwd, "_qualname") else fwd.name()
        self.function = type(name.replace("::", "_"), (_Eager,), {})

    def __call__(self, *args):
        if (not EAGER_FAST_PATH or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or _functorch_active()):
            return self.fwd(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.function.apply(self, *args)
        with _below_autograd():  # nothing to record: straight to the kernel
            return self.fwd(*args)


def register(fwd, backward, setup_context) -> AutogradOp:
    """torch.library.register_autograd(fwd, backward, setup_context=setup_context), and the op to call.

    fwd: a custom op (a torch.library.custom_op function, or an OpOverload such as
    torch.ops.fusedlm.layer_norm_fwd.default)."""
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    return AutogradOp(fwd, backward, setup_context)
