"""fusedlm.linear_cross_entropy on the C++ and Triton backends against the float64 reference (error-budget rule).

The Triton interpreter runs tl.dot through numpy's matmul without BLAS (about 1e8 multiply-adds a
second), so its tests take the sampled grid and the sizes below 0.1 G multiply-adds per GEMM pass."""
import itertools

import pytest
import torch

import fusedlm
from fusedlm import dispatch, reference
from harness import ATOL, HAS_GPU, TRITON_INTERPRET, assert_within_budget, backend_device, backend_params

BACKENDS = backend_params()
CPP_BACKENDS = backend_params(triton=False)


def _need_kernel(backend):
    if backend == "cpu" and not dispatch.has_cpp_kernel("linear_cross_entropy_fwd", "CPU"):
        pytest.fail("fusedlm._C is not built: the cpu backend is missing")


def _ops(backend):
    """The (fwd, bwd) custom ops behind a kernel backend."""
    if backend == "triton":
        return (torch.ops.fusedlm.linear_cross_entropy_fwd_triton.default,
                torch.ops.fusedlm.linear_cross_entropy_bwd_triton.default)
    _need_kernel(backend)
    return torch.ops.fusedlm.linear_cross_entropy_fwd.default, torch.ops.fusedlm.linear_cross_entropy_bwd.default


def _inputs(lead, d, vocab, dtype, device, bias, ignored=0.2):
    x = torch.randn(*lead, d, dtype=torch.float64)
    w = torch.randn(vocab, d, dtype=torch.float64) / d ** 0.5 * 2  # logits of spread ~2
    b = 0.5 * torch.randn(vocab, dtype=torch.float64) if bias else None
    target = torch.randint(0, vocab, lead)
    target[torch.rand(lead) < ignored] = -100
    cast = [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, w, b)]
    return (*cast, target.to(device))


def _run(fn, x, w, b, target, upstream, **kw):
    """Loss and the gradients of sum(loss * upstream) for x, w (and b)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    xs, ws = leaves[:2]
    bs = leaves[2] if b is not None else None
    loss = fn(xs, ws, target, bs, **kw)
    grads = torch.autograd.grad((loss.double() * upstream).sum(), leaves)
    return loss, grads


def _compare(backend, x, w, b, target, upstream, **kw):
    loss, grads = _run(fusedlm.linear_cross_entropy, x, w, b, target, upstream, backend=backend, **kw)
    to64 = [t.double() if t is not None else None for t in (x, w, b)]
    loss64, grads64 = _run(reference.linear_cross_entropy, *to64, target, upstream, **kw)
    losst, gradst = _run(reference.linear_cross_entropy, x, w, b, target, upstream, **kw)
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert_within_budget(loss, loss64, losst, name="loss", atol=ATOL[torch.float32] * max(1.0, loss64.abs().max()))
    rows = target.numel()
    for name, g, g64, gt in zip(["dx", "dweight", "dbias"], grads, grads64, gradst):
        assert g.dtype == x.dtype, f"{name} dtype {g.dtype}"
        floor = ATOL[x.dtype] * max(1.0, rows ** 0.5) if name != "dx" else None
        assert_within_budget(g, g64, gt, name=name, atol=floor)
    return loss


def _upstream(reduction, target, device):
    if reduction == "none":  # per-token weights, as a weighted loss would use
        return torch.rand(target.shape, dtype=torch.float64, device=device) * 2
    return torch.tensor(1.7, dtype=torch.float64, device=device)  # a scaled loss


GRID = list(itertools.product([False, True], ["mean", "sum", "none"], [0.0, 0.1], [0.0, 1e-3], [None, 5.0]))
# The interpreter's sample of GRID (bias, reduction, label_smoothing, z_loss, softcap): every pair of
# option values occurs in some row.
TRITON_GRID = [
    (False, "mean", 0.0, 0.0, None), (False, "sum", 0.0, 1e-3, 5.0), (False, "none", 0.1, 0.0, 5.0),
    (False, "mean", 0.1, 1e-3, None), (True, "sum", 0.0, 0.0, 5.0), (True, "none", 0.0, 1e-3, None),
    (True, "mean", 0.1, 0.0, None), (True, "sum", 0.1, 1e-3, 5.0), (True, "mean", 0.0, 1e-3, 5.0),
    (False, "sum", 0.1, 0.0, None),
]


def _grid_id(g):
    return f"{'bias' if g[0] else 'nobias'}-{g[1]}-ls{g[2]}-z{g[3]}-{'cap' if g[4] else 'nocap'}"


@pytest.mark.parametrize("backend,bias,reduction,label_smoothing,z_loss,softcap",
                         [pytest.param(p.values[0], *g, marks=p.marks, id=f"{p.id}-{_grid_id(g)}")
                          for p in CPP_BACKENDS for g in GRID] +
                         [pytest.param(p.values[0], *g, marks=p.marks, id=f"{p.id}-{_grid_id(g)}")
                          for p in backend_params(cpu=False, cuda=False) for g in TRITON_GRID])
def test_linear_cross_entropy_grid(backend, bias, reduction, label_smoothing, z_loss, softcap):
    _need_kernel(backend)
    device = backend_device(backend)
    x, w, b, target = _inputs((31,), 97, 1000, torch.float32, device, bias)
    _compare(backend, x, w, b, target, _upstream(reduction, target, device), reduction=reduction,
             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


# (lead shape, d, V): odd sizes, a 3-D x, a long row (V = 50257) and several tiles of the 64 MiB
# buffer: on the cpu backend 700 tokens at V = 50257 take three vocabulary blocks, the last one
# partial, and 8200 tokens at V = 3000 two token chunks (8192 + 8) of two blocks (2048 + 952).
SIZES = [((1,), 32, 123), ((1025,), 32, 123), ((31,), 768, 1000), ((3, 11), 97, 123), ((7,), 32, 50257),
         ((700,), 8, 50257), ((8200,), 4, 3000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,d,vocab", SIZES, ids=str)
def test_linear_cross_entropy_sizes(backend, lead, d, vocab):
    _need_kernel(backend)
    if backend == "triton" and not HAS_GPU and lead == (700,):
        pytest.skip("0.3 G multiply-adds per GEMM pass: minutes in the Triton interpreter (no GPU here)")
    device = backend_device(backend)
    x, w, b, target = _inputs(lead, d, vocab, torch.float32, device, True)
    if lead == (1,):
        target[0] = 3  # the single token counts
    _compare(backend, x, w, b, target, _upstream("none", target, device), reduction="none",
             label_smoothing=0.05, z_loss=1e-4, softcap=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_cross_entropy_low_precision(backend, dtype):
    _need_kernel(backend)
    if backend == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 is kept out of CPU paths (fp16 CPU math is hundreds of times slower; DESIGN.md)")
    if backend == "triton" and not HAS_GPU and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter (no GPU here)")
    device = backend_device(backend)
    x, w, b, target = _inputs((64,), 96, 1000, dtype, device, True)
    _compare(backend, x, w, b, target, _upstream("mean", target, device), label_smoothing=0.1, softcap=20.0)


@pytest.mark.parametrize("isa", ["scalar", "avx512"])
def test_linear_cross_entropy_cpu_code_paths(monkeypatch, isa):
    """The row pass's portable fallback and its AVX-512 path (own exp and tanh), forced one by one."""
    _need_kernel("cpu")
    if isa == "avx512" and "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("FUSEDLM_CPU_ISA", isa)
    x, w, b, target = _inputs((45,), 64, 531, torch.float32, "cpu", True)
    x = x * 4  # logits up to ~30: the tanh is far from linear and exp spans a wide range
    for softcap in (None, 3.0, 30.0):
        _compare("cpu", x, w, b, target, _upstream("none", target, "cpu"), reduction="none",
                 label_smoothing=0.1, z_loss=1e-3, softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_lse_and_all_ignored(backend):
    _need_kernel(backend)
    device = backend_device(backend)
    x, w, b, target = _inputs((20,), 32, 123, torch.float32, device, True)
    _, lse = fusedlm.linear_cross_entropy(x, w, target, b, return_lse=True, backend=backend)
    _, lse64 = reference.linear_cross_entropy(x.double(), w.double(), target, b.double(), return_lse=True)
    _, lset = reference.linear_cross_entropy(x, w, target, b, return_lse=True)
    assert_within_budget(lse, lse64, lset, name="lse")

    ignored = torch.full_like(target, -100)
    for reduction in ("mean", "sum", "none"):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        loss = fusedlm.linear_cross_entropy(*leaves[:2], ignored, leaves[2], reduction=reduction, z_loss=1e-3,
                                            label_smoothing=0.1, backend=backend)
        assert torch.isfinite(loss).all() and (loss == 0).all(), loss
        loss.sum().backward()
        for leaf in leaves:
            assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def _triton_slabs(monkeypatch, n, vocab, dtype, want):
    """Shrink the Triton backward's slab buffer so that n tokens take `want` vocabulary slabs, the last
    one partial; returns the slab width."""
    from fusedlm.kernels import softmax_output as kernels

    monkeypatch.setattr(kernels, "SLAB_BYTES", n * dtype.itemsize * (vocab // want))
    cols = kernels._slab_cols(n, vocab, dtype.itemsize)
    assert -(-vocab // cols) >= 3 and vocab % cols, (vocab, cols)
    return cols


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_backward_is_deterministic(backend, monkeypatch):
    _need_kernel(backend)
    device = backend_device(backend)
    n, vocab = (100, 3000) if backend == "triton" and not HAS_GPU else (300, 30000)  # interpreter time
    if backend == "triton":
        _triton_slabs(monkeypatch, n, vocab, torch.float32, 4)  # several slabs, the last partial
    x, w, b, target = _inputs((n,), 32, vocab, torch.float32, device, True)
    up = _upstream("none", target, device)
    g1 = _run(fusedlm.linear_cross_entropy, x, w, b, target, up, reduction="none", backend=backend)[1]
    g2 = _run(fusedlm.linear_cross_entropy, x, w, b, target, up, reduction="none", backend=backend)[1]
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", backend_params(cpu=False, cuda=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_linear_cross_entropy_triton_backward_slabs(backend, dtype, monkeypatch):
    """The Triton backward over several vocabulary slabs (the buffer shrunk), the last one partial at an
    odd V: targets, label smoothing's V, bias and dW rows at each slab's offset."""
    if not HAS_GPU and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter (no GPU here)")
    device = backend_device(backend)
    n, vocab = 37, 1001
    cols = _triton_slabs(monkeypatch, n, vocab, dtype, 3)
    x, w, b, target = _inputs((n,), 40, vocab, dtype, device, True)
    # the first column, both sides of the first slab edge, the last column
    target[:4] = torch.tensor([0, cols - 1, cols, vocab - 1], device=device)
    _compare(backend, x, w, b, target, _upstream("none", target, device), reduction="none", label_smoothing=0.1,
             z_loss=1e-3, softcap=5.0)


def _op_args(device, bias, softcap):
    x, w, b, target = _inputs((37,), 24, 301, torch.float32, device, bias)
    return x, w, b, target, -100, 0.1, 1e-3, softcap


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bias,softcap", [(True, None), (False, 7.0)])
def test_linear_cross_entropy_opcheck(backend, bias, softcap):
    fwd, bwd = _ops(backend)
    args = _op_args(backend_device(backend), bias, softcap)
    args[0].requires_grad_(True)
    args[1].requires_grad_(True)
    torch.library.opcheck(fwd, args)
    x, w, b, target, *opts = args
    loss, lse = fwd(x.detach(), w.detach(), b, target, *opts)
    dloss = torch.rand_like(loss)
    torch.library.opcheck(bwd, (dloss, x.detach(), w.detach(), b, target, lse, *opts, bias))


@pytest.mark.parametrize("backend", backend_params())
def test_linear_cross_entropy_torch_compile_fullgraph(backend):
    _need_kernel(backend)
    x, w, b, target = _inputs((40,), 32, 257, torch.float32, backend_device(backend), True)

    def step(x, w, b):
        loss = fusedlm.linear_cross_entropy(x, w, target, b, label_smoothing=0.1, softcap=9.0, backend=backend)
        return loss * 3

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    ref = step(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, c in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, c.grad)


BAD = [
    (lambda x, w, t: (x, w, torch.where(t == 3, 11, t)), ValueError,
     r"linear_cross_entropy: target holds 11, outside \[0, 11\)"),
    (lambda x, w, t: (x, w, torch.where(t == 3, -2, t)), ValueError, "linear_cross_entropy: target holds -2"),
    (lambda x, w, t: (x, w, t.float()), TypeError, "linear_cross_entropy: target must have dtype"),
    (lambda x, w, t: (x, w[:, :7], t), ValueError, r"linear_cross_entropy: weight must have shape \(V, 8\)"),
    (lambda x, w, t: (x, w.to("meta"), t), ValueError, "linear_cross_entropy: weight is on meta but x is on cpu"),
    (lambda x, w, t: (x, w.double(), t), TypeError, "linear_cross_entropy: weight must have the dtype of x"),
    (lambda x, w, t: (x, w, t[:2]), ValueError, r"linear_cross_entropy: target must have shape \(3,\)"),
]


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("make,exc,msg", BAD)
def test_linear_cross_entropy_bad_inputs(backend, make, exc, msg):
    x, w, t = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([0, 3, -100])
    with pytest.raises(exc, match=msg):
        fusedlm.linear_cross_entropy(*make(x, w, t), backend=backend)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(ignore_index=1.5), TypeError, "linear_cross_entropy: ignore_index must be an integer, got 1.5"),
    (dict(label_smoothing=None), TypeError, "linear_cross_entropy: label_smoothing must be a finite number"),
    (dict(z_loss=float("nan")), TypeError, "linear_cross_entropy: z_loss must be a finite number"),
    (dict(softcap="30"), TypeError, "linear_cross_entropy: softcap must be a finite number"),
    (dict(label_smoothing=1.0), ValueError, r"linear_cross_entropy: label_smoothing must be in \[0, 1\)"),
    # values that are 0 or inf in float32, where the kernels use them (1e-46 would read as "no softcap")
    (dict(softcap=1e-46), ValueError, "linear_cross_entropy: softcap must be 0 or of magnitude within float32"),
    (dict(softcap=1e39), ValueError, "linear_cross_entropy: softcap must be 0 or of magnitude within float32"),
    (dict(z_loss=1e39), ValueError, "linear_cross_entropy: z_loss must be 0 or of magnitude within float32"),
    (dict(ignore_index=2**64), ValueError, "linear_cross_entropy: ignore_index must fit in int64"),
    (dict(return_lse=1), TypeError, "linear_cross_entropy: return_lse must be True or False, got 1"),
])
def test_linear_cross_entropy_bad_options(kw, exc, msg):
    x, w, t = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([0, 3, -100])
    for backend in ("auto", "reference"):
        with pytest.raises(exc, match=msg):
            fusedlm.linear_cross_entropy(x, w, t, backend=backend, **kw)


def test_linear_cross_entropy_backends_that_cannot_run():
    x, w, t = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([0, 3, -100])
    if not dispatch._triton_importable():
        with pytest.raises(fusedlm.BackendError, match="linear_cross_entropy: backend='triton'.*triton is not installed"):
            fusedlm.linear_cross_entropy(x, w, t, backend="triton")
    elif TRITON_INTERPRET:
        with pytest.raises(fusedlm.BackendError, match="linear_cross_entropy: backend='triton' cannot run "
                                                       ".*float32, bfloat16, float16 tensors, got float64"):
            fusedlm.linear_cross_entropy(x.double(), w.double(), t, backend="triton")
    else:
        with pytest.raises(fusedlm.BackendError, match="linear_cross_entropy: backend='triton'.*TRITON_INTERPRET=1"):
            fusedlm.linear_cross_entropy(x, w, t, backend="triton")
    with pytest.raises(fusedlm.BackendError, match="linear_cross_entropy: backend='cuda' cannot run these inputs: the tensors are on cpu"):
        fusedlm.linear_cross_entropy(x, w, t, backend="cuda")
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(fusedlm.BackendError,
                           match="linear_cross_entropy: backend='cpu' cannot run .*float32, bfloat16 tensors"):
            fusedlm.linear_cross_entropy(x.to(dtype), w.to(dtype), t, backend="cpu")
    # "auto" sends what the kernel does not take to the reference instead.
    torch.testing.assert_close(fusedlm.linear_cross_entropy(x.double(), w.double(), t),
                               reference.linear_cross_entropy(x.double(), w.double(), t))


@pytest.mark.parametrize("backend", backend_params(cuda=False))
def test_linear_cross_entropy_kernel_never_reads_a_bad_target(backend):
    """Past the Python check (which raises), the kernel op gives NaN for that token and reads nothing out of
    bounds; the other tokens are unaffected and the bad token's gradient is 0."""
    fwd, bwd = _ops(backend)
    x, w, b, target = _inputs((6,), 16, 50, torch.float32, backend_device(backend), True, ignored=0.0)
    bad = target.clone()
    bad[1], bad[4] = 1 << 40, -7
    loss, lse = fwd(x, w, b, bad, -100, 0.0, 0.0, None)
    good, _ = fwd(x, w, b, target, -100, 0.0, 0.0, None)
    assert torch.isnan(loss[[1, 4]]).all()
    keep = [0, 2, 3, 5]
    torch.testing.assert_close(loss[keep], good[keep])
    ones = torch.ones(6, device=x.device)
    dx, _, _ = bwd(ones, x, w, b, bad, lse, -100, 0.0, 0.0, None, True)
    assert (dx[[1, 4]] == 0).all() and torch.isfinite(dx).all()
    dx_good, dw_good, db_good = bwd(torch.tensor([1.0, 0, 1, 1, 0, 1], device=x.device), x, w, b, target, lse,
                                    -100, 0.0, 0.0, None, True)
    dx_bad, dw_bad, db_bad = bwd(ones, x, w, b, bad, lse, -100, 0.0, 0.0, None, True)
    torch.testing.assert_close(dx_bad, dx_good)  # the bad tokens add nothing to dW and db either
    torch.testing.assert_close(dw_bad, dw_good)
    torch.testing.assert_close(db_bad, db_good)


def test_linear_cross_entropy_cpp_checks_name_the_op_and_argument():
    _need_kernel("cpu")
    fwd = torch.ops.fusedlm.linear_cross_entropy_fwd.default
    x, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy_fwd: weight must have shape \(11, 8\)"):
        fwd(x, torch.randn(11, 7), None, t, -100, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy_fwd: target must have shape \(4,\)"):
        fwd(x, w, None, t[:3], -100, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"linear_cross_entropy_fwd: bias must have shape \(11,\)"):
        fwd(x, w, torch.randn(10), t, -100, 0.0, 0.0, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("slab_cols", [128, 384])
def test_linear_cross_entropy_cuda_slabs(monkeypatch, dtype, slab_cols):
    """The cuda backend over several vocabulary slabs (V = 1000: 7 x 128 + 104, or 384 + 384 + 232), so
    that the running log-sum-exp, the target found in one slab of several, dx summed across slabs and
    dW written slab by slab are all exercised; the GPU tests' other shapes fit one 256 MiB slab."""
    _need_kernel("cuda")
    monkeypatch.setenv("FUSEDLM_LCE_SLAB_COLS", str(slab_cols))
    x, w, b, target = _inputs((33,), 96, 1000, dtype, "cuda", True)
    _compare("cuda", x, w, b, target, _upstream("none", target, "cuda"), reduction="none", label_smoothing=0.1,
             z_loss=1e-3, softcap=20.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_masked_vocabulary(monkeypatch, backend):
    """Logits of -inf, as a bias that masks padded or banned vocabulary entries gives: a finite loss and
    gradients, as F.cross_entropy gives (label_smoothing 0 must add nothing, not 0 * inf). The first 150
    columns are masked, so on the GPU backends whole leading tiles and (forced here) a whole slab see only
    -inf, where an online log-sum-exp must not form exp(-inf + inf)."""
    _need_kernel(backend)
    monkeypatch.setenv("FUSEDLM_LCE_SLAB_COLS", "128")
    device = backend_device(backend)
    x, w, b, target = _inputs((37,), 32, 1000, torch.float32, device, True, ignored=0.1)
    masked = torch.zeros(1000, dtype=torch.bool, device=device)
    masked[:150] = True
    masked[[300, 777]] = True
    b = b.masked_fill(masked, float("-inf"))
    target = torch.where(masked[target.clamp(min=0)] & (target >= 0), torch.full_like(target, 500), target)
    loss = _compare(backend, x, w, b, target, _upstream("none", target, device), reduction="none", z_loss=1e-3)
    assert torch.isfinite(loss).all()
