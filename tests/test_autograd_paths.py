"""fusedlm.ops.autograd: the eager fast path and torch.library's registration run the same
setup_context and backward, so every op gives the same bits both ways, with every input needing a
gradient and with only some. (torch.compile and opcheck, which take the registration, are in
each op's own test file.)"""
from __future__ import annotations

import pytest
import torch

import fusedlm
from fusedlm.ops import autograd

from harness import backend_device, backend_params


def _cases(device):
    g = torch.Generator().manual_seed(0)

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).float().to(device)

    x, w, b, r = t(3, 5, 48), t(48), t(48), t(3, 5, 48)
    yield "layer_norm", lambda a: fusedlm.layer_norm(*a[:3], residual=a[3], backend=BACKEND), (x, w, b, r)
    q, k = t(2, 4, 17, 16), t(2, 2, 23, 16)
    yield "attention", lambda a: fusedlm.attention(*a, causal=True, return_lse=True, backend=BACKEND), (q, k, k.flip(2))
    mlp = (x, w, b, t(64, 48, scale=0.2), t(64), t(48, 64, scale=0.2), t(48))
    yield "layernorm_mlp", lambda a: fusedlm.layernorm_mlp(*a, activation="silu", backend=BACKEND), mlp
    target = torch.randint(0, 97, (3, 5), generator=g).to(device)
    target[0, 0] = -100
    yield ("linear_cross_entropy",
           lambda a: fusedlm.linear_cross_entropy(a[0], a[1], target, a[2], reduction="none", backend=BACKEND),
           (x, t(97, 48, scale=0.2), t(97)))
    yield "lm_head_softmax", lambda a: fusedlm.lm_head_softmax(*a, temperature=0.7, backend=BACKEND), (x, t(97, 48), t(97))


BACKEND = "cpu"


def _run(fn, inputs, needs):
    leaves = [v.clone().requires_grad_(n) for v, n in zip(inputs, needs)]
    out = fn(leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs if o.requires_grad)
    nodes = _node_names(outs[0].grad_fn)
    loss.backward()
    return outs, [v.grad for v in leaves], nodes


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


@pytest.mark.parametrize("backend", backend_params(cuda=False) + backend_params(cpu=False, triton=False))
@pytest.mark.parametrize("op", ["layer_norm", "attention", "layernorm_mlp", "linear_cross_entropy",
                                "lm_head_softmax"])
@pytest.mark.parametrize("needs", ["all", "first"])
def test_fast_path_matches_the_registration(monkeypatch, backend, op, needs):
    monkeypatch.setattr(__import__(__name__), "BACKEND", backend)
    name, fn, inputs = next(c for c in _cases(backend_device(backend)) if c[0] == op)
    mask = [True] * len(inputs) if needs == "all" else [True] + [False] * (len(inputs) - 1)
    outs_fast, grads_fast, node_fast = _run(fn, inputs, mask)
    monkeypatch.setattr(autograd, "EAGER_FAST_PATH", False)
    outs_lib, grads_lib, node_lib = _run(fn, inputs, mask)
    # the two paths were taken: the fast path's node is its own Function's, the other torch.library's
    assert "_EagerBackward" in node_fast and not any(n.startswith("GeneratedBackwardFor") for n in node_fast)
    assert "_EagerBackward" not in node_lib and any(n.startswith("GeneratedBackwardFor_fusedlm_") for n in node_lib)
    for a, b in zip(outs_fast, outs_lib):
        assert torch.equal(a, b)
    for a, b, n in zip(grads_fast, grads_lib, mask):
        assert (a is None) == (not n) and (b is None) == (not n)
        if n:
            assert torch.equal(a, b)


def test_no_gradient_to_record_gives_plain_tensors():
    x, w = torch.randn(4, 8, requires_grad=True), torch.ones(8)
    with torch.no_grad():
        y = fusedlm.layer_norm(x, w, backend="cpu")
    assert y.grad_fn is None and not y.requires_grad
    y = fusedlm.layer_norm(x.detach(), w, backend="cpu")
    assert y.grad_fn is None and not y.requires_grad
