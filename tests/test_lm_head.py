"""fusedlm.lm_head_softmax on every kernel backend against the float64 reference (error-budget rule),
and fusedlm.sample: sampled frequencies against the reference probabilities (chi-square), the
top-k / top-p support, seeded repeats, greedy decoding, bad inputs."""
import pytest
import torch

import fusedlm
from fusedlm import dispatch, reference
from fusedlm.ops.lm_head import draw_or_minus_one, filter_top_k_top_p
from harness import ATOL, HAS_GPU, assert_within_budget, backend_device, backend_params

BACKENDS = backend_params()


def _need_kernel(backend, dtype=torch.float32):
    if backend == "cpu" and not dispatch.has_cpp_kernel("lm_head_softmax", "CPU"):
        pytest.fail("fusedlm._C is not built: the cpu backend is missing")
    if backend == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 is kept out of CPU paths (fp16 CPU math is hundreds of times slower; DESIGN.md)")
    if backend == "triton" and not HAS_GPU and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter (no GPU here)")


def _inputs(lead, d, vocab, dtype, device, bias, spread=2.0):
    """x, W, b rounded to dtype once; logits of standard deviation about `spread`."""
    x = torch.randn(*lead, d, dtype=torch.float64)
    w = torch.randn(vocab, d, dtype=torch.float64) / d ** 0.5 * spread
    b = 0.5 * torch.randn(vocab, dtype=torch.float64) if bias else None
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, w, b)]


def _run(fn, x, w, b, upstream, **kw):
    """Probabilities and the gradients of sum(probs * upstream) for x, w (and b)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    probs = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, **kw)
    grads = torch.autograd.grad((probs.double() * upstream).sum(), leaves)
    return probs, grads


def _compare(backend, x, w, b, *, grads=True, **kw):
    """Forward (and backward) of the backend against the float64 reference, under the error budget."""
    to64 = [t.double() if t is not None else None for t in (x, w, b)]
    if not grads:
        probs = fusedlm.lm_head_softmax(x, w, b, backend=backend, **kw)
        probs64 = reference.lm_head_softmax(*to64, **kw)
        assert probs.dtype == torch.float32
        assert_within_budget(probs, probs64, reference.lm_head_softmax(x, w, b, **kw), name="probs")
        return probs
    upstream = torch.randn(*x.shape[:-1], w.shape[0], dtype=torch.float64, device=x.device)
    probs, g = _run(lambda *a, **k: fusedlm.lm_head_softmax(*a, backend=backend, **k), x, w, b, upstream, **kw)
    probs64, g64 = _run(reference.lm_head_softmax, *to64, upstream, **kw)
    probst, gt = _run(reference.lm_head_softmax, x, w, b, upstream, **kw)
    assert probs.dtype == torch.float32 and probs.shape == probs64.shape
    assert_within_budget(probs, probs64, probst, name="probs")
    rows = x.numel() // x.shape[-1]
    for name, a, a64, at in zip(["dx", "dweight", "dbias"], g, g64, gt):
        assert a.dtype == x.dtype, f"{name} dtype {a.dtype}"
        floor = ATOL[x.dtype] * max(1.0, rows ** 0.5) if name != "dx" else None
        assert_within_budget(a, a64, at, name=name, atol=floor)
    return probs


# --- probabilities -----------------------------------------------------------------------------

# (lead shape, d, V, bias): odd vocabularies and widths, one and many tokens, a 3-D x. The Triton
# interpreter takes the small ones (its cost grows with the number of programs).
SIZES = [((1,), 32, 123, True), ((31,), 97, 1000, False), ((1025,), 32, 123, True), ((3, 11), 97, 123, False),
         ((2, 3), 768, 1000, True)]
SIZES_LARGE = [((7,), 97, 50257), ((1,), 32, 50257)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,d,vocab,bias", SIZES, ids=str)
def test_lm_head_softmax_sizes(backend, lead, d, vocab, bias):
    _need_kernel(backend)
    device = backend_device(backend)
    probs = _compare(backend, *_inputs(lead, d, vocab, torch.float32, device, bias), temperature=0.8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(lead, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,d,vocab", SIZES_LARGE, ids=str)
def test_lm_head_softmax_large_vocabulary(backend, lead, d, vocab):
    _need_kernel(backend)
    if backend == "triton" and not HAS_GPU:
        pytest.skip("the Triton interpreter takes seconds per V = 50257 row (runs on a GPU; the many-tile "
                    "merge is covered by test_lm_head_softmax_triton_many_tiles)")
    device = backend_device(backend)
    _compare(backend, *_inputs(lead, d, vocab, torch.float32, device, True), grads=False, temperature=1.0)


@pytest.mark.triton
def test_lm_head_softmax_triton_many_tiles(monkeypatch):
    """The normalising pass folds the per-tile statistics BLOCK_T at a time: with 16-column GEMM tiles
    (interpreter) and BLOCK_T = 8, V = 300 gives 19 tiles, folded in three steps, the last one partial."""
    from fusedlm.kernels import lm_head as kernels

    device = backend_device("triton")
    if device == "cpu":
        monkeypatch.setattr(kernels, "INTERPRET_GEMM", (16, 128, 256))
    monkeypatch.setattr(kernels, "BLOCK_T", 8)
    vocab = 300 if device == "cpu" else 3000  # 64- or 128-column tiles on a GPU: 24 or 47 tiles
    _compare("triton", *_inputs((3,), 40, vocab, torch.float32, device, True, spread=6.0), temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.05, 0.5, 3.0])
def test_lm_head_softmax_temperatures(backend, temperature):
    _need_kernel(backend)
    device = backend_device(backend)
    _compare(backend, *_inputs((17,), 64, 301, torch.float32, device, True), temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_softmax_extreme_logits(backend):
    """Logits in the thousands and a small temperature: the max is subtracted, nothing overflows, and
    the tokens far below the max get exactly 0, as in the reference."""
    _need_kernel(backend)
    device = backend_device(backend)
    x, w, b = _inputs((9,), 32, 200, torch.float32, device, True, spread=500.0)
    probs = _compare(backend, x, w, b, grads=False, temperature=0.25)
    assert torch.isfinite(probs).all() and (probs == 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lm_head_softmax_16bit(backend, dtype):
    _need_kernel(backend, dtype)
    device = backend_device(backend)
    _compare(backend, *_inputs((33,), 96, 1000, dtype, device, True), temperature=0.7)


def test_lm_head_softmax_bf16_token_chunks():
    """The CPU bf16 path projects 64 MiB chunks of tokens: 667 rows at V = 50257, so 700 tokens take
    two chunks, the last one partial. Checked on the rows around the seam and the last (the reference
    is row by row, so a slice of it is the reference of that slice)."""
    _need_kernel("cpu")
    x, w, b = _inputs((700,), 8, 50257, torch.bfloat16, "cpu", True)
    probs = fusedlm.lm_head_softmax(x, w, b, temperature=1.3, backend="cpu")
    rows = torch.cat([torch.arange(660, 675), torch.tensor([0, 699])])
    xs = x[rows]
    probs64 = reference.lm_head_softmax(xs.double(), w.double(), b.double(), temperature=1.3)
    assert_within_budget(probs[rows], probs64, reference.lm_head_softmax(xs, w, b, temperature=1.3), name="probs")


@pytest.mark.parametrize("isa", ["scalar", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lm_head_softmax_cpu_code_paths(monkeypatch, isa, dtype):
    """The row pass's portable fallback and its AVX-512 path (own exp, masked tails), one by one."""
    _need_kernel("cpu")
    if isa == "avx512" and "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("FUSEDLM_CPU_ISA", isa)
    for vocab in (1, 15, 33, 531):  # below, at and past the 16- and 32-lane steps
        _compare("cpu", *_inputs((5,), 40, vocab, dtype, "cpu", True, spread=8.0), temperature=0.6)


# The Triton interpreter's numpy warns when (logit - max) * log2(e) / T overflows to -inf, which is the
# intended exponent (2^-inf = 0; a GPU overflows silently).
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_softmax_masked_vocabulary_and_tiny_temperatures(backend):
    """A -inf bias over the first 1100 of 1500 entries (masked tokens: every vocabulary tile of the GPU
    and interpreter tables, 64-512 wide, falls wholly inside it at least once), at temperatures down to
    MIN_TEMPERATURE: masked entries get exactly 0, no row is NaN (no -inf - -inf, no overflow of the
    scaled logits), and the rows match the float64 reference: within the error budget at T = 1, and
    exactly (one-hot rows of the argmax) at the tiny temperatures, where torch's own float32 softmax of
    logits / T is NaN (the budget's yardstick has none there)."""
    from fusedlm.ops.lm_head import MIN_TEMPERATURE

    _need_kernel(backend)
    device = backend_device(backend)
    x, w, b = _inputs((9,), 32, 1500, torch.float32, device, True)
    b[:1100] = float("-inf")
    probs = _compare(backend, x, w, b, grads=False, temperature=1.0)
    assert (probs[:, :1100] == 0).all()
    for temperature in (1e-8, MIN_TEMPERATURE):
        probs = fusedlm.lm_head_softmax(x, w, b, temperature=temperature, backend=backend)
        probs64 = reference.lm_head_softmax(x.double(), w.double(), b.double(), temperature=temperature)
        assert torch.equal(probs.double(), probs64) and torch.equal(probs.sum(-1), torch.ones_like(probs[:, 0]))


@pytest.mark.parametrize("isa", ["scalar", "avx512"])
@pytest.mark.parametrize("temperature", [1e-8, 1e-30])
def test_lm_head_softmax_cpu_tiny_temperature(monkeypatch, isa, temperature):
    """A temperature so small that every logit but the largest of its row scales far below exp's range:
    the largest still gives exp(0) = 1 (the max is subtracted before the scaling), so each row is the
    one-hot of its argmax, as in the reference, never 0 / 0."""
    _need_kernel("cpu")
    if isa == "avx512" and "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("FUSEDLM_CPU_ISA", isa)
    x, w, b = _inputs((64,), 40, 1000, torch.float32, "cpu", True)
    probs = _compare("cpu", x, w, b, grads=False, temperature=temperature)
    assert torch.equal(probs.sum(-1), torch.ones(64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_softmax_backward_without_bias_and_through_one_input(backend):
    _need_kernel(backend)
    device = backend_device(backend)
    x, w, _ = _inputs((6,), 24, 77, torch.float32, device, False)
    xs = x.clone().requires_grad_(True)
    fusedlm.lm_head_softmax(xs, w, backend=backend, temperature=2.0)[:, 3].sum().backward()
    x64 = x.double().requires_grad_(True)
    reference.lm_head_softmax(x64, w.double(), temperature=2.0)[:, 3].sum().backward()
    torch.testing.assert_close(xs.grad, x64.grad.float(), atol=1e-6, rtol=1e-5)


def _op(backend):
    return torch.ops.fusedlm.lm_head_softmax_triton.default if backend == "triton" else \
        torch.ops.fusedlm.lm_head_softmax.default


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_lm_head_softmax_opcheck(backend, bias):
    _need_kernel(backend)
    x, w, b = _inputs((13,), 24, 101, torch.float32, backend_device(backend), bias)
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(_op(backend), (x, w, b, 0.9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_softmax_torch_compile_fullgraph(backend):
    _need_kernel(backend)
    device = backend_device(backend)
    x, w, b = _inputs((2, 20), 32, 257, torch.float32, device, True)

    def head(x, w, b):
        probs = fusedlm.lm_head_softmax(x, w, b, temperature=0.7, backend=backend)
        return (probs * probs).sum()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    ref = head(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, c in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, c.grad)


BAD = [
    (lambda x, w, b: dict(x=x.long()), TypeError,
     r"lm_head_softmax: x must have dtype in \(float32, float16, bfloat16, float64\), got int64"),
    (lambda x, w, b: dict(weight=w[:, :7]), ValueError, r"lm_head_softmax: weight must have shape \(V, 8\)"),
    (lambda x, w, b: dict(weight=w.double()), TypeError, "lm_head_softmax: weight must have the dtype of x"),
    (lambda x, w, b: dict(weight=w.to("meta")), ValueError, "lm_head_softmax: weight is on meta but x is on cpu"),
    (lambda x, w, b: dict(bias=b[:3]), ValueError, r"lm_head_softmax: bias must have shape \(11,\)"),
    (lambda x, w, b: dict(x=x[:0]), ValueError, "lm_head_softmax: x is empty"),
    (lambda x, w, b: dict(temperature=0.0), ValueError, "lm_head_softmax: temperature must be >= 4.24e-39"),
    (lambda x, w, b: dict(temperature=-1.0), ValueError, "lm_head_softmax: temperature must be >= "),
    (lambda x, w, b: dict(temperature=1e-300), ValueError, r"lm_head_softmax: temperature must be >= 4.24e-39 \(log2\(e\) / "),
    (lambda x, w, b: dict(temperature=float("nan")), TypeError, "lm_head_softmax: temperature must be a finite number"),
    (lambda x, w, b: dict(temperature=None), TypeError, "lm_head_softmax: temperature must be a finite number"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"] + backend_params(cuda=False, triton=False))
@pytest.mark.parametrize("make,exc,msg", BAD)
def test_lm_head_softmax_bad_inputs(backend, make, exc, msg):
    x, w, b = torch.randn(3, 8), torch.randn(11, 8), torch.randn(11)
    args = dict(x=x, weight=w, bias=b, temperature=1.0)
    args.update(make(x, w, b))
    with pytest.raises(exc, match=msg):
        fusedlm.lm_head_softmax(args.pop("x"), args.pop("weight"), args.pop("bias"), backend=backend, **args)


def test_lm_head_softmax_backends_that_cannot_run():
    x, w = torch.randn(3, 8), torch.randn(11, 8)
    with pytest.raises(fusedlm.BackendError, match="lm_head_softmax: backend='cuda' cannot run these inputs: the tensors are on cpu"):
        fusedlm.lm_head_softmax(x, w, backend="cuda")
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(fusedlm.BackendError, match="lm_head_softmax: backend='cpu' cannot run .*float32, bfloat16"):
            fusedlm.lm_head_softmax(x.to(dtype), w.to(dtype), backend="cpu")
    # "auto" sends what the kernel does not take to the reference instead.
    torch.testing.assert_close(fusedlm.lm_head_softmax(x.double(), w.double(), temperature=0.5),
                               reference.lm_head_softmax(x.double(), w.double(), temperature=0.5))


def test_lm_head_softmax_cpp_checks_name_the_op_and_argument():
    _need_kernel("cpu")
    op = torch.ops.fusedlm.lm_head_softmax.default
    x, w = torch.randn(4, 8), torch.randn(11, 8)
    with pytest.raises(RuntimeError, match=r"lm_head_softmax: weight must have shape \(11, 8\)"):
        op(x, torch.randn(11, 7), None, 1.0)
    with pytest.raises(RuntimeError, match=r"lm_head_softmax: bias must have shape \(11,\)"):
        op(x, w, torch.randn(10), 1.0)
    with pytest.raises(RuntimeError, match=r"lm_head_softmax: x must be 2-D \(N, d\)"):
        op(x[None], w, None, 1.0)
    with pytest.raises(RuntimeError, match="lm_head_softmax: temperature must be > 0"):
        op(x, w, None, 0.0)
    with pytest.raises(RuntimeError, match="lm_head_softmax: x must be float32 or bfloat16 on the cpu"):
        op(x.half(), w.half(), None, 1.0)
    with pytest.raises(RuntimeError, match="lm_head_softmax: x must be contiguous"):
        op(torch.randn(8, 4).t(), w, None, 1.0)


# --- sample --------------------------------------------------------------------------------------

# Next-token probabilities of a 16-token vocabulary (sum 1), away from the top-p boundaries below:
# sorted, their running sums are 0.245 0.425 0.565 0.675 0.755 0.815 0.855 0.89 0.92 ...
PROBS16 = torch.tensor([0.04, 0.245, 0.03, 0.11, 0.18, 0.06, 0.02, 0.08, 0.14, 0.035, 0.025, 0.015, 0.01, 0.005,
                        0.003, 0.002], dtype=torch.float64)


def _head16(n_tokens, dtype=torch.float32, device="cpu"):
    """x (n_tokens, 4) and W (16, 4), b (16,) whose logits are log(PROBS16) for every token."""
    x = torch.zeros(n_tokens, 4, dtype=torch.float64)
    x[:, 0] = 1.0
    w = torch.zeros(16, 4, dtype=torch.float64)
    w[:, 0] = PROBS16.log()
    b = torch.zeros(16, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


def _chi_square_p_value(counts, expected):
    """P(chi2_df >= statistic), df = (cells with expected > 0) - 1, by the regularised gamma function."""
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2).item()


def _draw(fn, n, **kw):
    gen = torch.Generator().manual_seed(1234)
    x, w, b = _head16(n)
    return fn(x, w, b, generator=gen, **kw)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (1.0, 6, None),
                                                     (1.0, None, 0.8), (1.3, 8, 0.75)])
def test_sample_frequencies_match_reference(temperature, top_k, top_p):
    """20000 draws against the reference's distribution: same support (every kept token is drawn,
    no dropped one ever is), and a chi-square goodness of fit at p > 1e-3 (fixed seed: not flaky)."""
    n = 20000
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    ids = _draw(fusedlm.sample, n, **kw)
    ref_ids = _draw(reference.sample, n, **kw)
    assert ids.shape == (n,) and ids.dtype == torch.int64
    counts = torch.bincount(ids, minlength=16).double()
    support = torch.bincount(ref_ids, minlength=16) > 0
    assert torch.equal(counts > 0, support), (counts, support)
    # The reference's distribution: its probabilities at this temperature, on its support, renormalised.
    x, w, b = _head16(1, torch.float64)
    p = reference.lm_head_softmax(x, w, b, temperature=temperature)[0] * support
    p_value = _chi_square_p_value(counts, n * p / p.sum())
    assert p_value > 1e-3, f"chi-square p-value {p_value:.2e}: counts {counts.tolist()}"


def test_sample_support_is_the_reference_rule():
    """top_k = 6 keeps the six most probable; top_p = 0.8 on what is left keeps the fewest most probable
    tokens reaching 0.8; together (k = 8, p = 0.75): the top 8 renormalised, then the fewest reaching 0.75."""
    order = torch.argsort(PROBS16, descending=True)
    probs = PROBS16[None].float()

    def kept(**kw):
        return set(torch.nonzero(filter_top_k_top_p(probs, **kw)[0]).flatten().tolist())
    assert kept(top_k=6) == set(order[:6].tolist())
    assert kept(top_p=0.8) == set(order[:6].tolist())  # 0.755 before the sixth, 0.815 before the seventh
    top8 = PROBS16[order[:8]] / PROBS16[order[:8]].sum()
    n_p = int(((top8.cumsum(0) - top8) < 0.75).sum())
    assert kept(top_k=8, top_p=0.75) == set(order[:n_p].tolist())
    torch.testing.assert_close(filter_top_k_top_p(probs, top_k=6).sum(), torch.tensor(1.0))


def test_sample_seeded_generator_repeats():
    x, w, b = _inputs((4, 9), 16, 50, torch.float32, "cpu", True)
    draws = [fusedlm.sample(x, w, b, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(s))
             for s in (7, 7, 8)]
    assert draws[0].shape == (4, 9) and draws[0].dtype == torch.int64
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_sample_temperature_zero_is_argmax_lowest_index_on_ties():
    x, w, b = _inputs((5, 7), 16, 40, torch.float32, "cpu", True)
    w[11] = w[30] = 3.0  # tokens 11 and 30 tie in every row; where they win, the lowest index is taken
    b[11] = b[30] = 0.0
    x[0, 0] = 1.0  # logits 48 for both there, about 2 for the others
    ids = fusedlm.sample(x, w, b, temperature=0, top_k=3, top_p=0.5)
    assert ids.shape == (5, 7)
    assert torch.equal(ids, reference.sample(x, w, b, temperature=0))
    assert ids[0, 0] == 11


def test_sample_top_k_1_and_tiny_top_p_are_greedy():
    x, w, b = _inputs((5, 7), 16, 40, torch.float32, "cpu", True)
    greedy = fusedlm.sample(x, w, b, temperature=0)
    assert torch.equal(fusedlm.sample(x, w, b, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(fusedlm.sample(x, w, b, top_p=1e-9, generator=torch.Generator().manual_seed(0)), greedy)


def test_sample_bad_options():
    x, w = torch.randn(3, 8), torch.randn(11, 8)
    cases = [
        (dict(top_k=0), ValueError, "sample: top_k must be a positive integer"),
        (dict(top_k=1.5), ValueError, "sample: top_k must be a positive integer"),
        (dict(top_k=True), ValueError, "sample: top_k must be a positive integer"),
        (dict(top_k=float("inf")), ValueError, "sample: top_k must be a positive integer"),
        (dict(top_p=0.0), ValueError, r"sample: top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, r"sample: top_p must be in \(0, 1\]"),
        (dict(top_p=True), ValueError, r"sample: top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), ValueError, "sample: temperature must be 0 \\(greedy\\) or >= "),
        (dict(temperature=1e-300), ValueError, "sample: temperature must be 0 \\(greedy\\) or >= 4.24e-39"),
        (dict(temperature=float("nan")), TypeError, "sample: temperature must be a finite number"),
        (dict(generator=3), TypeError, "sample: generator must be a torch.Generator"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fusedlm.sample(x, w, **kw)
    with pytest.raises(ValueError, match="sample: weight must have shape"):
        fusedlm.sample(x, torch.randn(11, 7))
    # NaN or inf in an input makes a row of probabilities NaN (CPU: checked; top-k / top-p keep it)
    x_bad = x.clone()
    x_bad[1, 2] = float("nan")
    w_bad = w.clone()
    w_bad[4, 0] = float("inf")  # with x >= 0: a logit of +inf (or inf * 0), whose softmax row is NaN
    for args, kw in (((x_bad, w), {}), ((x.abs(), w_bad), dict(top_k=3)), ((x, w, torch.full((11,), float("nan"))), {})):
        with pytest.raises(ValueError, match="sample: the probabilities of some row are NaN"):
            fusedlm.sample(*args, **kw)
    # greedy: a NaN logit has no argmax (torch.argmax would return its index)
    with pytest.raises(ValueError, match="sample: the logits of some row are NaN"):
        fusedlm.sample(x_bad, w, temperature=0)
    # A generator of another device than x's (meta tensors: no computation is needed to raise).
    with pytest.raises(ValueError, match="sample: generator is on cpu but x is on meta"):
        fusedlm.sample(x.to("meta"), w.to("meta"), generator=torch.Generator())


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"),
                                    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def test_draw_or_minus_one_marks_non_finite_rows(device):
    """sample's GPU draw: rows that are no distribution (NaN, inf, a negative entry, all zeros) give
    -1 (no device-side assert, no host sync); the other rows get torch.multinomial's draws for the
    same seed, and their frequencies follow the probabilities."""
    probs = torch.softmax(torch.randn(8, 50), -1).to(device)
    bad = probs.clone()
    bad[1, 3] = float("nan")
    bad[4] = float("nan")
    bad[5, 0] = float("inf")
    bad[6, 2] = -0.1
    bad[7] = 0.0
    ids = draw_or_minus_one(bad, torch.Generator(device).manual_seed(7))
    want = torch.multinomial(probs, 1, generator=torch.Generator(device).manual_seed(7)).squeeze(-1)
    assert ids.dtype == torch.int64 and ids.shape == (8,)
    assert ids[[1, 4, 5, 6, 7]].tolist() == [-1] * 5
    assert torch.equal(ids[[0, 2, 3]], want[[0, 2, 3]])
    assert torch.equal(draw_or_minus_one(probs, torch.Generator(device).manual_seed(7)), want)
    p = PROBS16.to(device)
    counts = torch.bincount(draw_or_minus_one(p.expand(20000, 16), torch.Generator(device).manual_seed(1)).cpu(),
                            minlength=16).double()
    assert _chi_square_p_value(counts, 20000 * PROBS16) > 1e-3


@pytest.mark.gpu
def test_sample_on_cuda_with_a_cuda_generator():
    x, w, b = _head16(20000, device="cuda")
    ids = fusedlm.sample(x, w, b, top_k=8, generator=torch.Generator("cuda").manual_seed(3))
    again = fusedlm.sample(x, w, b, top_k=8, generator=torch.Generator("cuda").manual_seed(3))
    assert ids.device.type == "cuda" and torch.equal(ids, again)
    counts = torch.bincount(ids.cpu(), minlength=16).double()
    p = PROBS16 * (PROBS16 >= PROBS16.sort(descending=True).values[7])
    assert _chi_square_p_value(counts, 20000 * p / p.sum()) > 1e-3
    with pytest.raises(ValueError, match="sample: generator is on cpu but x is on cuda"):
        fusedlm.sample(x, w, b, generator=torch.Generator())
    x_bad = x[:4].clone()
    x_bad[2, 0] = float("nan")
    assert fusedlm.sample(x_bad, w, b).tolist()[2] == -1  # no device-side assert
