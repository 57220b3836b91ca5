"""The CUDA C++ attention kernels (csrc/cuda/attention_*.cu) through their ops, fusedlm::attention_fwd /
attention_bwd on CUDA tensors, against the float64 reference under the error-budget rule.

GPU only. The grid covers what the kernels special-case: fp16 / bf16 (tensor cores) and fp32 (CUDA
cores); every specialised head dim (64, 80, 96, 128); causal both ways; GQA 8/2 and MQA; Nq != Nk both
ways (rows that see no key: zeros and lse = -inf); N in {1, 17, 97, 1025, 4096} (tails of every tile
size); strided and misaligned inputs; dlse; bitwise-deterministic backward; the error for a head dim
the kernels are not specialised for. Sized to stay under a minute on one GPU (not yet timed on one).
"""
import math

import pytest
import torch

from fusedlm import dispatch, reference
from harness import HAS_GPU, assert_within_budget

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")]

DEV = "cuda"
HEAD_DIMS = (64, 80, 96, 128)


def _ops():
    assert dispatch._C is not None, f"fusedlm._C did not load: {dispatch._C_ERROR}"  # it registers the ops
    return torch.ops.fusedlm.attention_fwd.default, torch.ops.fusedlm.attention_bwd.default


def _randn(*shape):
    return torch.randn(shape, dtype=torch.float64, device=DEV)


def _reference(q, k, v, do, dlse, causal, scale):
    """out, lse, (dq, dk, dv) of reference.attention for the loss sum(out do) + sum(lse dlse)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.attention(*leaves, causal=causal, scale=scale, return_lse=True)
    loss = (out.double() * do).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse.double() * dlse, torch.zeros_like(dlse)).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def _check(q, k, v, causal, *, dlse=False, scale=None, do=None):
    """Runs the CUDA ops on q, k, v (any strides) and holds every output to the budget."""
    fwd, bwd = _ops()
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out, lse = fwd(q, k, v, causal, scale)
    do = _randn(*q.shape) if do is None else do
    dl = _randn(*q.shape[:3]) if dlse else None
    dq, dk, dv = bwd(do.to(q.dtype), q, k, v, out, lse, None if dl is None else dl.float(), causal, scale)
    # The reference sees the rounded dO the kernels saw.
    do64 = do.to(q.dtype).double()
    out64, lse64, grads64 = _reference(*(t.double() for t in (q, k, v)), do64, dl, causal, scale)
    outt, lset, gradst = _reference(q, k, v, do64, dl, causal, scale)

    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    seen = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), seen), "lse: the rows that see no key differ from the reference"
    assert (lse[~seen] == float("-inf")).all() and (out[~seen] == 0).all(), "a row that sees no key: 0, -inf"
    assert_within_budget(out, out64, outt, name="out")
    assert_within_budget(lse[seen], lse64[seen], lset[seen].float(), name="lse")
    for name, g, t, g64, gt in zip(("dq", "dk", "dv"), (dq, dk, dv), (q, k, v), grads64, gradst):
        assert g.dtype == q.dtype and g.shape == t.shape and g.is_contiguous(), name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert_within_budget(g, g64, gt, name=name)
    return out, lse, (dq, dk, dv)


def _qkv(b, hq, hkv, nq, nk, d, dtype):
    return _randn(b, hq, nq, d).to(dtype), _randn(b, hkv, nk, d).to(dtype), _randn(b, hkv, nk, d).to(dtype)


# (B, Hq, Hkv, Nq, Nk): odd and round lengths, GQA 8/2 and MQA, Nq > Nk (causal: leading rows see no
# key) and Nq < Nk (decode, prefill against a cache).
SHAPES = [
    (1, 2, 1, 1, 1),
    (2, 2, 2, 17, 17),
    (1, 8, 2, 97, 97),
    (1, 8, 1, 17, 97),
    (1, 2, 1, 97, 17),
    (1, 2, 2, 1, 1025),
    (1, 4, 2, 1025, 1025),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_matches_reference(dtype, d, causal):
    # 16-bit: every shape at every head dim; fp32 (the CUDA-core path) on fewer shapes to keep time down.
    for shape in SHAPES if dtype != torch.float32 else SHAPES[::2]:
        _check(*_qkv(*shape, d, dtype), causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_long_sequence(dtype, d):
    """N = 4096: many key blocks through the double buffer, and long backward loops."""
    _check(*_qkv(1, 2, 1, 4096, 4096, d, dtype), True)


def test_long_sequence_fp32():
    _check(*_qkv(1, 1, 1, 1025, 4096, 64, torch.float32), True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dlse_and_scale(dtype):
    """A gradient reaching lse (return_lse=True) folds into delta; an explicit scale."""
    _check(*_qkv(1, 4, 2, 97, 64, 64, dtype), True, dlse=True, scale=0.3)
    _check(*_qkv(1, 4, 2, 64, 97, 128, dtype), False, dlse=True, scale=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_strided_inputs(dtype):
    """q, k, v as (B, N, H, D) views of a fused qkv projection, read through their strides; a
    non-contiguous dO; and a misaligned view (copied once) give the reference's answer."""
    b, h, n, d = 2, 4, 97, 64
    qkv = _randn(b, n, 3, h, d).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    do = _randn(b, n, h, d).transpose(1, 2)
    out, _, grads = _check(q, k, v, True, do=do)
    # Same bits as contiguous copies: strides change addresses, not arithmetic.
    fwd, _ = _ops()
    out_c, _ = fwd(q.contiguous(), k.contiguous(), v.contiguous(), True, 1.0 / math.sqrt(d))
    assert torch.equal(out, out_c)
    # Rows one element off 16-byte alignment (cp.async cannot take them): copied, still right.
    wide = _randn(b, h, n, d + 1).to(dtype)
    _check(wide[..., 1:], k.contiguous(), v.contiguous(), False)


def test_backward_is_deterministic():
    fwd, bwd = _ops()
    q, k, v = _qkv(1, 8, 2, 1025, 1025, 64, torch.bfloat16)
    out, lse = fwd(q, k, v, True, 0.125)
    do = torch.randn_like(out)
    first = bwd(do, q, k, v, out, lse, None, True, 0.125)
    for _ in range(2):
        for a, c in zip(first, bwd(do, q, k, v, out, lse, None, True, 0.125)):
            assert torch.equal(a, c)


def test_empty_and_keyless_inputs():
    """Nq = 0 gives empty outputs and zero dK, dV; with causal and Nq > Nk + 64 whole query blocks see no key."""
    fwd, bwd = _ops()
    q, k, v = _qkv(1, 2, 1, 0, 17, 64, torch.float16)
    out, lse = fwd(q, k, v, False, 0.125)
    assert out.shape == q.shape and lse.shape == (1, 2, 0)
    _, dk, dv = bwd(out, q, k, v, out, lse, None, False, 0.125)
    assert (dk == 0).all() and (dv == 0).all()
    _check(*_qkv(1, 2, 1, 200, 3, 64, torch.float16), True)


def test_unsupported_head_dim_is_a_clear_error():
    fwd, _ = _ops()
    q, k, v = _qkv(1, 2, 1, 17, 17, 72, torch.float16)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' takes head dims 64, 80, 96, 128; got 72 "
                                           r"\(backend='triton' covers it\)"):
        fwd(q, k, v, False, 0.125)
