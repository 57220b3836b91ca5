"""fusedlm.ops.autograd: the eager fast path and torch.library's registration run the same
setup_context and backward, so every op gives the same bits both ways, with every input needing a
gradient and with only some; calls with nothing to record, and traces, take the paths they should.
(torch.compile and opcheck, which take the registration, are in each op's own test file.)"""
from __future__ import annotations

import io

import pytest
import torch

import fusedlm
from fusedlm.ops import autograd

from harness import backend_device, backend_params

OPS = ["layer_norm", "layer_norm_2d", "attention", "layernorm_mlp", "linear_cross_entropy", "lm_head_softmax"]


def _case(op, backend):
    """(fn of the list of inputs, inputs) for `op` on `backend`."""
    g = torch.Generator().manual_seed(0)
    device = backend_device(backend)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).float().to(device)

    x, w, b, r = t(3, 5, 48), t(48), t(48), t(3, 5, 48)
    if op == "layer_norm":
        return lambda a: fusedlm.layer_norm(*a[:3], residual=a[3], backend=backend), (x, w, b, r)
    if op == "layer_norm_2d":  # the op's outputs returned as they are, without views
        return lambda a: fusedlm.layer_norm(*a, backend=backend), (t(15, 48), w, b)
    if op == "attention":
        q, k = t(2, 4, 17, 16), t(2, 2, 23, 16)
        return lambda a: fusedlm.attention(*a, causal=True, return_lse=True, backend=backend), (q, k, k.flip(2))
    if op == "layernorm_mlp":
        mlp = (x, w, b, t(64, 48, scale=0.2), t(64), t(48, 64, scale=0.2), t(48))
        return lambda a: fusedlm.layernorm_mlp(*a, activation="silu", backend=backend), mlp
    if op == "linear_cross_entropy":
        target = torch.randint(0, 97, (3, 5), generator=g).to(device)
        target[0, 0] = -100
        return (lambda a: fusedlm.linear_cross_entropy(a[0], a[1], target, a[2], reduction="none", backend=backend),
                (x, t(97, 48, scale=0.2), t(97)))
    return lambda a: fusedlm.lm_head_softmax(*a, temperature=0.7, backend=backend), (x, t(97, 48), t(97))


def _node_names(node):
    """The class names of every autograd node behind `node`."""
    names, todo, seen = set(), [node], set()
    while todo:
        n = todo.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        names.add(type(n).__name__)
        todo.extend(f for f, _ in n.next_functions)
    return names


def _weighted_loss(out, keep=None):
    """sum(o * w) over the outputs that carry a gradient (`keep`; by default those that require one
    now), with fixed random weights w drawn in output order: the same loss eagerly and under torch.func."""
    outs = out if isinstance(out, tuple) else (out,)
    keep = [o.requires_grad for o in outs] if keep is None else keep
    gen = torch.Generator().manual_seed(1)
    return sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o, k in zip(outs, keep) if k)


def _run(fn, inputs, needs):
    leaves = [v.clone().requires_grad_(n) for v, n in zip(inputs, needs)]
    out = fn(leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = _weighted_loss(outs)
    nodes = _node_names(outs[0].grad_fn)
    loss.backward()
    return outs, [v.grad for v in leaves], nodes


@pytest.mark.parametrize("backend", backend_params(cuda=False) + backend_params(cpu=False, triton=False))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("needs", ["all", "first", "second"])
def test_fast_path_matches_the_registration(monkeypatch, backend, op, needs):
    fn, inputs = _case(op, backend)
    mask = [needs == "all" or (needs == "first" and i == 0) or (needs == "second" and i == 1)
            for i in range(len(inputs))]
    outs_fast, grads_fast, nodes_fast = _run(fn, inputs, mask)
    monkeypatch.setattr(autograd, "EAGER_FAST_PATH", False)
    outs_lib, grads_lib, nodes_lib = _run(fn, inputs, mask)
    # the two paths were taken: the fast path's node is named after the op, the other is torch.library's
    fast = {n for n in nodes_fast if n.startswith("fusedlm_") and n.endswith("Backward")}
    assert len(fast) == 1 and not any(n.startswith("GeneratedBackwardFor") for n in nodes_fast), nodes_fast
    assert not any(n.startswith("fusedlm_") for n in nodes_lib), nodes_lib
    assert any(n.startswith("GeneratedBackwardFor_fusedlm_") for n in nodes_lib), nodes_lib
    for a, b in zip(outs_fast, outs_lib):
        assert torch.equal(a, b)
    for a, b, n in zip(grads_fast, grads_lib, mask):
        assert (a is None) == (not n) and (b is None) == (not n)
        if n:
            assert torch.equal(a, b)


def test_no_gradient_to_record_runs_below_autograd(monkeypatch):
    """Without a gradient to record the op runs below the autograd key, no Function in between."""
    calls = []
    below = autograd._below_autograd

    def counting():
        calls.append(1)
        return below()

    monkeypatch.setattr(autograd, "_below_autograd", counting)
    x, w = torch.randn(4, 8, requires_grad=True), torch.ones(8)
    with torch.no_grad():
        y = fusedlm.layer_norm(x, w, backend="cpu")
    assert y.grad_fn is None and not y.requires_grad and len(calls) == 1
    y = fusedlm.layer_norm(x.detach(), w, backend="cpu")
    assert y.grad_fn is None and not y.requires_grad and len(calls) == 2
    y = fusedlm.layer_norm(x, w, backend="cpu")  # a gradient to record: the Function (which goes below too)
    assert type(y.grad_fn).__name__ == "fusedlm_layer_norm_fwdBackward" and len(calls) == 3


# torch.jit is deprecated in favour of torch.compile / torch.export, and the tracer warns about the
# shape checks (constants in a trace); the test is that tracing still works for those who use it.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_custom_op():
    """torch.jit.trace of a module with parameters records fusedlm::layer_norm_fwd, which it can
    check and save; a Python Function in the trace could be neither checked nor saved."""

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

        def forward(self, x):
            return fusedlm.layer_norm(x, self.weight, backend="cpu")

    x = torch.randn(8, 16)
    traced = torch.jit.trace(Norm(), x)
    assert "fusedlm::layer_norm_fwd" in str(traced.graph)
    torch.jit.save(traced, io.BytesIO())
    torch.testing.assert_close(traced(x), fusedlm.layer_norm(x, torch.ones(16), backend="cpu"))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    """torch.utils.checkpoint reruns the ops in backward: a block of attention, a residual norm and
    the feed-forward gives the bits of the same block without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 48, generator=g).requires_grad_()
    params = [torch.randn(48, generator=g), torch.randn(48, generator=g), 0.1 * torch.randn(96, 48, generator=g),
              torch.randn(96, generator=g), 0.1 * torch.randn(48, 96, generator=g), torch.randn(48, generator=g)]
    params = [p.requires_grad_() for p in params]

    def block(x, *p):
        q = x.view(2, 10, 4, 12).transpose(1, 2)
        a = fusedlm.attention(q, q, q, causal=True, backend="cpu").transpose(1, 2).reshape(2, 10, 48)
        y, h = fusedlm.layer_norm(a, p[0], p[1], residual=x, backend="cpu")
        return fusedlm.layernorm_mlp(h, *p, backend="cpu") + y

    def grads(run):
        for t in (x, *params):
            t.grad = None
        run().square().sum().backward()
        return [t.grad.clone() for t in (x, *params)]

    plain = grads(lambda: block(x, *params))
    checkpointed = grads(lambda: checkpoint(block, x, *params, use_reentrant=use_reentrant))
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


def _differentiable(outs):
    """Which outputs of an eager call carry a gradient (attention's lse does; linear cross-entropy's
    per-token losses do; layer_norm's h does)."""
    return [o.requires_grad for o in outs]


@pytest.mark.parametrize("backend", backend_params(cuda=False) + backend_params(cpu=False, triton=False))
@pytest.mark.parametrize("op", OPS)
def test_torch_func_grad_matches_backward(backend, op):
    """torch.func.grad of a loss over every differentiable output gives eager autograd's gradients
    for every input: the same Function, run one functorch level down."""
    fn, inputs = _case(op, backend)
    outs, grads, _ = _run(fn, inputs, [True] * len(inputs))
    keep = _differentiable(outs)

    func_grads = torch.func.grad(lambda *a: _weighted_loss(fn(list(a)), keep), argnums=tuple(range(len(inputs))))(
        *inputs)
    for name, a, b in zip(range(len(inputs)), func_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{op} input {name}: {m}")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's per-sample batching fallback
@pytest.mark.parametrize("backend", backend_params(cuda=False) + backend_params(cpu=False, triton=False))
@pytest.mark.parametrize("op", ["layer_norm", "layernorm_mlp", "linear_cross_entropy", "attention"])
def test_per_sample_gradients(backend, op):
    """vmap(grad(loss)) over a batch gives each sample's weight gradients, as a loop of eager
    backward passes over the samples does."""
    g = torch.Generator().manual_seed(0)
    device = backend_device(backend)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).float().to(device)

    batch = t(4, 5, 48)
    target = torch.randint(0, 97, (4, 5), generator=g).to(device)
    if op == "layer_norm":
        params = (t(48), t(48))

        def loss(x, tgt, w, b):
            return fusedlm.layer_norm(x, w, b, backend=backend).square().sum()
    elif op == "layernorm_mlp":
        params = (t(48), t(64, 48, scale=0.2), t(48, 64, scale=0.2))

        def loss(x, tgt, nw, fw, pw):
            return fusedlm.layernorm_mlp(x, nw, None, fw, None, pw, None, activation="gelu_tanh",
                                         backend=backend).square().sum()
    elif op == "linear_cross_entropy":
        params = (t(97, 48, scale=0.2), t(97))

        def loss(x, tgt, w, b):
            return fusedlm.linear_cross_entropy(x, w, tgt, b, backend=backend)
    else:
        params = (t(2, 5, 16), t(2, 5, 16))  # (heads, keys, D): shared keys and values

        def loss(x, tgt, k, v):
            q = x.view(5, 3, 16).transpose(0, 1)[None]  # (1, 3 heads, 5 queries, 16): GQA over 1 kv head
            return fusedlm.attention(q, k[None, :1], v[None, :1], causal=True, backend=backend).square().sum()

    argnums = tuple(range(2, 2 + len(params)))
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=argnums), in_dims=(0, 0) + (None,) * len(params))(
        batch, target, *params)
    for i in range(batch.shape[0]):
        leaves = [p.clone().requires_grad_() for p in params]
        grads = torch.autograd.grad(loss(batch[i], target[i], *leaves), leaves, allow_unused=True)
        for j, (a, b) in enumerate(zip(per_sample, grads)):
            b = torch.zeros_like(a[i]) if b is None else b
            torch.testing.assert_close(a[i], b, rtol=1e-5, atol=1e-6, msg=lambda m: f"sample {i} param {j}: {m}")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp decompositions, on first use
def test_forward_mode_transforms_raise():
    """jvp has no rule for the fused ops: torch.func says so rather than giving a wrong tangent."""
    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda x: fusedlm.layer_norm(x, w, backend="cpu"), (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("backend", backend_params(cuda=False) + backend_params(cpu=False, triton=False))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "registration"])
def test_second_derivatives_raise(monkeypatch, backend, op, fast_path):
    """A gradient taken with create_graph=True has the first-derivative values, and differentiating it
    again raises an error naming the op (torch's fallback would warn and give zeros) -- through
    the first input's gradient to every input, the saved ones included."""
    monkeypatch.setattr(autograd, "EAGER_FAST_PATH", fast_path)
    fn, inputs = _case(op, backend)
    outs, grads, _ = _run(fn, inputs, [True] * len(inputs))
    keep = _differentiable(outs)
    leaves = [v.clone().requires_grad_() for v in inputs]
    first = torch.autograd.grad(_weighted_loss(fn(leaves), keep), leaves, create_graph=True)
    for a, b in zip(first, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    name = "layer_norm" if op == "layer_norm_2d" else op
    with pytest.raises(RuntimeError, match=f"{name}: the fused op's backward is not differentiable"):
        torch.autograd.grad(first[0].square().sum(), leaves)
    with pytest.raises(RuntimeError, match=f"{name}: the fused op's backward is not differentiable"):
        inner = torch.func.grad(lambda *a: _weighted_loss(fn(list(a)), keep))  # d loss / d first input
        torch.func.grad(lambda *a: inner(*a).square().sum())(*inputs)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's per-sample batching fallback
@pytest.mark.parametrize("backend", backend_params(cuda=False) + backend_params(cpu=False, triton=False))
def test_jacrev_matches_the_reference(backend):
    """torch.func.jacrev (vjp, vmapped over the cotangents) of layer_norm and causal attention
    against the float64 reference's Jacobian."""
    g = torch.Generator().manual_seed(0)
    device = backend_device(backend)
    x, w, b = (torch.randn(*s, generator=g).to(device) for s in ((3, 8), (8,), (8,)))
    jac = torch.func.jacrev(lambda x: fusedlm.layer_norm(x, w, b, backend=backend))(x)
    ref = torch.func.jacrev(lambda x: fusedlm.reference.layer_norm(x, w.double(), b.double()))(x.double())
    torch.testing.assert_close(jac.double(), ref, rtol=1e-5, atol=1e-5)
    q = torch.randn(1, 2, 5, 16, generator=g).to(device)
    jac = torch.func.jacrev(lambda q: fusedlm.attention(q, q, q, causal=True, backend=backend))(q)
    ref = torch.func.jacrev(lambda q: fusedlm.reference.attention(q, q, q, causal=True))(q.double())
    torch.testing.assert_close(jac.double(), ref, rtol=1e-5, atol=1e-5)


def test_create_graph_gradients_stay_writable_in_place():
    """First derivatives taken with create_graph=True can be changed in place (a hook that scales
    the gradient, g.add_), as torch's own ops allow."""
    x, w, b = torch.randn(4, 8, requires_grad=True), torch.randn(8), torch.randn(8)
    g, = torch.autograd.grad(fusedlm.layer_norm(x, w, b, backend="cpu").square().sum(), x, create_graph=True)
    expected = g.detach().clone()
    g.add_(1.0)
    torch.testing.assert_close(g.detach(), expected + 1.0)
    x.register_hook(lambda grad: grad.mul_(2))
    g2, = torch.autograd.grad(fusedlm.layer_norm(x, w, b, backend="cpu").square().sum(), x, create_graph=True)
    torch.testing.assert_close(g2.detach(), 2 * expected)


def test_functionalize_takes_the_op():
    """torch.func.functionalize (which has no rule for an autograd.Function) runs the op itself,
    also under make_fx."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w = torch.randn(4, 8), torch.randn(8)

    def f(x):
        return fusedlm.layer_norm(x, w, backend="cpu") * 2

    torch.testing.assert_close(torch.func.functionalize(f)(x), f(x))
    graph = make_fx(torch.func.functionalize(f))(x)
    assert "fusedlm.layer_norm_fwd" in graph.code
