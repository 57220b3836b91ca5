"""fusedlm.layernorm_mlp on every kernel backend against the float64 reference (error-budget rule)."""
import itertools

import pytest
import torch

import fusedlm
from fusedlm import dispatch, reference
from harness import ATOL, HAS_GPU, RecordOps, assert_within_budget, backend_device, backend_params

ACTIVATIONS = reference.ACTIVATIONS
GATED = reference.GATED_ACTIVATIONS
GRAD_NAMES = ("dx", "dnorm_weight", "dnorm_bias", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias")


def _require_cpu_kernel():
    if not dispatch.has_cpp_kernel("layernorm_mlp_fwd", "CPU"):
        pytest.fail("fusedlm._C is not built: the cpu backend is missing")


def _inputs(shape, h, dtype, device, *, activation, norm_bias, fc_bias, proj_bias):
    """x of `shape` (..., d) and the parameters, in float64 rounded once to `dtype`."""
    d = shape[-1]
    fc_out = 2 * h if activation in GATED else h
    t = {
        "x": torch.randn(shape, dtype=torch.float64),
        "norm_weight": 1 + 0.5 * torch.randn(d, dtype=torch.float64),
        "norm_bias": 0.5 * torch.randn(d, dtype=torch.float64) if norm_bias else None,
        "fc_weight": torch.randn(fc_out, d, dtype=torch.float64) / d ** 0.5,
        "fc_bias": 0.5 * torch.randn(fc_out, dtype=torch.float64) if fc_bias else None,
        "proj_weight": torch.randn(d, h, dtype=torch.float64) / h ** 0.5,
        "proj_bias": 0.5 * torch.randn(d, dtype=torch.float64) if proj_bias else None,
    }
    return {k: v.to(device=device, dtype=dtype) if v is not None else None for k, v in t.items()}


def _run(fn, tensors, gy, **kw):
    """y and the gradients of (y * gy).sum() for every tensor present (None for absent ones)."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None else None for k, v in tensors.items()}
    y = fn(*leaves.values(), **kw)
    present = [v for v in leaves.values() if v is not None]
    grads = iter(torch.autograd.grad((y.double() * gy).sum(), present))
    return y, [next(grads) if v is not None else None for v in leaves.values()]


def _check(backend, shape, h, dtype, *, norm="layernorm", activation="gelu_tanh", bias=True, residual=True,
           recompute=False, grads=True):
    device = backend_device(backend)
    tensors = _inputs(shape, h, dtype, device, activation=activation, norm_bias=bias and norm == "layernorm",
                      fc_bias=bias, proj_bias=bias)
    gy = torch.randn(shape, dtype=torch.float64, device=device)
    kw = dict(norm=norm, activation=activation, residual=residual)
    y, g = _run(fusedlm.layernorm_mlp, tensors, gy, recompute=recompute, backend=backend, **kw)
    y64, g64 = _run(reference.layernorm_mlp, {k: v.double() if v is not None else None for k, v in tensors.items()},
                    gy, **kw)
    yt, gt = _run(reference.layernorm_mlp, tensors, gy, **kw)

    assert y.dtype == dtype and y.shape == tensors["x"].shape
    assert_within_budget(y, y64, yt, name="y")
    if not grads:
        return
    rows = tensors["x"].numel() // shape[-1]
    for name, a, a64, at in zip(GRAD_NAMES, g, g64, gt):
        if a is None:
            continue
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        # Weight and bias gradients sum over rows: the floor scales with sqrt(rows).
        floor = ATOL[dtype] * max(1.0, rows ** 0.5) if name != "dx" else None
        assert_within_budget(a, a64, at, name=name, atol=floor)


@pytest.fixture
def small_blocks(monkeypatch):
    """Token blocks of 16 rows: the block loop, its fp32 accumulation and a 1-row tail block run
    on small inputs (33 rows: blocks of 16, 16, 1)."""
    monkeypatch.setenv("FUSEDLM_LNMLP_BLOCK_ROWS", "16")


# The full grid on the cpu backend (fp32): norm x activation x bias x residual x recompute, on a 3-D
# x (3, 11, 48) with h = 64 or a 1-D x (97,) with h = 200, alternating so that every activation
# and every flag value meets both.
SHAPES = (((3, 11, 48), 64), ((97,), 200))
GRID = [(norm, act, bias, residual, recompute, *SHAPES[(ACTIVATIONS.index(act) + bias + residual + recompute) % 2])
        for norm, act, bias, residual, recompute in itertools.product(
            ("layernorm", "rmsnorm"), ACTIVATIONS, (True, False), (True, False), (False, True))]


@pytest.mark.parametrize("norm,activation,bias,residual,recompute,shape,h", GRID,
                         ids=["-".join(map(str, p[:5])) + f"-{len(p[5])}d" for p in GRID])
def test_layernorm_mlp_cpu_grid(small_blocks, norm, activation, bias, residual, recompute, shape, h):
    _require_cpu_kernel()
    _check("cpu", shape, h, torch.float32, norm=norm, activation=activation, bias=bias, residual=residual,
           recompute=recompute)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_layernorm_mlp_cpu_bf16(small_blocks, norm, activation, recompute):
    """bf16 with fp32 element-wise math. relu's gradients are left out: its derivative is a step,
    and a pre-activation within a bf16 rounding of 0 takes either side in any two bf16
    computations (the fused op's and torch's), so the elementwise error has no useful bound."""
    _require_cpu_kernel()
    _check("cpu", (2, 33, 97), 200, torch.bfloat16, norm=norm, activation=activation, recompute=recompute,
           grads=activation != "relu")


@pytest.mark.parametrize("activation,recompute", [("gelu_tanh", False), ("swiglu", True)])
def test_layernorm_mlp_cpu_bf16_two_blocks(monkeypatch, activation, recompute):
    """Exactly two token blocks (33 rows: 17 + 16), where the second block's bf16 weight-gradient
    GEMMs add into the first block's results (beta = 1) instead of going through fp32 sums."""
    _require_cpu_kernel()
    monkeypatch.setenv("FUSEDLM_LNMLP_BLOCK_ROWS", "17")
    _check("cpu", (33, 97), 200, torch.bfloat16, activation=activation, recompute=recompute)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d,h,activation", [(97, 600, "gelu"), (300, 120, "silu"), (300, 120, "geglu")])
def test_layernorm_mlp_cpu_weight_grad_orientation(monkeypatch, dtype, d, h, activation):
    """The backward computes a weight gradient whose width exceeds its height as the transposed
    product and transposes it into place (proj's when h > d, fc's when d > fc_out): here with more
    than 2^15 elements (the transpose's threaded path) and partial 16 x 128 tiles in both
    directions, over two token blocks (one block skips the flip). (97, 600): proj's flipped;
    (300, 120): fc's; geglu's fc_out = 240 flips fc's too."""
    _require_cpu_kernel()
    monkeypatch.setenv("FUSEDLM_LNMLP_BLOCK_ROWS", "20")
    _check("cpu", (37, d), h, dtype, activation=activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flip,block_rows", [("1", "64"), ("0", "20")], ids=["flip-one-block", "no-flip-two-blocks"])
def test_layernorm_mlp_cpu_weight_grad_orientation_forced(monkeypatch, dtype, flip, block_rows):
    """FUSEDLM_LNMLP_FLIP overrides the orientation rule (flip only over two or more token blocks): a
    flipped gradient from one block, and plain ones accumulated over two."""
    _require_cpu_kernel()
    monkeypatch.setenv("FUSEDLM_LNMLP_FLIP", flip)
    monkeypatch.setenv("FUSEDLM_LNMLP_BLOCK_ROWS", block_rows)
    _check("cpu", (37, 97), 600, dtype, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation,recompute", [("gelu_tanh", False), ("swiglu", True)])
def test_layernorm_mlp_cpu_gpt2_width(dtype, activation, recompute):
    """d = 768, h = 3072 (GPT-2 small) in the default token blocks."""
    _require_cpu_kernel()
    h = 1536 if activation in GATED else 3072
    _check("cpu", (40, 768), h, dtype, activation=activation, recompute=recompute)


@pytest.mark.parametrize("backend", backend_params(cpu=False))
@pytest.mark.parametrize("norm,activation,bias,residual,recompute", [
    ("layernorm", "gelu_tanh", True, True, False),
    ("layernorm", "gelu", False, False, True),
    ("rmsnorm", "swiglu", True, True, True),
    ("rmsnorm", "geglu", False, True, False),
    ("layernorm", "relu", True, False, False),
    ("rmsnorm", "silu", True, True, True),
])
def test_layernorm_mlp_gpu_backends(backend, norm, activation, bias, residual, recompute):
    """The Triton kernels (fp32 in the interpreter on the CPU) and the CUDA ones (GPU only)."""
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if HAS_GPU else [])
    for dtype in dtypes:
        _check(backend, (3, 11, 48), 64, dtype, norm=norm, activation=activation, bias=bias, residual=residual,
               recompute=recompute)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("h", [96, 100, 3])
def test_layernorm_mlp_cuda_activation_pack_paths(activation, h, monkeypatch):
    """The CUDA activation kernels move 16-byte packs when h is a multiple of the pack (8 bf16 / fp16, 4
    fp32), else one element: h = 96 packs for every dtype, 100 for fp32 only, 3 for none. 131 rows end in a
    partial 64-row chunk and a partial batch of 4 rows; then the same over token blocks of 16 rows (8 full
    and a 3-row tail: the bias sums over several blocks, the fc GEMM with its bias on 3 rows)."""
    for blocks in (None, "16"):
        if blocks:
            monkeypatch.setenv("FUSEDLM_LNMLP_BLOCK_ROWS", blocks)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for recompute in (False, True):
                _check("cuda", (131, 48), h, dtype, activation=activation, recompute=recompute)


CPU_PATHS = [  # (id, environment, dtypes): the avx512_bf16 instance exists for bf16 tensors only
    ("scalar", {"FUSEDLM_CPU_ISA": "scalar"}, (torch.float32, torch.bfloat16)),
    ("avx512", {"FUSEDLM_CPU_ISA": "avx512", "FUSEDLM_CPU_BF16": "0"}, (torch.float32, torch.bfloat16)),
    ("avx512_bf16", {"FUSEDLM_CPU_ISA": "avx512"}, (torch.bfloat16,)),
]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


def _set_cpu_path(monkeypatch, name, env):
    flags = _cpu_flags()
    if name != "scalar" and "avx512f" not in flags:
        pytest.skip("this CPU has no AVX-512")
    if name == "avx512_bf16" and "avx512_bf16" not in flags:
        pytest.skip("this CPU has no avx512_bf16 instructions")
    monkeypatch.delenv("FUSEDLM_CPU_BF16", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("path,dtype", [(name, dt) for name, _, dts in CPU_PATHS for dt in dts],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layernorm_mlp_cpu_code_paths(monkeypatch, small_blocks, path, dtype, activation):
    """The portable element-wise passes and the AVX-512 ones (bf16: with and without the
    avx512_bf16 conversions), forced one by one (odd width 97)."""
    _require_cpu_kernel()
    _set_cpu_path(monkeypatch, path, dict((n, e) for n, e, _ in CPU_PATHS)[path])
    # recompute on every other activation: the backward pass with and without the bias added on the fly
    _check("cpu", (33, 48), 97, dtype, activation=activation, recompute=ACTIVATIONS.index(activation) % 2 == 0,
           grads=not (dtype == torch.bfloat16 and activation == "relu"))


@pytest.mark.parametrize("path,dtype", [(name, dt) for name, _, dts in CPU_PATHS for dt in dts],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layernorm_mlp_cpu_nan_propagates(monkeypatch, path, dtype, activation):
    """A NaN in a token's x makes that token's output NaN for every activation, relu included
    (torch.relu keeps NaN; max(x, 0) in any operand order would not), and leaves the other tokens as
    the reference has them. The gradients are NaN exactly where the reference's are (relu's f' at
    NaN is 1, as torch's threshold_backward has it; a clamp that dropped the NaN once gave gelu_tanh
    finite fc-bias gradients)."""
    _require_cpu_kernel()
    _set_cpu_path(monkeypatch, path, dict((n, e) for n, e, _ in CPU_PATHS)[path])
    g = torch.Generator().manual_seed(0)
    h = 32 if activation in GATED else 64
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    x[2, 3] = float("nan")
    tensors = {"x": x, "norm_weight": torch.ones(16, dtype=torch.float64),
               "norm_bias": torch.zeros(16, dtype=torch.float64),
               "fc_weight": torch.randn(2 * h if activation in GATED else h, 16, generator=g, dtype=torch.float64) / 4,
               "fc_bias": 0.5 * torch.randn(2 * h if activation in GATED else h, generator=g, dtype=torch.float64),
               "proj_weight": torch.randn(16, h, generator=g, dtype=torch.float64) / 8, "proj_bias": None}
    gy = torch.randn(5, 16, generator=g, dtype=torch.float64)
    y, grads = _run(fusedlm.layernorm_mlp, {k: v.to(dtype) if v is not None else None for k, v in tensors.items()},
                    gy, activation=activation, residual=False, backend="cpu")
    ref, grads64 = _run(reference.layernorm_mlp, tensors, gy, activation=activation, residual=False)
    y = y.double()
    assert y[2].isnan().all() and ref[2].isnan().all()
    keep = torch.tensor([0, 1, 3, 4])
    torch.testing.assert_close(y[keep], ref[keep], rtol=5e-2, atol=5e-2)
    for name, a, a64 in zip(GRAD_NAMES, grads, grads64):
        if a64 is None:
            continue
        assert torch.equal(a.isnan(), a64.isnan()), f"{name}: NaN at {a.isnan().nonzero().tolist()}, " \
                                                     f"the reference at {a64.isnan().nonzero().tolist()}"


def _extreme_inputs(case, generator):
    """float64 tensors (x of 23 x 16) whose pre-activations reach far past float32's comfortable range.
    "huge": fc_weight row j scaled by 10^(20 j / 39), proj_weight column j by its inverse, so the
    pre-activations run from about 1 to 1e20 in magnitude (u^2 overflows float32 past 1.8e19);
    "far_negative": fc-bias entries of -1e30, -1e36 and -3e38 put whole columns far below 0, where
    every ungated f and f' is 0."""
    d, h = 16, 40
    f64 = dict(generator=generator, dtype=torch.float64)
    x, fc_w, fc_b, proj_w = (torch.randn(23, d, **f64), torch.randn(h, d, **f64) / 4, torch.randn(h, **f64),
                             torch.randn(d, h, **f64) / 4)
    if case == "huge":
        scales = torch.logspace(0, 20, h, dtype=torch.float64).unsqueeze(1)
        fc_w, proj_w = fc_w * scales, proj_w / scales.T
    else:
        fc_b[[3, 11, 17]] = torch.tensor([-1e30, -1e36, -3e38], dtype=torch.float64)
    return {"x": x, "norm_weight": torch.ones(d, dtype=torch.float64), "norm_bias": torch.zeros(d, dtype=torch.float64),
            "fc_weight": fc_w, "fc_bias": fc_b, "proj_weight": proj_w, "proj_bias": torch.randn(d, **f64)}


def _check_extreme_pre_activations(backend, dtype, activation, case):
    """y and every gradient finite and within 1e-4 (fp32) or 3e-2 (bf16) of the float64 reference,
    relative to each tensor's largest entry. What these caught: gelu_tanh's f' was
    0 * inf = NaN once u^2 overflowed, and a saturated exp left f = u * 1.2e-38 (-3.6 at u = -3e38)."""
    device = backend_device(backend)
    g = torch.Generator().manual_seed(1)
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in _extreme_inputs(case, g).items()}
    gy = torch.randn(23, 16, generator=g, dtype=torch.float64).to(device)
    y, grads = _run(fusedlm.layernorm_mlp, tensors, gy, activation=activation, backend=backend)
    y64, grads64 = _run(reference.layernorm_mlp, {k: v.double() for k, v in tensors.items()}, gy,
                        activation=activation)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, a64 in zip(("y",) + GRAD_NAMES, [y] + grads, [y64] + grads64):
        assert torch.isfinite(a).all(), f"{case}: {name} is not finite"
        assert (a.double() - a64).abs().max() <= tol * a64.abs().max(), f"{case}: {name}"


# The gated activations are left out: their f(a) * b overflows float32 itself at these magnitudes.
UNGATED = [a for a in ACTIVATIONS if a not in GATED]
EXTREMES = ["huge", "far_negative"]


@pytest.mark.parametrize("path,dtype", [(name, dt) for name, _, dts in CPU_PATHS for dt in dts],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", EXTREMES)
@pytest.mark.parametrize("activation", UNGATED)
def test_layernorm_mlp_cpu_extreme_pre_activations(monkeypatch, path, dtype, case, activation):
    _require_cpu_kernel()
    _set_cpu_path(monkeypatch, path, dict((n, e) for n, e, _ in CPU_PATHS)[path])
    _check_extreme_pre_activations("cpu", dtype, activation, case)


@pytest.mark.parametrize("backend", backend_params(cpu=False))
@pytest.mark.parametrize("case", EXTREMES)
@pytest.mark.parametrize("activation", UNGATED)
def test_layernorm_mlp_gpu_extreme_pre_activations(backend, case, activation):
    for dtype in [torch.float32] + ([torch.bfloat16] if HAS_GPU else []):
        _check_extreme_pre_activations(backend, dtype, activation, case)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_layernorm_mlp_cpu_bf16_conversions_agree(monkeypatch, activation):
    """bf16 through vcvtneps2bf16 (avx512_bf16) and through the integer rounding (bit-exact with
    torch's): both round to nearest even, so on finite, normal values every output bit agrees."""
    _require_cpu_kernel()
    tensors = _inputs((2, 37, 48), 200, torch.bfloat16, "cpu", activation=activation, norm_bias=True, fc_bias=True,
                      proj_bias=True)
    gy = torch.randn(2, 37, 48, dtype=torch.float64)
    runs = []
    for name in ("avx512", "avx512_bf16"):
        _set_cpu_path(monkeypatch, name, dict((n, e) for n, e, _ in CPU_PATHS)[name])
        runs.append(_run(fusedlm.layernorm_mlp, tensors, gy, backend="cpu", activation=activation))
    (y1, g1), (y2, g2) = runs
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_layernorm_mlp_backward_is_deterministic():
    _require_cpu_kernel()
    tensors = _inputs((333, 97), 200, torch.float32, "cpu", activation="gelu", norm_bias=True, fc_bias=True,
                      proj_bias=True)
    gy = torch.randn(333, 97, dtype=torch.float64)
    _, g1 = _run(fusedlm.layernorm_mlp, tensors, gy, backend="cpu")
    _, g2 = _run(fusedlm.layernorm_mlp, tensors, gy, backend="cpu")
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_layernorm_mlp_cpu_same_bits_for_any_thread_count(dtype, activation):
    """The CPU passes split the rows among the threads; the fc-bias gradient goes through partial sums
    of fixed 64-row ranges: 1, 2 and 3 threads give the same bits. 333 rows: a last partial of 13
    rows, a last row group of one; 333 x 200 passes the threading threshold (2^15 elements)."""
    _require_cpu_kernel()
    tensors = _inputs((333, 97), 200, dtype, "cpu", activation=activation, norm_bias=True, fc_bias=True,
                      proj_bias=True)
    gy = torch.randn(333, 97, dtype=torch.float64)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_run(fusedlm.layernorm_mlp, tensors, gy, activation=activation, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    (y1, g1), *others = runs
    for y, g in others:
        assert torch.equal(y1, y)
        for a, b in zip(g1, g):
            assert torch.equal(a, b)


def test_layernorm_mlp_auto_is_the_cpu_kernel():
    _require_cpu_kernel()
    tensors = _inputs((17, 48), 64, torch.float32, "cpu", activation="silu", norm_bias=True, fc_bias=True,
                      proj_bias=True)
    y_auto = fusedlm.layernorm_mlp(*tensors.values(), activation="silu")
    y_cpu = fusedlm.layernorm_mlp(*tensors.values(), activation="silu", backend="cpu")
    assert torch.equal(y_auto, y_cpu)
    x64 = {k: v.double() for k, v in tensors.items()}  # no kernel takes float64: auto -> reference
    torch.testing.assert_close(fusedlm.layernorm_mlp(*x64.values(), activation="silu"),
                               reference.layernorm_mlp(*x64.values(), activation="silu"))


@pytest.mark.parametrize("recompute", [False, True])
def test_layernorm_mlp_saves_only_x_and_pre_act(recompute):
    """What autograd keeps: x, the parameters and pre_act unless recompute; never the norm statistics
    (the backward recomputes them), a normalised x or an activation output."""
    _require_cpu_kernel()
    m, d, h = 37, 48, 64
    tensors = _inputs((m, d), h, torch.float32, "cpu", activation="gelu_tanh", norm_bias=True, fc_bias=True,
                      proj_bias=True)
    leaves = {k: v.requires_grad_(True) for k, v in tensors.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fusedlm.layernorm_mlp(*leaves.values(), backend="cpu", recompute=recompute)
    inputs = {v.data_ptr() for v in leaves.values()}  # x arrives as a (M, d) view of the leaf
    activations = sorted(tuple(t.shape) for t in saved if t.data_ptr() not in inputs and t.numel())
    assert activations == ([] if recompute else [(m, h)])  # pre_act


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["no_grad", "no leaf needs grad"])
def test_layernorm_mlp_inference_writes_no_pre_act(dtype, how):
    """With no gradient to take, the forward returns an empty pre_act (it runs as recompute does) and
    the same y, bit for bit, as a forward that saves for backward."""
    _require_cpu_kernel()
    tensors = _inputs((300, 48), 200, dtype, "cpu", activation="gelu_tanh", norm_bias=True, fc_bias=True,
                      proj_bias=True)
    y_train = fusedlm.layernorm_mlp(*(t.detach().requires_grad_(True) for t in tensors.values()), backend="cpu")
    record = RecordOps()
    if how == "no_grad":
        leaves = [t.detach().requires_grad_(True) for t in tensors.values()]
        with torch.no_grad(), record:
            y = fusedlm.layernorm_mlp(*leaves, backend="cpu")
    else:
        with record:
            y = fusedlm.layernorm_mlp(*tensors.values(), backend="cpu")
    pre_act = [sizes[3] for f, sizes in record.calls if f is torch.ops.fusedlm.layernorm_mlp_fwd.default]
    assert pre_act == [0]  # its numel
    assert torch.equal(y, y_train.detach())


def _opcheck_ops(backend):
    if backend == "cpu":
        _require_cpu_kernel()
    if backend in ("cpu", "cuda"):  # one native op, a kernel per device
        return torch.ops.fusedlm.layernorm_mlp_fwd.default, torch.ops.fusedlm.layernorm_mlp_bwd.default
    return torch.ops.fusedlm.layernorm_mlp_fwd_triton.default, torch.ops.fusedlm.layernorm_mlp_bwd_triton.default


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("rms,activation,recompute", [(False, "gelu_tanh", False), (True, "swiglu", True)])
def test_layernorm_mlp_opcheck(backend, rms, activation, recompute):
    fwd, bwd = _opcheck_ops(backend)
    device = backend_device(backend)
    t = _inputs((19, 48), 64, torch.float32, device, activation=activation, norm_bias=not rms, fc_bias=True,
                proj_bias=not rms)
    args = (*t.values(), 1e-5, rms, activation, True, recompute)
    grad_args = tuple(v.clone().requires_grad_(True) if v is not None else None for v in t.values())
    torch.library.opcheck(fwd, (*grad_args, 1e-5, rms, activation, True, recompute))
    y, _, _, pre_act = fwd(*args)
    bwd_args = (torch.randn_like(y), *t.values(), pre_act, 1e-5, rms, activation, True)
    torch.library.opcheck(bwd, bwd_args)


@pytest.mark.parametrize("backend", backend_params())
def test_layernorm_mlp_torch_compile_fullgraph(backend):
    device = backend_device(backend)
    t = _inputs((40, 48), 64, torch.float32, device, activation="gelu_tanh", norm_bias=True, fc_bias=True,
                proj_bias=True)

    def block(*args):
        return (fusedlm.layernorm_mlp(*args, backend=backend) * 2).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    leaves = [v.clone().requires_grad_(True) for v in t.values()]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [v.clone().requires_grad_(True) for v in t.values()]
    ref = block(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def _bad_inputs():
    t = _inputs((4, 48), 64, torch.float32, "cpu", activation="gelu", norm_bias=True, fc_bias=True, proj_bias=True)
    return list(t.values())


BAD = [
    ("x width vs norm_weight", lambda a: [a[0][:, :47]] + a[1:], {}, ValueError,
     "layernorm_mlp: norm_weight must have shape (47,)"),
    ("fc_weight width", lambda a: a[:3] + [a[3][:, :40]] + a[4:], {}, ValueError,
     "layernorm_mlp: fc_weight must have shape (h, 48), got (64, 40)"),
    ("proj_weight width", lambda a: a[:5] + [a[5][:, :63]] + a[6:], {}, ValueError,
     "layernorm_mlp: proj_weight must have shape (48, 64) (d, h)"),
    ("fc_bias length", lambda a: a[:4] + [a[4][:63]] + a[5:], {}, ValueError,
     "layernorm_mlp: fc_bias must have shape (64,)"),
    ("gated odd fc height", lambda a: a[:3] + [a[3][:63]] + [a[4][:63]] + [a[5][:, :31]] + a[6:],
     {"activation": "swiglu"}, ValueError, "layernorm_mlp: a gated activation (swiglu) needs fc_weight of height 2h"),
    ("rmsnorm with a norm bias", lambda a: a, {"norm": "rmsnorm"}, ValueError,
     "layernorm_mlp: rmsnorm takes no norm_bias"),
    ("unknown activation", lambda a: a, {"activation": "gelu_new"}, ValueError,
     "layernorm_mlp: activation must be one of ('gelu', 'gelu_tanh', 'relu', 'silu', 'swiglu', 'geglu'), got 'gelu_new'"),
    ("integer x", lambda a: [a[0].long()] + a[1:], {}, TypeError,
     "layernorm_mlp: x must have dtype in (float32, float16, bfloat16, float64), got int64"),
    ("integer fc_weight", lambda a: a[:3] + [a[3].int()] + a[4:], {}, TypeError,
     "layernorm_mlp: fc_weight must have dtype"),
    ("dtype mismatch", lambda a: a[:5] + [a[5].double()] + a[6:], {}, TypeError,
     "layernorm_mlp: proj_weight must have the dtype of x"),
    ("residual a tensor", lambda a: a, {"residual": torch.ones(2)}, TypeError,
     "layernorm_mlp: residual must be True or False"),
    ("recompute a string", lambda a: a, {"recompute": "yes"}, TypeError,
     "layernorm_mlp: recompute must be True or False, got 'yes'"),
    ("eps None", lambda a: a, {"eps": None}, TypeError, "layernorm_mlp: eps must be a finite number, got None"),
    ("eps 0 in float32", lambda a: a, {"eps": 1e-50}, ValueError,
     "layernorm_mlp: eps must be 0 or of magnitude within float32's normal range"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"] + backend_params(cuda=False, triton=False))
@pytest.mark.parametrize("what,make,kw,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_layernorm_mlp_bad_inputs(backend, what, make, kw, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        fusedlm.layernorm_mlp(*make(_bad_inputs()), backend=backend, **kw)


def test_layernorm_mlp_backend_that_cannot_run_is_an_error():
    a = _bad_inputs()
    with pytest.raises(fusedlm.BackendError, match="layernorm_mlp: backend='cuda' cannot run these inputs: the tensors are on cpu"):
        fusedlm.layernorm_mlp(*a, backend="cuda")
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(fusedlm.BackendError, match="layernorm_mlp: backend='cpu' cannot run .*float32, bfloat16"):
            fusedlm.layernorm_mlp(*[t.to(dtype) for t in a], backend="cpu")


def test_layernorm_mlp_cpp_checks_name_the_op_and_argument():
    """Calling the C++ ops directly (past the Python checks) still gives a clear error, not a crash."""
    _require_cpu_kernel()
    fwd, bwd = torch.ops.fusedlm.layernorm_mlp_fwd, torch.ops.fusedlm.layernorm_mlp_bwd
    x, nw, nb, fw, fb, pw, pb = _bad_inputs()
    with pytest.raises(RuntimeError, match=r"layernorm_mlp_fwd: proj_weight must have shape \(48, 64\)"):
        fwd(x, nw, nb, fw, fb, pw[:, :10], pb, 1e-5, False, "gelu", True, False)
    with pytest.raises(RuntimeError, match="layernorm_mlp_fwd: activation must be one of .* got 'tanh'"):
        fwd(x, nw, nb, fw, fb, pw, pb, 1e-5, False, "tanh", True, False)
    with pytest.raises(RuntimeError, match="layernorm_mlp_fwd: a gated activation"):
        fwd(x, nw, nb, fw[:63], fb[:63], pw, pb, 1e-5, False, "geglu", True, False)
    with pytest.raises(RuntimeError, match="layernorm_mlp_fwd: x must be float32 or bfloat16"):
        fwd(*[t.half() for t in (x, nw, nb, fw, fb, pw, pb)], 1e-5, False, "gelu", True, False)
    y, _, _, pre = fwd(x, nw, nb, fw, fb, pw, pb, 1e-5, False, "gelu", True, False)
    with pytest.raises(RuntimeError, match=r"layernorm_mlp_bwd: pre_act must have shape \(4, 64\)"):
        bwd(y, x, nw, nb, fw, fb, pw, pb, pre[:3], 1e-5, False, "gelu", True)
    with pytest.raises(RuntimeError, match=r"layernorm_mlp_bwd: dy must have shape \(4, 48\)"):
        bwd(y[:2], x, nw, nb, fw, fb, pw, pb, pre, 1e-5, False, "gelu", True)
