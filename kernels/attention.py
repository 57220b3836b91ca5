r"""Triton kernels for fused attention (FlashAttention-2): fusedlm::attention_{fwd,bwd}_triton.

Shapes: q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); query head h reads kv head h // G, G = Hq / Hkv
(an index, never a repeated K/V). Inputs are taken by their strides (the last dim must have stride 1,
else it is copied once); out, lse and the gradients are allocated contiguous.

Forward, per (batch, query head, BLOCK_M query rows), over BLOCK_N key blocks j, in float32:

    s    = q k_j^T,  c = scale * log2(e)              base 2: exp2 instead of exp
    m'   = max(m, rowmax(s));  p = exp2((s - m') c);  alpha = exp2((m - m') c)
    l    = alpha * l + rowsum(p);  acc = alpha * acc + p v_j
    out  = acc / l;  lse = (c m + log2(l)) * ln(2)     natural-log lse, (B, Hq, Nq) float32

Causal (bottom-right aligned: query i sees key j iff j <= i + Nk - Nq): the key loop of a query block
stops at the last key its last row sees (blocks above the diagonal are never loaded), and only the
blocks that cross the diagonal or the Nk tail pay for a mask (a second call of the inner loop with
MASKED=True). A row that sees no key keeps m = -inf; the m' = -inf case shifts by 0 instead, so p and
alpha are 0, never NaN, and the row stores out = 0 and lse = -inf.

Backward, with P recomputed from lse (nothing N x N is stored), dO the output gradient:

    delta = rowsum(dO * O) - dlse                     (_attn_bwd_preprocess_kernel; dlse: grad of lse)
    P = exp2(s - lse * log2(e));  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - delta)
    dK = scale * dS^T Q;  dQ = scale * dS K

_attn_bwd_dkdv_kernel owns one key block of one kv head and loops over the G query heads of its group
and over their query blocks, summing into registers in a fixed order; _attn_bwd_dq_kernel owns one query
block and loops over key blocks. No atomics anywhere: the gradients are the same bits on every run.

Memory traffic (s = bytes per element): forward reads q once and K, V once per query block
(B*Hq*cdiv(Nq, BLOCK_M)*2*Nk*D*s, halved by causal skipping), writes out and 4 bytes of lse per row.
Backward reads q, dO, lse, delta once per key block and K, V once per query block; extra memory O(N).

Head dims: BLOCK_D = next_power_of_2(D), and HEAD_DIM = D is a constexpr, so 80 and 96 mask their last
columns while 64, 128 and 256 load whole rows (vectorised).

Launch configuration (kernels/attention_config.py): `_gpu_config` is one table per (head-dim bucket, 16- or
32-bit input) for sm_80 and sm_90, `_GPU_FAMILY` the entries that differ by family (or Triton release); for the
16-bit forward at 64 < D <= 128 `_fwd_config` times a few candidate tiles per GPU family on the first call
of each class of shapes and keeps the fastest. Every entry and candidate is compiled by
`static_report_specs()` (python -m fusedlm.gpu_report), causal and not, without spills.
Under TRITON_INTERPRET=1 (CPU tensors) the blocks are 64 x 64: few programs, since the interpreter's
cost grows with the number of programs and loop iterations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedlm.kernels import REPORT_ARCHS, device_guard
from fusedlm.kernels.attention_config import (  # the tables and the forward's tuner
    _GPU_FAMILY, _GPU_FWD_CANDIDATES, _TL_DTYPE, INTERPRET_BLOCK, _bucket, _config, _dkdv_passes, _fwd_config,
    _gpu_config,
)

OP = "attention"
LOG2E = 1.4426950408889634
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
PRE_TILE = 2048  # elements of O and dO per program of the delta pre-pass on a GPU


# --- forward -------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, mask_d,
                    start, end, n_q, n_k, qk_scale,
                    CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax over the key blocks [start, end); MASKED blocks apply the Nk tail and causal masks."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n < n_k)[:, None] & mask_d[None, :]
        k = tl.load(K_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if MASKED:
            visible = (offs_n < n_k)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (n_k - n_q))
            s = tl.where(visible, s, float("-inf"))
        # The max in the raw scores' units, the scale applied after the shift: the row max's p is exactly 1.
        # (s * qk_scale - m, which LLVM fuses into one FMA, gives it 2^(the rounding error of m), inf or 0
        # for scores around 1e9.)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2(-inf) = 0
        p = tl.math.exp2((s - m_shift[:, None]) * qk_scale)
        alpha = tl.math.exp2((m_i - m_shift) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q_ptr, K_ptr, V_ptr, O_ptr, LSE_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n_heads, group, n_q, n_k, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (m, b * Hq + h): out and lse of query rows [m * BLOCK_M, ...) of head h in batch b."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_mask = offs_m < n_q
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_mask[:, None] & mask_d[None, :], other=0.0)
    K_ptr += b * stride_kb + hk * stride_kh
    V_ptr += b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys [0, full_end) need no mask; [full_end, end) do. Causal: the block's last row sees keys
    # j <= last + Nk - Nq (end), its first row j <= first + Nk - Nq (full blocks end below that).
    end = n_k
    full_end = (n_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_q) - 1
        end = tl.maximum(tl.minimum(n_k, last + n_k - n_q + 1), 0)
        first_sees = pid_m * BLOCK_M + n_k - n_q + 1
        full_end = tl.minimum(full_end, tl.maximum(first_sees, 0) // BLOCK_N * BLOCK_N)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, mask_d,
                                    0, full_end, n_q, n_k, qk_scale, CAUSAL, False, BLOCK_N, IEEE)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_m, offs_d, mask_d,
                                    full_end, end, n_q, n_k, qk_scale, CAUSAL, True, BLOCK_N, IEEE)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i * qk_scale + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(O_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(O_ptr.dtype.element_ty), mask=row_mask[:, None] & mask_d[None, :])
    tl.store(LSE_ptr + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=row_mask)


# --- backward ------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(
    O_ptr, DO_ptr, DLSE_ptr, Delta_ptr,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    n_heads, n_q,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, (B, Hq, Nq) float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = pid_bh.to(tl.int64) * n_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE_ptr + row, mask=offs_m < n_q, other=0.0)
    tl.store(Delta_ptr + row, delta, mask=offs_m < n_q)


@triton.jit
def _load_lse2(LSE_ptr, rows, row_mask):
    """lse in base 2; -inf (a row that sees no key) becomes +inf so that its P = exp2(s - inf) = 0."""
    lse = tl.load(LSE_ptr + rows, mask=row_mask, other=float("inf"))  # rows past Nq: P = 0 too
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, Delta_ptr, DK_ptr, DV_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    n_heads, group, n_q, n_k, qk_scale, scale, out_col0,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr, OUT_COLS: tl.constexpr,
):
    """Program (n, b * Hkv + hk): dK, dV of keys [n * BLOCK_N, ...) of kv head hk, summed over its G query
    heads in order. Computed transposed (keys on the rows): sT = k q^T, so no P tile is transposed.
    DO_DK / DO_DV and the output columns [out_col0, out_col0 + OUT_COLS): at D = 256 on a GPU the gradients
    are split over launches (dV; dK[:, :128]; dK[:, 128:]) so that one small accumulator is live at a time."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_kv_heads = n_heads // group
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hk = (pid_bh % n_kv_heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_mask = (offs_n < n_k)[:, None] & mask_d[None, :]
    k = tl.load(K_ptr + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V_ptr + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    offs_o = out_col0 + tl.arange(0, OUT_COLS)
    out_mask = (offs_n < n_k)[:, None] & (offs_o < HEAD_DIM)[None, :]
    dk = tl.zeros([BLOCK_N, OUT_COLS], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, OUT_COLS], dtype=tl.float32)
    # Query i sees key j iff i >= j - (Nk - Nq): the first query block that sees this key block starts at
    # `start`; from `full_start` on, every row sees every key of the block (no mask, unless the Nk tail).
    start = 0
    full_start = 0
    if CAUSAL:
        start = tl.maximum(pid_n * BLOCK_N - (n_k - n_q), 0) // BLOCK_M * BLOCK_M
        full_start = tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - (n_k - n_q), 0)
        full_start = tl.minimum(tl.cdiv(full_start, BLOCK_M) * BLOCK_M, tl.cdiv(n_q, BLOCK_M) * BLOCK_M)
    tail = pid_n * BLOCK_N + BLOCK_N > n_k
    if tail:
        full_start = tl.cdiv(n_q, BLOCK_M) * BLOCK_M  # this block holds the Nk tail: mask every query block
    offs_m0 = tl.arange(0, BLOCK_M)
    for g in range(0, group):
        h = hk * group + g
        bh = b * n_heads + h
        Qh_ptr = Q_ptr + b * stride_qb + h * stride_qh
        DOh_ptr = DO_ptr + b * stride_dob + h * stride_doh
        for start_m in range(start, tl.cdiv(n_q, BLOCK_M) * BLOCK_M, BLOCK_M):
            offs_m = start_m + offs_m0
            row_mask = offs_m < n_q
            q_mask = row_mask[:, None] & mask_d[None, :]
            q = tl.load(Qh_ptr + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DOh_ptr + offs_m[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
            if OUT_COLS == BLOCK_D:
                q_out = q
                do_out = do
            else:  # the columns of q and dO this launch's dK / dV columns need (L1 hits)
                o_mask = row_mask[:, None] & (offs_o < HEAD_DIM)[None, :]
                q_out = tl.load(Qh_ptr + offs_m[:, None] * stride_qn + offs_o[None, :], mask=o_mask, other=0.0)
                do_out = tl.load(DOh_ptr + offs_m[:, None] * stride_don + offs_o[None, :], mask=o_mask, other=0.0)
            lse2 = _load_lse2(LSE_ptr, bh * n_q + offs_m, row_mask)
            delta = tl.load(Delta_ptr + bh * n_q + offs_m, mask=row_mask, other=0.0)
            if IEEE:
                s_t = tl.dot(k, tl.trans(q), input_precision="ieee")
            else:
                s_t = tl.dot(k, tl.trans(q))
            p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
            if start_m < full_start:  # crosses the diagonal or holds the Nk tail
                visible = (offs_n < n_k)[:, None]
                if CAUSAL:
                    visible = visible & (offs_m[None, :] >= offs_n[:, None] - (n_k - n_q))
                p_t = tl.where(visible, p_t, 0.0)
            if DO_DV:
                if IEEE:
                    dv += tl.dot(p_t, do_out, input_precision="ieee")
                else:
                    dv += tl.dot(p_t.to(do.dtype), do_out)
            if DO_DK:
                if IEEE:
                    dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
                else:
                    dp_t = tl.dot(v, tl.trans(do))
                ds_t = p_t * (dp_t - delta[None, :])
                if IEEE:
                    dk += tl.dot(ds_t, q_out, input_precision="ieee")
                else:
                    dk += tl.dot(ds_t.to(q.dtype), q_out)
    out_offs = (b * n_kv_heads + hk) * n_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_o[None, :]
    if DO_DK:
        tl.store(DK_ptr + out_offs, (dk * scale).to(DK_ptr.dtype.element_ty), mask=out_mask)
    if DO_DV:
        tl.store(DV_ptr + out_offs, dv.to(DV_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr, K_ptr, V_ptr, DO_ptr, LSE_ptr, Delta_ptr, DQ_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    n_heads, group, n_q, n_k, qk_scale, scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (m, b * Hq + h): dQ of query rows [m * BLOCK_M, ...), over the key blocks they see."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_mask = offs_m < n_q
    q_mask = row_mask[:, None] & mask_d[None, :]
    q = tl.load(Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=q_mask, other=0.0)
    rows = pid_bh.to(tl.int64) * n_q + offs_m
    lse2 = _load_lse2(LSE_ptr, rows, row_mask)
    delta = tl.load(Delta_ptr + rows, mask=row_mask, other=0.0)
    K_ptr += b * stride_kb + hk * stride_kh
    V_ptr += b * stride_vb + hk * stride_vh
    end = n_k
    full_end = (n_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_q) - 1
        end = tl.maximum(tl.minimum(n_k, last + n_k - n_q + 1), 0)
        full_end = tl.minimum(full_end, tl.maximum(pid_m * BLOCK_M + n_k - n_q + 1, 0) // BLOCK_N * BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n < n_k)[:, None] & mask_d[None, :]
        k = tl.load(K_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if start_n >= full_end:
            visible = (offs_n < n_k)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + (n_k - n_q))
            p = tl.where(visible, p, 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    dq *= scale
    tl.store(DQ_ptr + pid_bh.to(tl.int64) * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(DQ_ptr.dtype.element_ty), mask=q_mask)


def _check(q, k, v) -> None:
    if q.dtype not in _TL_DTYPE:
        raise TypeError(f"{OP}: the triton backend takes float32, bfloat16 or float16 q, got {q.dtype}")
    d = q.shape[-1]
    if d % 8 != 0 or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: the triton backend takes head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM} that are "
                         f"multiples of 8, got {d}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/row strides, but the head dim must be dense (copied once otherwise)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


# --- launchers -----------------------------------------------------------------------------

def attention_fwd(q, k, v, causal: bool, scale: float):
    """fusedlm::attention_fwd_triton: (out (B, Hq, Nq, D) contiguous in q's dtype, lse (B, Hq, Nq) float32)."""
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    out = torch.empty((b, hq, n_q, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, n_q), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(d))

    def launch(config):
        block_m, block_n, num_warps, num_stages = config
        _attn_fwd_kernel[(triton.cdiv(n_q, block_m), b * hq)](
            q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            hq, hq // hkv, n_q, n_k, scale * LOG2E,
            CAUSAL=causal, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype == torch.float32,
            num_warps=num_warps, num_stages=num_stages,
        )

    with device_guard(OP, q):
        launch(_fwd_config(q, n_k, block_d, causal, launch))
    return out, lse


def attention_bwd(do, q, k, v, out, lse, dlse, causal: bool, scale: float):
    """fusedlm::attention_bwd_triton: (dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    _check(q, k, v)
    q, k, v, out, do = (_unit_last(t) for t in (q, k, v, out, do))
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    dq = torch.empty((b, hq, n_q, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, n_k, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hkv, n_k, d), dtype=v.dtype, device=v.device)
    delta = torch.empty((b, hq, n_q), dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    block_d = max(16, triton.next_power_of_2(d))
    ieee = q.dtype == torch.float32
    pre_m = PRE_TILE // block_d if q.is_cuda else INTERPRET_BLOCK
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), hq, hq // hkv, n_q, n_k, scale * LOG2E, scale)
    with device_guard(OP, q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, pre_m), b * hq)](
            out, do, dlse if dlse is not None else lse, delta, *_strides(out), *_strides(do), hq, n_q,
            HAS_DLSE=dlse is not None, HEAD_DIM=d, BLOCK_M=pre_m, BLOCK_D=block_d, num_warps=4,
        )
        block_m, block_n, num_warps, num_stages = _config(q, block_d, "dkdv")
        for do_dk, do_dv, col0, cols in _dkdv_passes(block_d):
            _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, block_n), b * hkv)](
                q, k, v, do, lse, delta, dk, dv, *common, col0,
                CAUSAL=causal, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee,
                DO_DK=do_dk, DO_DV=do_dv, OUT_COLS=cols, num_warps=num_warps, num_stages=num_stages,
            )
        block_m, block_n, num_warps, num_stages = _config(q, block_d, "dq")
        _attn_bwd_dq_kernel[(triton.cdiv(n_q, block_m), b * hq)](
            q, k, v, do, lse, delta, dq, *common,
            CAUSAL=causal, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=ieee,
            num_warps=num_warps, num_stages=num_stages,
        )
    return dq, dk, dv


# --- static GPU report (python/fusedlm/gpu_report.py compiles these for sm_80 / sm_90a) --------

def static_report_specs() -> list[dict]:
    """One spec per (kernel, configuration the GPU tables can pick, dtype, head-dim bucket, causal or not:
    the causal variant has more code, but the other spilled where it did not). Forward candidates and the
    _GPU_FAMILY entries of one arch family (this Triton release's) compile for that arch only. Head dims 80 and 96
    share the 128 bucket (BLOCK_D = 128, masked columns; HEAD_DIM = 80 is compiled too); attrs say that
    pointers and row strides are 16-divisible, as the JIT finds them for D % 8 == 0 in 16-bit and D % 4 == 0
    in fp32 (every head dim the op takes).
    uses_tensor_cores: True for fp16/bf16 (HGMMA on sm_90a, HMMA on sm_80); fp32 uses ieee dots (FMA).
    """
    specs = []
    for dtype, causal in ((dt, c) for dt in ("fp32", "bf16", "fp16") for c in (True, False)):
        p = "*" + dtype
        for block_d, head_dim in ((64, 64), (128, 128), (128, 80), (256, 256)):  # 80: masked columns
            common = {"CAUSAL": causal, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "IEEE": dtype == "fp32"}

            def family_configs(kernel):  # (configuration, the archs it runs on), shared entry first
                keys = {family: (family, kernel, _bucket(block_d), dtype != "fp32") for family in REPORT_ARCHS}
                shared = tuple(a for family, archs in REPORT_ARCHS.items() if keys[family] not in _GPU_FAMILY
                               for a in archs)
                return [(_gpu_config(block_d, dtype, kernel), shared)] * bool(shared) + [
                    (_GPU_FAMILY[key], REPORT_ARCHS[family]) for family, key in keys.items() if key in _GPU_FAMILY]

            fwd = family_configs("fwd")
            fwd += [(config, REPORT_ARCHS[family])
                    for (family, bucket, low), configs in _GPU_FWD_CANDIDATES.items()
                    if bucket == _bucket(block_d) and low == (dtype != "fp32") for config in configs
                    if not any(c == config and set(REPORT_ARCHS[family]) <= set(a) for c, a in fwd)]
            for (bm, bn, warps, stages), archs in fwd:
                specs.append({**_spec(_attn_fwd_kernel, dtype, warps, stages, {**common, "BLOCK_M": bm, "BLOCK_N": bn},
                                      [p] * 4 + ["*fp32"] + ["i32"] * 16 + ["fp32"]), "archs": archs})
            bwd_types = ["i32"] * 16 + ["fp32", "fp32"]

            for (bm, bn, warps, stages), archs in family_configs("dkdv"):
                for do_dk, do_dv, _, cols in _dkdv_passes(block_d)[:2]:  # the two column halves compile alike
                    spec = _spec(_attn_bwd_dkdv_kernel, dtype, warps, stages,
                                 {**common, "BLOCK_M": bm, "BLOCK_N": bn, "DO_DK": do_dk, "DO_DV": do_dv,
                                  "OUT_COLS": cols},
                                 [p] * 4 + ["*fp32", "*fp32", p, p] + bwd_types + ["i32"])
                    specs.append({**spec, "archs": archs})
            for (bm, bn, warps, stages), archs in family_configs("dq"):
                spec = _spec(_attn_bwd_dq_kernel, dtype, warps, stages, {**common, "BLOCK_M": bm, "BLOCK_N": bn},
                             [p] * 4 + ["*fp32", "*fp32", p] + bwd_types)
                specs.append({**spec, "archs": archs})
            specs.append(_spec(_attn_bwd_preprocess_kernel, dtype, 4, 1,
                               {"HAS_DLSE": True, "HEAD_DIM": head_dim, "BLOCK_M": PRE_TILE // block_d,
                                "BLOCK_D": block_d},
                               [p, p, "*fp32", "*fp32"] + ["i32"] * 8))
    return specs


def _spec(fn, dtype, num_warps, num_stages, constexprs, runtime_types):
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(runtime_types), (fn.__name__, names, len(runtime_types))
    types = dict(zip(names, runtime_types), **{name: "constexpr" for name in constexprs})
    divisible = [n for n in names if types[n].startswith("*") or n.endswith(("_qn", "_kn", "_vn", "_on", "_don"))]
    config = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k != "IEEE")
    return {
        "kernel": fn.__name__, "fn": fn, "signature": {name: types[name] for name in fn.arg_names},
        "constexprs": dict(constexprs),
        "attrs": {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible},
        "num_warps": num_warps, "num_stages": num_stages, "dtype": dtype,
        "uses_tensor_cores": dtype != "fp32" and fn is not _attn_bwd_preprocess_kernel,
        "config": f"{config}, {num_warps} warps, {num_stages} stages",
    }
