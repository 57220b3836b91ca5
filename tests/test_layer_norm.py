"""fusedlm.layer_norm on every kernel backend against the float64 reference (error-budget rule)."""
import pytest
import torch

import fusedlm
from fusedlm import reference
from harness import ATOL, HAS_GPU, RecordOps, assert_within_budget, backend_device, backend_params

SHAPES = [(1, 17), (97, 123), (128, 768), (1025, 97), (3, 5, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _skip_unsupported(backend, dtype):
    if backend == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 is kept out of CPU paths (fp16 CPU math is hundreds of times slower; DESIGN.md)")
    if backend == "triton" and not HAS_GPU and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter (no GPU here)")


def _inputs(shape, dtype, device, bias, residual, mean=0.0):
    n = shape[-1]
    x = (torch.randn(shape, dtype=torch.float64) + mean).to(device)
    w = (1 + 0.5 * torch.randn(n, dtype=torch.float64)).to(device)
    b = (0.5 * torch.randn(n, dtype=torch.float64)).to(device) if bias else None
    r = torch.randn(shape, dtype=torch.float64).to(device) if residual else None
    # Round to the test dtype once, so every path sees the same values.
    cast = [t.to(dtype) if t is not None else None for t in (x, w, b, r)]
    return cast


def _run(fn, x, w, b, r, gy, gh, **kw):
    """Forward and backward with upstream gradients gy (for y) and gh (for h); returns outputs and grads."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, r)]
    out = fn(*leaves[:3], residual=leaves[3], **kw)
    y, h = out if leaves[3] is not None else (out, None)
    loss = (y.double() * gy).sum()
    if h is not None:
        loss = loss + (h.double() * gh).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return (y, h), grads


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (True, True), (False, False)])
def test_layer_norm_matches_reference(backend, dtype, shape, norm, bias, residual):
    _skip_unsupported(backend, dtype)
    if norm == "rmsnorm" and bias:
        bias = False
    device = backend_device(backend)
    x, w, b, r = _inputs(shape, dtype, device, bias, residual)
    gy = torch.randn(shape, dtype=torch.float64, device=device)
    gh = torch.randn(shape, dtype=torch.float64, device=device)

    def ref(*a, **k):
        return reference.layer_norm(*a, norm=norm, **k)

    (y, h), grads = _run(fusedlm.layer_norm, x, w, b, r, gy, gh, norm=norm, backend=backend)
    (y64, h64), grads64 = _run(ref, *[t.double() if t is not None else None for t in (x, w, b, r)], gy, gh)
    (yt, ht), gradst = _run(ref, x, w, b, r, gy, gh)

    assert y.dtype == dtype and y.shape == x.shape
    assert_within_budget(y, y64, yt, name="y")
    if residual:
        assert_within_budget(h, h64, ht, name="h")
    names = ["dx", "dweight", "dbias", "dresidual"]
    present = [n for n, t in zip(names, (x, w, b, r)) if t is not None]
    for name, g, g64, gt in zip(present, grads, grads64, gradst):
        assert g.dtype == dtype, f"{name} dtype {g.dtype}"
        # Weight gradients sum over rows: allow the floor to scale with sqrt(rows).
        rows = x.numel() // shape[-1]
        floor = ATOL[dtype] * max(1.0, rows ** 0.5) if name in ("dweight", "dbias") else None
        assert_within_budget(g, g64, gt, name=name, atol=floor)


@pytest.mark.parametrize("backend", backend_params())
def test_layer_norm_large_mean_is_accurate(backend):
    """The variance must be centred (not E[x^2] - E[x]^2): inputs with mean 1e3 and unit spread."""
    device = backend_device(backend)
    x, w, b, _ = _inputs((64, 256), torch.float32, device, True, False, mean=1000.0)
    y = fusedlm.layer_norm(x, w, b, backend=backend)
    y64 = reference.layer_norm(x.double(), w.double(), b.double())
    yt = reference.layer_norm(x, w, b)
    assert_within_budget(y, y64, yt, name="y")


@pytest.mark.parametrize("backend", backend_params())
def test_layer_norm_backward_is_deterministic(backend):
    device = backend_device(backend)
    x, w, b, r = _inputs((333, 200), torch.float32, device, True, True)
    gy = torch.randn(333, 200, dtype=torch.float64, device=device)
    gh = torch.randn(333, 200, dtype=torch.float64, device=device)
    _, g1 = _run(fusedlm.layer_norm, x, w, b, r, gy, gh, backend=backend)
    _, g2 = _run(fusedlm.layer_norm, x, w, b, r, gy, gh, backend=backend)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def _opcheck_args(device, rms, bias, residual):
    x, w, b, r = _inputs((37, 48), torch.float32, device, bias, residual)
    return x, w, b, r


@pytest.mark.parametrize("backend", backend_params(cuda=False))
@pytest.mark.parametrize("rms,bias,residual", [(False, True, False), (False, False, True), (True, False, True)])
def test_layer_norm_opcheck(backend, rms, bias, residual):
    device = backend_device(backend)
    if backend == "cpu":
        if not fusedlm.dispatch.has_cpp_kernel("layer_norm_fwd", "CPU"):
            pytest.fail("fusedlm._C is not built: the cpu backend is missing")
        fwd, bwd = torch.ops.fusedlm.layer_norm_fwd.default, torch.ops.fusedlm.layer_norm_bwd.default
    else:
        fwd, bwd = torch.ops.fusedlm.layer_norm_fwd_triton.default, torch.ops.fusedlm.layer_norm_bwd_triton.default
    x, w, b, r = _opcheck_args(device, rms, bias, residual)
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(fwd, (x, w, b, r, 1e-5, rms))
    y, h, mean, rstd = fwd(x.detach(), w.detach(), b, r, 1e-5, rms)
    dy = torch.randn_like(y)
    dh = torch.randn_like(y) if residual else None
    hh = h if residual else x.detach()
    torch.library.opcheck(bwd, (dy, dh, hh, w.detach(), mean, rstd, rms, bias))


@pytest.mark.parametrize("backend", backend_params(cuda=False))
def test_layer_norm_torch_compile_fullgraph(backend):
    device = backend_device(backend)
    x, w, b, r = _inputs((40, 64), torch.float32, device, True, True)

    def block(x, w, b, r):
        y, h = fusedlm.layer_norm(x, w, b, residual=r, backend=backend)
        return (y * 2 + h).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, b, r)]
    ref = block(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, c in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, c.grad)


BAD = [
    (lambda x, w, b: (x.long(), w, b), TypeError, "layer_norm: x must have dtype"),
    (lambda x, w, b: (x, w[:-1], b), ValueError, "layer_norm: weight must have shape (64,)"),
    (lambda x, w, b: (x, w.double(), b), TypeError, "layer_norm: weight must have the dtype of x"),
    (lambda x, w, b: (x, w, b[:3]), ValueError, "layer_norm: bias must have shape (64,)"),
    (lambda x, w, b: (x[:0], w, b), ValueError, "layer_norm: x is empty"),
    (lambda x, w, b: (x, w.reshape(8, 8), b), ValueError, "layer_norm: weight must be 1-D"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"] + backend_params(cuda=False, triton=False))
@pytest.mark.parametrize("make,exc,msg", BAD)
def test_layer_norm_bad_inputs(backend, make, exc, msg):
    x, w, b = torch.randn(4, 64), torch.randn(64), torch.randn(64)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        fusedlm.layer_norm(*make(x, w, b), backend=backend)


def test_layer_norm_bad_options():
    x, w, b = torch.randn(4, 64), torch.randn(64), torch.randn(64)
    with pytest.raises(ValueError, match="layer_norm: norm must be one of"):
        fusedlm.layer_norm(x, w, b, norm="batchnorm")
    with pytest.raises(ValueError, match="layer_norm: rmsnorm takes no bias"):
        fusedlm.layer_norm(x, w, b, norm="rmsnorm")
    with pytest.raises(ValueError, match=r"layer_norm: residual must have shape \(4, 64\)"):
        fusedlm.layer_norm(x, w, b, residual=torch.randn(3, 64))
    with pytest.raises(ValueError, match="layer_norm: backend must be one of"):
        fusedlm.layer_norm(x, w, b, backend="mkl")
    with pytest.raises(TypeError, match="layer_norm: eps must be a finite number, got '1e-5'"):
        fusedlm.layer_norm(x, w, b, eps="1e-5")
    with pytest.raises(TypeError, match="layer_norm: eps must be a finite number, got True"):
        fusedlm.layer_norm(x, w, b, eps=True)
    # 1e-50 passes eps > 0 but is 0 in float32, where the kernels add it: a NaN for a constant row
    with pytest.raises(ValueError, match="layer_norm: eps must be 0 or of magnitude within float32's normal range"):
        fusedlm.layer_norm(x, w, b, eps=1e-50)


def test_layer_norm_backend_that_cannot_run_is_an_error():
    x, w = torch.randn(4, 64), torch.randn(64)
    with pytest.raises(fusedlm.BackendError, match="layer_norm: backend='cuda' cannot run"):
        fusedlm.layer_norm(x, w, backend="cuda")
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(fusedlm.BackendError, match="layer_norm: backend='cpu' cannot run .*float32, bfloat16 tensors"):
            fusedlm.layer_norm(x.to(dtype), w.to(dtype), backend="cpu")


def test_layer_norm_auto_sends_what_no_kernel_takes_to_the_reference():
    x, w = torch.randn(4, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close(fusedlm.layer_norm(x, w), reference.layer_norm(x, w))


def test_layer_norm_residual_gradients_are_separate_tensors():
    """x.grad and residual.grad must not share storage (an in-place update of one would change both)."""
    x, r = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64, requires_grad=True)
    y, h = fusedlm.layer_norm(x, torch.randn(64), residual=r)
    (y.sum() + h.sum()).backward()
    torch.testing.assert_close(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()


@pytest.mark.parametrize("residual_of", ["view", "clone", "leaf"])
@pytest.mark.parametrize("x_shape", [(8, 64), (2, 4, 64)], ids=["2-D", "3-D"])
def test_layer_norm_residual_gradients_accumulate_separately(residual_of, x_shape):
    """x a leaf, residual a leaf or passed straight on from one (a view, a clone): over two
    backward calls each .grad is the sum of its own gradients, in storages of their own (one
    storage for both doubled the second step's gradient in each)."""
    x = torch.randn(x_shape, requires_grad=True)
    p = torch.randn(x_shape, requires_grad=True) if residual_of == "leaf" else torch.randn(2, 4, 64, requires_grad=True)
    w = torch.randn(64)
    grads = []
    for step in range(2):
        r = {"view": lambda: p.view(x_shape), "clone": lambda: p.clone().view(x_shape), "leaf": lambda: p}[residual_of]()
        y, h = fusedlm.layer_norm(x, w, residual=r, backend="cpu")
        (y.square().sum() + (h * (step + 1)).sum()).backward()
        grads.append((x.grad.clone(), p.grad.clone()))
    (gx1, gp1), (gx2, gp2) = grads
    assert x.grad.untyped_storage().data_ptr() != p.grad.untyped_storage().data_ptr()
    # the second step's own gradients, from a fresh pair of leaves
    x0, p0 = x.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    r0 = {"view": lambda: p0.view(x_shape), "clone": lambda: p0.clone().view(x_shape), "leaf": lambda: p0}[residual_of]()
    y0, h0 = fusedlm.layer_norm(x0, w, residual=r0, backend="cpu")
    (y0.square().sum() + (h0 * 2).sum()).backward()
    torch.testing.assert_close(gx2, gx1 + x0.grad)
    torch.testing.assert_close(gp2, gp1 + p0.grad)


@pytest.mark.parametrize("shape", [(40, 64), (2, 20, 64)], ids=["2-D", "3-D"])
def test_layer_norm_residual_backward_copies_dx_once(shape):
    """The backward makes dx, and one copy of it for a leaf residual's .grad, nothing more: a
    (tokens, N) copy per call is what fusion saves (found in 2-D, where the engine copied dx into
    x.grad because the residual's path held the same tensor object)."""
    x, r = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    y, h = fusedlm.layer_norm(x, torch.randn(64, requires_grad=True), residual=r, backend="cpu")
    gy, gh = torch.randn(shape), torch.randn(shape)
    with RecordOps() as rec:
        torch.autograd.backward((y, h), (gy, gh))
    names = [str(f) for f, sizes in rec.calls if x.numel() in sizes]
    fresh = [n for n in names if "clone" in n or "empty" in n or "copy" in n]
    assert fresh == ["aten.clone.default"], names


def test_layer_norm_non_contiguous_input():
    x = torch.randn(64, 12, dtype=torch.float32).t()  # (12, 64) with strides (1, 12)
    w, b = torch.randn(64), torch.randn(64)
    y = fusedlm.layer_norm(x, w, b)
    torch.testing.assert_close(y, reference.layer_norm(x, w, b))


@pytest.mark.parametrize("variant", [{"FUSEDLM_CPU_ISA": "scalar"}, {"FUSEDLM_CPU_ISA": "avx512"},
                                     {"FUSEDLM_CPU_STREAM": "1"}], ids=["scalar", "avx512", "streaming-stores"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(97, 123), (64, 768), (3, 5, 64)], ids=str)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_layer_norm_cpu_code_paths(monkeypatch, variant, dtype, shape, norm):
    """The CPU kernel's portable fallback, its AVX-512 path and its non-temporal stores, forced one by one."""
    import fusedlm.dispatch as d

    if not d.has_cpp_kernel("layer_norm_fwd", "CPU"):
        pytest.fail("fusedlm._C is not built: the cpu backend is missing")
    if variant.get("FUSEDLM_CPU_ISA") == "avx512" and "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")
    for key, value in variant.items():
        monkeypatch.setenv(key, value)
    x, w, b, r = _inputs(shape, dtype, "cpu", norm == "layernorm", True)
    gy, gh = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)

    def ref(*a, **k):
        return reference.layer_norm(*a, norm=norm, **k)

    (y, h), grads = _run(fusedlm.layer_norm, x, w, b, r, gy, gh, norm=norm, backend="cpu")
    (y64, _), grads64 = _run(ref, *[t.double() if t is not None else None for t in (x, w, b, r)], gy, gh)
    (yt, _), gradst = _run(ref, x, w, b, r, gy, gh)
    assert_within_budget(y, y64, yt, name="y")
    assert torch.equal(h, x + r)
    rows = x.numel() // shape[-1]
    for g, g64, gt in zip(grads, grads64, gradst):
        floor = ATOL[dtype] * max(1.0, rows ** 0.5) if g.dim() == 1 else None
        assert_within_budget(g, g64, gt, atol=floor)


def test_layer_norm_cpp_checks_name_the_op_and_argument():
    """Calling the C++ op directly (past the Python checks) still gives a clear error, not a crash."""
    import fusedlm.dispatch as d

    if not d.has_cpp_kernel("layer_norm_fwd", "CPU"):
        pytest.fail("fusedlm._C is not built: the cpu backend is missing")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd: weight must have shape \(8,\)"):
        torch.ops.fusedlm.layer_norm_fwd(x, torch.randn(7), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: x must be 2-D"):
        torch.ops.fusedlm.layer_norm_fwd(x.reshape(2, 2, 8), torch.randn(8), None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="layer_norm_bwd: rstd must have shape"):
        torch.ops.fusedlm.layer_norm_bwd(x, None, x, torch.randn(8), torch.zeros(4), torch.zeros(3), False, False)
