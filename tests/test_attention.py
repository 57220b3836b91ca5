"""fusedlm.attention on its kernel backends against the float64 reference (error-budget rule).

The C++ CPU kernel runs on CPU tensors (float32 and bfloat16; fp16 is kept out of CPU paths), the CUDA
kernel on a GPU. The Triton kernels run on a GPU when there is one, else under TRITON_INTERPRET=1 on CPU
tensors; the interpreter's cost grows with the number of programs, so the grid keeps B and H small.
"""
import math

import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.ops.attention import CUDA_HEAD_DIMS
from fusedlm.validation import fmt_dtype
from harness import HAS_GPU, assert_within_budget, backend_device, backend_params

BACKENDS = backend_params()
TRITON = backend_params(cpu=False, cuda=False)

# (B, Hq, Hkv, Nq, Nk, D, causal): GQA 8/2 and 8/1 (MQA), Nq != Nk both ways, odd N, head dims with masked
# columns (80), fully masked rows (causal with Nq > Nk), one-token decode.
CASES = [
    (1, 2, 1, 1, 1, 16, False),
    (1, 2, 1, 17, 17, 16, True),
    (1, 2, 2, 97, 97, 64, True),
    (1, 2, 2, 97, 97, 64, False),
    (1, 4, 2, 128, 128, 64, True),
    (1, 4, 1, 128, 128, 128, False),
    (2, 2, 1, 17, 97, 80, True),
    (1, 2, 1, 97, 17, 80, True),
    (1, 2, 1, 128, 17, 64, False),
    (1, 8, 2, 17, 17, 64, True),
    (1, 8, 1, 17, 33, 64, False),
    (1, 2, 1, 1, 128, 128, True),
    (1, 1, 1, 17, 17, 256, True),
    (1, 1, 1, 1025, 1025, 64, True),
]
# The CPU kernel takes any head dim (7, 12, 20: no multiple of 8 or 16) and larger tiles are cheap there:
# several key and query blocks at D = 256, one key against many queries, decodes (<= 4 queries) of 1025
# keys and of key counts past a multiple of 16 (the 16-key score groups) and of 128 (the P V blocks).
CPU_CASES = [
    (1, 3, 1, 33, 20, 12, True),
    (2, 4, 2, 17, 17, 7, False),
    (1, 2, 1, 200, 130, 256, True),
    (1, 2, 2, 5, 1, 20, True),
    (1, 4, 1, 1, 1025, 64, True),
    (2, 8, 2, 150, 150, 96, False),
    (1, 4, 2, 3, 300, 256, True),
    (2, 2, 1, 1, 271, 80, False),
]
FP16_CASES = [
    (1, 2, 1, 97, 97, 64, True),
    (1, 4, 2, 128, 97, 80, False),
    (1, 2, 1, 17, 128, 128, True),
    (1, 8, 2, 17, 17, 64, True),
    (1, 2, 1, 97, 17, 64, True),
]
# bf16 on the CPU: even head dims take the avx512_bf16 dot products where the CPU has them, odd ones (and
# blocks of <= 4 queries in forward) fp32 copies; odd query and key counts pad the bf16 pairs.
BF16_CPU_CASES = FP16_CASES + [(1, 1, 1, 17, 17, 256, True), (1, 2, 1, 1, 1025, 16, True),
                               (1, 2, 2, 130, 129, 128, False), (1, 4, 2, 67, 67, 21, True),
                               (2, 4, 1, 65, 131, 80, True), (1, 4, 2, 3, 300, 256, True),
                               (2, 2, 1, 1, 271, 80, False)]


def _grid():
    """(backend, dtype, case) params: each backend with the dtypes it takes."""
    params = []
    for bp in BACKENDS:
        backend = bp.values[0]
        if backend == "cpu":
            combos = [(torch.float32, c) for c in CASES + CPU_CASES] + [(torch.bfloat16, c) for c in BF16_CPU_CASES]
        else:
            combos = ([(torch.float32, c) for c in CASES] + [(torch.float16, c) for c in FP16_CASES]
                      + [(torch.bfloat16, c) for c in FP16_CASES[:2]])
        params += [pytest.param(backend, dt, c, id=f"{backend}-{fmt_dtype(dt)}-{c}", marks=bp.marks)
                   for dt, c in combos]
    return params


def _skip_unsupported(backend, dtype, d=64):
    if backend == "cuda" and d not in CUDA_HEAD_DIMS:
        pytest.skip(f"the CUDA kernels specialise head dims {CUDA_HEAD_DIMS}, not {d} (tested: the BackendError)")
    if backend == "triton" and not HAS_GPU and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in the Triton interpreter (no GPU here)")


def _inputs(case, dtype, device):
    b, hq, hkv, nq, nk, d, _ = case
    q, k, v = (torch.randn(shape, dtype=torch.float64) for shape in ((b, hq, nq, d), (b, hkv, nk, d), (b, hkv, nk, d)))
    do = torch.randn(b, hq, nq, d, dtype=torch.float64)
    return [t.to(dtype).to(device) for t in (q, k, v)], do.to(device)


def _run(fn, q, k, v, do, dlse=None, **kw):
    """out, lse and (dq, dk, dv) for the loss sum(out * do) (+ sum(lse * dlse))."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves, return_lse=True, **kw)
    loss = (out.double() * do).sum()
    if dlse is not None:
        seen = torch.isfinite(lse)
        loss = loss + torch.where(seen, lse.double() * dlse, torch.zeros_like(dlse)).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def _check_all(out, lse, grads, q, k, v, do, causal, dlse=None, scale=None):
    (q64, k64, v64) = (t.double() for t in (q, k, v))
    out64, lse64, grads64 = _run(reference.attention, q64, k64, v64, do, dlse, causal=causal, scale=scale)
    outt, lset, gradst = _run(reference.attention, q, k, v, do, dlse, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_within_budget(out, out64, outt, name="out")
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), seen), "lse: -inf rows differ from the reference"
    assert (lse[~seen] == float("-inf")).all()
    assert (out[~seen] == 0).all(), "a row that sees no key must output zeros"
    assert_within_budget(lse[seen], lse64[seen], lset[seen].float(), name="lse")
    for name, g, g64, gt in zip(("dq", "dk", "dv"), grads, grads64, gradst):
        assert g.dtype == q.dtype, f"{name} dtype {g.dtype}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert_within_budget(g, g64, gt, name=name)


@pytest.mark.parametrize("backend,dtype,case", _grid())
def test_attention_matches_reference(backend, dtype, case):
    _skip_unsupported(backend, dtype, case[5])
    device = backend_device(backend)
    (q, k, v), do = _inputs(case, dtype, device)
    causal = case[-1]
    out, lse, grads = _run(fusedlm.attention, q, k, v, do, causal=causal, backend=backend)
    _check_all(out, lse, grads, q, k, v, do, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,value", [(torch.float16, 6832.0), (torch.bfloat16, 13824.0), (torch.bfloat16, 19840.0)],
                         ids=["fp16", "bf16", "bf16-larger"])
def test_attention_huge_equal_scores(backend, dtype, value):
    """Every score 64 value^2 (3e9 to 2.5e10): softmax is uniform, so out is the mean of the keys' v that
    a row sees. The row max's weight must be exactly 1: FlashAttention-2's single FMA, exp2(c s -
    round(c m)), gives it 2^(c m's rounding error) here (about 2^32, or 2^-127), an inf or empty P."""
    if backend == "cpu" and dtype == torch.float16:
        pytest.skip("the CPU kernels take float32 and bfloat16")
    _skip_unsupported(backend, dtype)
    device = backend_device(backend)
    q = torch.full((1, 2, 97, 64), value, dtype=dtype, device=device)
    k = torch.full((1, 2, 130, 64), value, dtype=dtype, device=device)
    v = torch.randn(1, 2, 130, 64, device=device).to(dtype)
    for causal in (False, True):
        out, lse = fusedlm.attention(q, k, v, causal=causal, scale=0.125, return_lse=True, backend=backend)
        ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=0.125,
                                           return_lse=True)
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(lse.double(), ref_lse, atol=0.0, rtol=2e-6)


try:  # the forward tiles the GPU tuner of the Triton backend chooses from
    from fusedlm.kernels import attention as attention_kernels
    from fusedlm.kernels import attention_config

    FWD_CANDIDATES = sorted({c for cs in attention_kernels._GPU_FWD_CANDIDATES.values() for c in cs})
    # the entries of every Triton release, whichever is installed
    FAMILY_TILES = sorted({(kernel, bucket, config)
                           for table in (attention_kernels._GPU_FAMILY, attention_config._GPU_FAMILY_BEFORE_3_9)
                           for (_, kernel, bucket, low), config in table.items() if low})
except ImportError:  # no triton: nothing to choose from
    FWD_CANDIDATES, FAMILY_TILES = [], []


@pytest.mark.triton
@pytest.mark.parametrize("config", FWD_CANDIDATES, ids=str)
@pytest.mark.parametrize("case", [(2, 4, 2, 257, 300, 128, True), (1, 4, 1, 300, 129, 80, False),
                                  (1, 2, 1, 97, 97, 128, True)], ids=str)
def test_attention_triton_forward_candidates(monkeypatch, config, case):
    """Each forward tile (BLOCK_M, BLOCK_N, warps, stages) the GPU tuner can pick, forced, in 16-bit at head
    dims of its bucket (bf16 on a GPU, fp16 in the interpreter, which takes the block sizes and ignores
    warps and stages): the tuner keeps whichever is fastest, so every one must be right, causal masks
    with BLOCK_M != BLOCK_N included."""
    monkeypatch.setattr(attention_kernels, "_fwd_config", lambda *args: config)
    device = backend_device("triton")
    (q, k, v), do = _inputs(case, torch.bfloat16 if HAS_GPU else torch.float16, device)
    out, lse, grads = _run(fusedlm.attention, q, k, v, do, causal=case[-1], backend="triton")
    _check_all(out, lse, grads, q, k, v, do, case[-1])


@pytest.mark.triton
@pytest.mark.parametrize("kernel,bucket,config", FAMILY_TILES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_triton_family_tiles(monkeypatch, kernel, bucket, config, causal):
    """Each 16-bit tile of one GPU family or Triton release (_GPU_FAMILY), forced on its kernel at head dims
    of its bucket, GQA and Nq != Nk (bf16 on a GPU, fp16 in the interpreter, which ignores warps and stages)."""
    if kernel == "fwd":
        monkeypatch.setattr(attention_kernels, "_fwd_config", lambda *args: config)
    else:
        config_of = attention_kernels._config
        monkeypatch.setattr(attention_kernels, "_config",
                            lambda q, block_d, name: config if name == kernel else config_of(q, block_d, name))
    device = backend_device("triton")
    for d in (bucket, 80) if bucket == 128 else (bucket,):
        case = (1, 4, 2, 200, 131, d, causal)
        (q, k, v), do = _inputs(case, torch.bfloat16 if HAS_GPU else torch.float16, device)
        out, lse, grads = _run(fusedlm.attention, q, k, v, do, causal=causal, backend="triton")
        _check_all(out, lse, grads, q, k, v, do, causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_lse_gradient_and_scale(backend):
    """return_lse=True with a loss on lse too (dlse folded into delta), and an explicit scale."""
    device = backend_device(backend)
    case = (1, 4, 2, 97, 64, 64, True)
    (q, k, v), do = _inputs(case, torch.float32, device)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64, device=device)
    out, lse, grads = _run(fusedlm.attention, q, k, v, do, dlse, causal=True, scale=0.3, backend=backend)
    _check_all(out, lse, grads, q, k, v, do, True, dlse, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_non_contiguous_inputs(backend):
    """q, k, v as transposed (B, N, H, D) views (the layout a fused qkv projection gives), no copy needed."""
    device = backend_device(backend)
    b, h, n, d = 1, 4, 97, 64
    qkv = torch.randn(b, n, 3, h, d, dtype=torch.float64).float().to(device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D), strides (N*3*H*D, D, 3*H*D, 1)
    assert not q.is_contiguous()
    do = torch.randn(b, h, n, d, dtype=torch.float64, device=device)
    out, lse, grads = _run(fusedlm.attention, q, k, v, do, causal=True, backend=backend)
    _check_all(out, lse, grads, q, k, v, do, True)
    # a head dim with a stride (copied once by the launcher) still gives the same bits
    q2 = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    out2 = fusedlm.attention(q2, k, v, causal=True, backend=backend)
    assert torch.equal(out2, out)


@pytest.mark.parametrize("backend,dtype", [pytest.param(*b.values, torch.float32, marks=b.marks, id=f"{b.id}-fp32")
                                           for b in BACKENDS] + [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")])
def test_attention_decode_from_strided_kv_cache(backend, dtype):
    """One query against K and V read through a (B, N, 2, H, D) cache's strides (rows 2 H D apart); the
    CPU reads bf16 K and V in place there too."""
    device = backend_device(backend)
    b, h, nk, d = 2, 4, 301, 64
    kv = torch.randn(b, nk, 2, h, d, dtype=torch.float64).to(dtype).to(device)
    k, v = (kv[:, :, i].transpose(1, 2) for i in range(2))
    q = torch.randn(b, h, 1, d, dtype=torch.float64).to(dtype).to(device)
    do = torch.randn(b, h, 1, d, dtype=torch.float64, device=device)
    out, lse, grads = _run(fusedlm.attention, q, k, v, do, causal=True, backend=backend)
    _check_all(out, lse, grads, q, k, v, do, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backward_is_deterministic(backend):
    device = backend_device(backend)
    (q, k, v), do = _inputs((1, 8, 2, 97, 97, 64, True), torch.float32, device)
    _, _, g1 = _run(fusedlm.attention, q, k, v, do, causal=True, backend=backend)
    _, _, g2 = _run(fusedlm.attention, q, k, v, do, causal=True, backend=backend)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_cpu_same_bits_for_any_thread_count(dtype):
    """The CPU backward sums every gradient in one thread's fixed order: 1 thread and all give the same bits."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("needs >= 2 threads to compare with 1 (torch.get_num_threads() is 1 here)")
    (q, k, v), do = _inputs((2, 8, 2, 130, 97, 64, True), dtype, "cpu")
    try:
        torch.set_num_threads(1)
        out1, lse1, g1 = _run(fusedlm.attention, q, k, v, do, causal=True, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    out2, lse2, g2 = _run(fusedlm.attention, q, k, v, do, causal=True, backend="cpu")
    for a, c in zip((out1, lse1, *g1), (out2, lse2, *g2)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype,case", [(torch.float32, (1, 4, 2, 97, 130, 80, True)),
                                        (torch.float32, (1, 2, 1, 70, 33, 12, False)),
                                        (torch.bfloat16, (1, 2, 1, 70, 65, 64, True))])
def test_attention_cpu_portable_kernels(monkeypatch, dtype, case):
    """FUSEDLM_CPU_ISA=scalar runs the portable tile kernels (what a CPU without AVX-512 gets)."""
    monkeypatch.setenv("FUSEDLM_CPU_ISA", "scalar")
    (q, k, v), do = _inputs(case, dtype, "cpu")
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    out, lse, grads = _run(fusedlm.attention, q, k, v, do, dlse, causal=case[-1], backend="cpu")
    _check_all(out, lse, grads, q, k, v, do, case[-1], dlse)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_cpu_bf16_without_avx512_bf16(monkeypatch, causal):
    """FUSEDLM_CPU_BF16=0: bf16 inputs through fp32 copies and the fp32 AVX-512 tiles, what an
    AVX-512 CPU without the avx512_bf16 dot products runs."""
    if "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("FUSEDLM_CPU_ISA", "avx512")
    monkeypatch.setenv("FUSEDLM_CPU_BF16", "0")
    case = (2, 4, 2, 77, 130, 64, causal)
    (q, k, v), do = _inputs(case, torch.bfloat16, "cpu")
    dlse = torch.randn(q.shape[:3], dtype=torch.float64)
    out, lse, grads = _run(fusedlm.attention, q, k, v, do, dlse, causal=causal, backend="cpu")
    _check_all(out, lse, grads, q, k, v, do, causal, dlse)


@pytest.mark.parametrize("isa,bf16", [("scalar", "1"), ("avx512", "1"), ("avx512", "0")], ids=["scalar", "avx512",
                                                                                          "avx512-no-bf16-dots"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nq", [1, 70], ids=["decode", "tiles"])
def test_attention_cpu_nan_key_makes_its_rows_nan(monkeypatch, isa, bf16, dtype, nq):
    """A NaN in one key makes the output of every query that sees that key NaN, as the reference's
    (the AVX-512 exp once clamped NaN scores to 0 and dropped the key); the queries that do not see it
    (causal) stay as the reference's; the backward's gradients of those rows stay finite."""
    if isa == "avx512" and "avx512f" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("FUSEDLM_CPU_ISA", isa)
    monkeypatch.setenv("FUSEDLM_CPU_BF16", bf16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g).to(dtype) for n in (nq, 80, 80))
    k[0, 1, 75, 5] = float("nan")  # head 1, key 75: with causal alignment, queries i >= 75 - (80 - nq) see it
    out = fusedlm.attention(q, k, v, causal=True, backend="cpu").float()
    ref = fusedlm.reference.attention(q.double(), k.double(), v.double(), causal=True)
    sees = torch.arange(nq) + (80 - nq) >= 75
    assert out[0, 1, sees].isnan().all()
    torch.testing.assert_close(out[0, 1, ~sees].double(), ref[0, 1, ~sees], rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(out[0, 0].double(), ref[0, 0], rtol=3e-2, atol=3e-2)


def test_attention_cpu_isa_variable_is_checked(monkeypatch):
    monkeypatch.setenv("FUSEDLM_CPU_ISA", "sse9")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="attention_fwd: FUSEDLM_CPU_ISA must be one of"):
        fusedlm.attention(q, q, q, backend="cpu")


def test_attention_auto_takes_the_cpu_kernel():
    (q, k, v), _ = _inputs((1, 4, 2, 33, 40, 64, True), torch.float32, "cpu")
    assert torch.equal(fusedlm.attention(q, k, v, causal=True), fusedlm.attention(q, k, v, causal=True, backend="cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_opcheck(backend, causal):
    device = backend_device(backend)
    d = 64 if backend == "cuda" else 16  # the smallest head dim the CUDA kernels specialise
    (q, k, v), _ = _inputs((1, 4, 2, 33, 17, d, causal), torch.float32, device)
    scale = 1 / math.sqrt(d)
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.fusedlm, f"attention_fwd{suffix}").default
    bwd = getattr(torch.ops.fusedlm, f"attention_bwd{suffix}").default
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(fwd, (*leaves, causal, scale))
    out, lse = fwd(q, k, v, causal, scale)
    dout = torch.randn_like(out)
    torch.library.opcheck(bwd, (dout, q, k, v, out, lse, None, causal, scale))
    torch.library.opcheck(bwd, (dout, q, k, v, out, lse, torch.randn_like(lse), causal, scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_torch_compile_fullgraph(backend):
    device = backend_device(backend)
    (q, k, v), _ = _inputs((1, 4, 2, 40, 40, 64 if backend == "cuda" else 32, True), torch.float32, device)

    def block(q, k, v):
        out, lse = fusedlm.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = block(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, c in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, c.grad)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("d,dtype,msg", [(8, torch.float32, "head dims 16..256 that are multiples of 8, got 8"),
                                         (20, torch.float32, "multiples of 8, got 20"),
                                         (16, torch.float64, "float32, bfloat16, float16 tensors, got float64")])
def test_attention_triton_refuses_what_it_cannot_run(backend, d, dtype, msg):
    q = torch.randn(1, 2, 5, d, dtype=dtype, device=backend_device(backend))
    with pytest.raises(fusedlm.BackendError, match=f"attention: backend='triton' cannot run these inputs: .*{msg}"):
        fusedlm.attention(q, q, q, backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_attention_cpu_refuses_what_it_cannot_run(dtype):
    q = torch.randn(1, 2, 5, 16, dtype=dtype)
    with pytest.raises(fusedlm.BackendError,
                       match=f"attention: backend='cpu' cannot run these inputs: it takes float32, bfloat16 tensors, "
                             f"got {fmt_dtype(dtype)}"):
        fusedlm.attention(q, q, q, backend="cpu")
    torch.testing.assert_close(fusedlm.attention(q, q, q), reference.attention(q, q, q))  # auto: the reference


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
@pytest.mark.parametrize("d", [16, 72, 256])
def test_attention_cuda_refuses_head_dims_it_does_not_specialise(d):
    q = torch.randn(1, 2, 5, d, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(fusedlm.BackendError, match=f"backend='cuda' cannot run these inputs: it takes head dims "
                                                    f"64, 80, 96, 128, got {d}"):
        fusedlm.attention(q, q, q, backend="cuda")


def test_attention_cuda_backend_needs_cuda_tensors():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(fusedlm.BackendError, match="attention: backend='cuda' cannot run these inputs: the tensors are "
                                                   "on cpu"):
        fusedlm.attention(q, q, q, backend="cuda")


def _op_args(**over):
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    out, lse = torch.ops.fusedlm.attention_fwd(q, k, v, True, 0.25)
    args = dict(dout=torch.randn_like(out), q=q, k=k, v=v, out=out, lse=lse, dlse=None, causal=True, scale=0.25)
    args.update(over)
    return args


# The C++ ops check what the public function does not see (the backward's tensors) and what it does,
# for callers of torch.ops.fusedlm.* directly.
CPU_OP_BAD = [
    (dict(q=torch.randn(1, 4, 5, 16, dtype=torch.float16)), r"attention_fwd: q must be float32 or bfloat16, got Half"),
    (dict(q=torch.randn(4, 5, 16)), r"attention_fwd: q must be 4-D \(B, H, N, D\), got shape \(4, 5, 16\)"),
    (dict(k=torch.randn(1, 3, 7, 16), v=torch.randn(1, 3, 7, 16)),
     r"attention_fwd: q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (dict(v=torch.randn(1, 2, 6, 16)), r"attention_fwd: v must have shape \(1, 2, 7, 16\) \(the shape of k\)"),
    (dict(k=torch.randn(2, 2, 7, 16)), r"attention_fwd: k must have shape \(1, 2, 7, 16\) \(q's batch and head dim\)"),
    (dict(k=torch.randn(1, 2, 7, 16).double()), r"attention_fwd: k must be float32 or bfloat16, got Double"),
    (dict(scale=0.0), "attention_fwd: scale must be finite and > 0"),
    (dict(scale=1e-46), "attention_fwd: scale must be finite and > 0 in float32"),  # 0 as a float
    (dict(scale=3e38), r"attention_fwd: scale must be finite and > 0 in float32 \(also times log2\(e\)\)"),
    (dict(lse=torch.zeros(1, 4, 6)), r"attention_bwd: lse must have shape \(1, 4, 5\)"),
    (dict(dlse=torch.zeros(1, 4, 5, dtype=torch.float64)), "attention_bwd: dlse must be float32, got Double"),
    (dict(dout=torch.randn(1, 4, 5, 16).bfloat16()), "attention_bwd: dout must have dtype Float .*, got BFloat16"),
]


@pytest.mark.parametrize("over,msg", CPU_OP_BAD)
def test_attention_cpu_op_bad_inputs(over, msg):
    a = _op_args(**over)
    is_bwd = msg.startswith("attention_bwd") or not any(name in over for name in ("q", "k", "v", "scale"))
    with pytest.raises(RuntimeError, match=msg):
        if is_bwd:
            torch.ops.fusedlm.attention_bwd(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], a["dlse"],
                                            a["causal"], a["scale"])
        else:
            torch.ops.fusedlm.attention_fwd(a["q"], a["k"], a["v"], a["causal"], a["scale"])
