r"""Triton kernels for the linear cross-entropy in the Cut Cross-Entropy manner:
fusedlm::linear_cross_entropy_{fwd,bwd}_triton. No (N, V) tensor exists in forward or backward:
every logit tile z = x_blk W_blk^T (+ b) lives in registers and is recomputed where it is needed.
Math and op schema: python/fusedlm/ops/softmax_output.py. x (N, d), W (V, d) row-major, d contiguous.

Forward, program (token block m, vocabulary split s), over the V blocks of its split, in float32:

    z = x_m W_v^T + b_v   (K loop over d)     c = softcap * tanh(z / softcap)   (c = z without softcap)
    mx' = max(mx, rowmax(c));  se = se * exp(mx - mx') + rowsum(exp(c - mx'))   online log-sum-exp
    sc += rowsum(c)  (label smoothing's mean);  ct += rowsum(c * [v == t])   target logit, from the tile

The partial (mx, se, sc, ct) of each split goes to a (S, N) float32 buffer; `_lce_fwd_combine_kernel`
merges the S splits of a token in split order (deterministic) into lse and the loss; a target outside
[0, V) that is not ignore_index matches no column (never read) and gives loss NaN, as the C++ kernels.

Backward recomputes z and forms dz in registers (g = dloss of the token, p = exp(c - lse)):

    dz = g ((1 + 2 z_loss lse) p - (1 - eps)[v == t] - eps / V) (1 - (c / softcap)^2)   0 for ignored/bad t

`_lce_bwd_dx_kernel`, program (token block m, split s): for each V block of its split, dz (BM x BN)
then, d in BLOCK_D chunks, dX_s[m] += dz W_v. `_lce_bwd_dw_kernel`, program (V block v): for each token
block, dz^T (BN x BM) then dW[v] += dz^T x_m, and db[v] += column sums of dz. No atomics: each
program owns its output rows, whose float32 accumulator is read and written in global memory (it
cannot sit in registers: BM x d floats at d = 2048); the first block stores, later ones add. The S dX
partials are summed in split order. Same bits on every run.

Flops: forward 2NVd; backward 4NVd per kernel (z recomputed in both) = 8NVd (eager: 6NVd in all).
Memory traffic beyond the GEMM operands: forward 16 S bytes per token; backward the accumulators,
8 N d bytes per V block of dX and 8 V d bytes per token block of dW (L2 / HBM), which is why the
reduction tile of each (BLOCK_N for dX, BLOCK_M for dW) is the larger one. Extra memory: dX partials
4 S N d (S = 1 unless the token blocks alone cannot fill the GPU), float32 dW / dX for 16-bit inputs.

Launch configuration: `@triton.autotune` over CONFIGS (one list for sm_80 and sm_90, 16-bit or fp32
inputs), every entry compiled without spills for both by static_report_specs() + `python -m
fusedlm.gpu_report`. The kernels are idempotent (first block stores), so autotuning reruns them safely.
fp32 uses ieee dots (FMA, small tiles); 16-bit dots run on tensor cores (HGMMA / HMMA).
Under TRITON_INTERPRET=1 (CPU tensors) one fixed set of large blocks and a single split: few programs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusedlm.kernels import device_guard

OP = "linear_cross_entropy"
LOG2E = tl.constexpr(1.4426950408889634)
SPLIT_ALIGN = 256  # V-split widths are multiples of this, which every BLOCK_N divides
MAX_DX_SPLITS = 4  # most float32 dX partials (each N x d) the backward allocates

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --- shared tile math ----------------------------------------------------------------------

@triton.jit
def _mm_tile(A_ptr, B_ptr, a_rows, b_rows, a_mask, b_mask, d,
             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """A[a_rows] @ B[b_rows]^T, (BLOCK_A, BLOCK_B) float32; A and B row-major with row stride d."""
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A_ptr + a_rows.to(tl.int64)[:, None] * d
    b_base = B_ptr + b_rows.to(tl.int64)[None, :] * d
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_base + k[None, :], mask=a_mask[:, None] & (k < d)[None, :], other=0.0)
        b = tl.load(b_base + k[:, None], mask=(k < d)[:, None] & b_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _cap(z, softcap, SOFTCAP: tl.constexpr):
    """softcap * tanh(z / softcap), tanh(y) = sign(y) (1 - e) / (1 + e) with e = exp(-2|y|) (no overflow)."""
    if SOFTCAP:
        y = z / softcap
        e = tl.math.exp2(tl.abs(y) * (-2.0 * LOG2E))
        t = (1.0 - e) / (1.0 + e)
        z = softcap * tl.where(y < 0, -t, t)
    return z


@triton.jit
def _dlogits(z, is_target, lse, scale_p, hit, shift, keep, softcap, SOFTCAP: tl.constexpr):
    """dz of a tile from its logits z; the per-token terms come broadcast to the tile's shape:
    scale_p = g (1 + 2 z_loss lse), hit = g (1 - eps), shift = g eps / V; keep masks rows and columns."""
    c = _cap(z, softcap, SOFTCAP)
    p = tl.math.exp2((c - lse) * LOG2E)
    dz = scale_p * p - shift - tl.where(is_target, hit, 0.0)
    if SOFTCAP:
        u = c / softcap
        dz = dz * (1.0 - u * u)
    return tl.where(keep, dz, 0.0)  # a where, not a product: p of a padded row may be inf


@triton.jit
def _token_terms(T_ptr, LSE_ptr, DLOSS_ptr, rows, row_mask, ignore_index, n_vocab, label_smoothing, z_loss):
    """(t, lse, scale_p, hit, shift, valid) of a block of tokens; g = 0 for ignored and bad targets."""
    t = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index) & (t >= 0) & (t < n_vocab)
    lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
    g = tl.where(valid, tl.load(DLOSS_ptr + rows, mask=row_mask, other=0.0), 0.0)
    return t, lse, g * (1.0 + 2.0 * z_loss * lse), g * (1.0 - label_smoothing), g * label_smoothing / n_vocab, valid


@triton.jit
def _accumulate(ptrs, part, mask, first):
    """The owned float32 accumulator: the first block stores, later ones add. The barrier makes the
    stores of every thread of the program visible before the next read (as __syncthreads does)."""
    if first:
        tl.store(ptrs, part, mask=mask)
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + part, mask=mask)
    tl.debug_barrier()


# --- forward -------------------------------------------------------------------------------

@triton.jit
def _lce_fwd_kernel(
    X_ptr, W_ptr, B_ptr, T_ptr, Part_ptr,
    n_rows, n_vocab, d, split_cols, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, s): partial (max, sum exp, sum c, c_t) of tokens [m BM, ...) over columns of split s."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    t = tl.load(T_ptr + rows, mask=row_mask, other=-1)
    mx = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    se = tl.zeros([BLOCK_M], dtype=tl.float32)
    sc = tl.zeros([BLOCK_M], dtype=tl.float32)
    ct = tl.zeros([BLOCK_M], dtype=tl.float32)
    v_start = pid_s * split_cols
    v_end = tl.minimum(v_start + split_cols, n_vocab)
    for v0 in range(v_start, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_vocab
        z = _mm_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, d, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        if HAS_BIAS:
            z += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        c = _cap(z, softcap, SOFTCAP)
        c_max = tl.where(col_mask[None, :], c, float("-inf"))
        mx_new = tl.maximum(mx, tl.max(c_max, 1))  # finite: every block holds a column < V
        se = se * tl.math.exp2((mx - mx_new) * LOG2E) + tl.sum(tl.math.exp2((c_max - mx_new[:, None]) * LOG2E), 1)
        mx = mx_new
        sc += tl.sum(tl.where(col_mask[None, :], c, 0.0), 1)
        ct += tl.sum(tl.where(cols[None, :] == t[:, None], c, 0.0), 1)
    out = pid_s * n_rows + rows
    plane = tl.num_programs(1) * n_rows
    tl.store(Part_ptr + out, mx, mask=row_mask)
    tl.store(Part_ptr + plane + out, se, mask=row_mask)
    tl.store(Part_ptr + 2 * plane + out, sc, mask=row_mask)
    tl.store(Part_ptr + 3 * plane + out, ct, mask=row_mask)


@triton.jit
def _lce_fwd_combine_kernel(
    Part_ptr, T_ptr, Loss_ptr, LSE_ptr,
    n_rows, n_vocab, n_splits, ignore_index, label_smoothing, z_loss,
    BLOCK: tl.constexpr,
):
    """lse and loss of tokens [pid BLOCK, ...) from the S partials, merged in split order."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    plane = n_splits * n_rows
    mx = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    se = tl.zeros([BLOCK], dtype=tl.float32)
    sc = tl.zeros([BLOCK], dtype=tl.float32)
    ct = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_splits):
        at = Part_ptr + s * n_rows + rows
        m_s = tl.load(at, mask=row_mask, other=0.0)
        mx_new = tl.maximum(mx, m_s)
        se = se * tl.math.exp2((mx - mx_new) * LOG2E) + \
            tl.load(at + plane, mask=row_mask, other=1.0) * tl.math.exp2((m_s - mx_new) * LOG2E)
        mx = mx_new
        sc += tl.load(at + 2 * plane, mask=row_mask, other=0.0)
        ct += tl.load(at + 3 * plane, mask=row_mask, other=0.0)
    lse = mx + tl.log(se)
    loss = (1.0 - label_smoothing) * (lse - ct) + label_smoothing * (lse - sc / n_vocab) + z_loss * lse * lse
    t = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    loss = tl.where(t == ignore_index, 0.0, tl.where((t >= 0) & (t < n_vocab), loss, float("nan")))
    tl.store(Loss_ptr + rows, loss, mask=row_mask)
    tl.store(LSE_ptr + rows, lse, mask=row_mask)


# --- backward ------------------------------------------------------------------------------

@triton.jit
def _lce_bwd_dx_kernel(
    X_ptr, W_ptr, B_ptr, T_ptr, LSE_ptr, DLOSS_ptr, DX_ptr,
    n_rows, n_vocab, d, split_cols, ignore_index, label_smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (m, s): DX[s, m block] = sum over the V blocks of split s of dz W_v (float32)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    t, lse, scale_p, hit, shift, valid = _token_terms(T_ptr, LSE_ptr, DLOSS_ptr, rows, row_mask, ignore_index,
                                                      n_vocab, label_smoothing, z_loss)
    offs_d = tl.arange(0, BLOCK_D)
    dx_base = DX_ptr + pid_s.to(tl.int64) * n_rows * d + rows.to(tl.int64)[:, None] * d
    v_start = pid_s * split_cols
    v_end = tl.minimum(v_start + split_cols, n_vocab)
    for v0 in range(v_start, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_vocab
        z = _mm_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, d, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
        if HAS_BIAS:
            z += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        dz = _dlogits(z, cols[None, :] == t[:, None], lse[:, None], scale_p[:, None], hit[:, None],
                      shift[:, None], valid[:, None] & col_mask[None, :], softcap, SOFTCAP)
        dz = dz.to(W_ptr.dtype.element_ty)  # the dot's operand type, as autograd of F.linear
        w_base = W_ptr + cols.to(tl.int64)[:, None] * d
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            w = tl.load(w_base + dd[None, :], mask=col_mask[:, None] & (dd < d)[None, :], other=0.0)
            if IEEE:
                part = tl.dot(dz, w, input_precision="ieee")
            else:
                part = tl.dot(dz, w)
            _accumulate(dx_base + dd[None, :], part, row_mask[:, None] & (dd < d)[None, :], v0 == v_start)


@triton.jit
def _lce_bwd_dw_kernel(
    X_ptr, W_ptr, B_ptr, T_ptr, LSE_ptr, DLOSS_ptr, DW_ptr, DB_ptr,
    n_rows, n_vocab, d, ignore_index, label_smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program v: DW[v block] = sum over token blocks of dz^T x_m, DB[v block] = its column sums (float32).
    Computed transposed (vocabulary on the rows): z^T = W_v x_m^T, so no tile is transposed."""
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_vocab
    if HAS_BIAS:
        b = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    dw_base = DW_ptr + cols.to(tl.int64)[:, None] * d
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        t, lse, scale_p, hit, shift, valid = _token_terms(T_ptr, LSE_ptr, DLOSS_ptr, rows, row_mask, ignore_index,
                                                          n_vocab, label_smoothing, z_loss)
        zt = _mm_tile(W_ptr, X_ptr, cols, rows, col_mask, row_mask, d, BLOCK_N, BLOCK_M, BLOCK_K, IEEE)
        if HAS_BIAS:
            zt += b[:, None]
        dzt = _dlogits(zt, cols[:, None] == t[None, :], lse[None, :], scale_p[None, :], hit[None, :],
                       shift[None, :], col_mask[:, None] & valid[None, :], softcap, SOFTCAP)
        db += tl.sum(dzt, 1)
        dzt = dzt.to(X_ptr.dtype.element_ty)
        x_base = X_ptr + rows.to(tl.int64)[:, None] * d
        for d0 in range(0, d, BLOCK_D):
            dd = d0 + offs_d
            x = tl.load(x_base + dd[None, :], mask=row_mask[:, None] & (dd < d)[None, :], other=0.0)
            if IEEE:
                part = tl.dot(dzt, x, input_precision="ieee")
            else:
                part = tl.dot(dzt, x)
            _accumulate(dw_base + dd[None, :], part, col_mask[:, None] & (dd < d)[None, :], m0 == 0)
    if HAS_BIAS:
        tl.store(DB_ptr + cols, db, mask=col_mask)


# --- launch configuration ------------------------------------------------------------------

# (BLOCK_M tokens, BLOCK_N vocabulary, BLOCK_K, BLOCK_D, num_warps, num_stages) per kernel and input
# class (16-bit?), one list for sm_80 and sm_90 (autotuned on the GPU); BLOCK_D is unused by the forward.
# Every entry compiles with stack 0 on both archs (static_report_specs() + `python -m fusedlm.gpu_report`);
# the 16-bit ones show HGMMA on sm_90a and HMMA on sm_80. fp32 takes ieee dots (FMA, which holds whole
# K-slices of both operands in registers): small tiles.
# Pruned because they spill (stack bytes sm_90a / sm_80, bf16 and fp16 alike): the 64 x 64-per-thread
# accumulator tiles, forward 128x128 8 warps (16 / 136), 128x64 4 warps (8 / 160); dX 128x128 8 warps
# (0 / 104), 64x128 4 warps (8 / 112), 64x256 8 warps (0 / 72); dW 128x128 8 warps (624 / 296),
# 128x64 4 warps (320 / 40), 256x64 8 warps (200 / 56); fp32 dX 32x32 and 64x32 (0 / 8).
CONFIGS = {
    ("fwd", True): [(128, 64, 64, 0, 8, 3), (64, 128, 64, 0, 8, 3), (64, 64, 64, 0, 4, 3)],
    ("fwd", False): [(32, 64, 16, 0, 4, 2), (64, 64, 16, 0, 8, 2)],
    ("dx", True): [(64, 128, 64, 64, 8, 2), (64, 64, 64, 64, 4, 3), (128, 64, 64, 64, 8, 2)],
    ("dx", False): [(32, 64, 16, 32, 4, 2)],
    ("dw", True): [(128, 64, 64, 64, 8, 2), (64, 64, 64, 64, 4, 2), (128, 64, 64, 32, 8, 2)],
    ("dw", False): [(64, 32, 16, 32, 4, 2), (32, 32, 16, 32, 4, 2), (32, 64, 16, 32, 4, 2)],
}

# Under the interpreter: the whole problem in a few large tiles (numpy arrays of up to 2^18 elements);
# its cost is mostly per program and loop iteration.
INTERPRET_TILE = 1 << 18


def _interpret_meta(n: int, vocab: int, d: int) -> dict:
    block_m = min(max(16, triton.next_power_of_2(n)), 256)
    block_k = min(max(16, triton.next_power_of_2(d)), 256)
    block_n = min(max(16, triton.next_power_of_2(vocab)), INTERPRET_TILE // max(block_m, block_k))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": block_k}


def _meta(entry) -> dict:
    bm, bn, bk, bd, _, _ = entry
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    return meta if bd == 0 else {**meta, "BLOCK_D": bd}


@functools.lru_cache(None)
def _tuned(kernel: str, low_precision: bool):
    fn = {"fwd": _lce_fwd_kernel, "dx": _lce_bwd_dx_kernel, "dw": _lce_bwd_dw_kernel}[kernel]
    configs = [triton.Config(_meta(e), num_warps=e[4], num_stages=e[5]) for e in CONFIGS[(kernel, low_precision)]]
    return triton.autotune(configs=configs, key=["n_vocab", "d"])(fn)


def _launch(kernel: str, x: torch.Tensor, vocab: int, grid, args: tuple, flags: dict) -> None:
    """Autotuned on a GPU; one configuration of large blocks under the interpreter."""
    if x.is_cuda:
        _tuned(kernel, x.dtype != torch.float32)[grid](*args, **flags)
        return
    meta = _interpret_meta(x.shape[0], vocab, x.shape[1])
    if kernel == "fwd":
        meta.pop("BLOCK_D")
    fn = {"fwd": _lce_fwd_kernel, "dx": _lce_bwd_dx_kernel, "dw": _lce_bwd_dw_kernel}[kernel]
    fn[grid(meta)](*args, **flags, **meta)


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(x: torch.Tensor, n: int, vocab: int, most: int) -> tuple[int, int]:
    """(split width, split count) along V: enough (token block, split) programs to fill the GPU
    (2 per SM, counting 128-token blocks), at most `most` splits. One split under the interpreter."""
    if not x.is_cuda:
        return triton.cdiv(vocab, INTERPRET_TILE) * INTERPRET_TILE, 1  # a multiple of any interpreter BLOCK_N
    want = min(most, max(1, triton.cdiv(2 * _sm_count(x.device.index or 0), triton.cdiv(n, 128))))
    width = triton.cdiv(triton.cdiv(vocab, want), SPLIT_ALIGN) * SPLIT_ALIGN
    return width, triton.cdiv(vocab, width)


def _check(x, weight, bias, target) -> None:
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"{OP}: the triton backend takes float32, bfloat16 or float16 x, got {x.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{OP}: the triton backend takes x (N, d) and weight (V, d), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if target.shape != (x.shape[0],) or target.dtype != torch.int64:
        raise ValueError(f"{OP}: the triton backend takes an int64 target of shape ({x.shape[0]},), got "
                         f"{target.dtype} {tuple(target.shape)}")


def _flags(x, bias, softcap) -> dict:
    return {"HAS_BIAS": bias is not None, "SOFTCAP": softcap is not None, "IEEE": x.dtype == torch.float32}


# --- launchers -----------------------------------------------------------------------------

def linear_cross_entropy_fwd(x, weight, bias, target, ignore_index: int, label_smoothing: float, z_loss: float,
                             softcap):
    """fusedlm::linear_cross_entropy_fwd_triton: (loss (N,) float32, 0 where ignored; lse (N,) float32)."""
    _check(x, weight, bias, target)
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, d = x.shape
    vocab = weight.shape[0]
    loss = torch.empty((n,), dtype=torch.float32, device=x.device)
    lse = torch.empty((n,), dtype=torch.float32, device=x.device)
    if n == 0:
        return loss, lse
    width, n_splits = _splits(x, n, vocab, most=vocab)
    part = torch.empty((4, n_splits, n), dtype=torch.float32, device=x.device)
    cap = float(softcap) if softcap is not None else 1.0
    with device_guard(OP, x):
        _launch("fwd", x, vocab, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), n_splits),
                (x, weight, bias if bias is not None else x, target, part, n, vocab, d, width, cap),
                _flags(x, bias, softcap))
        block = 1024 if x.is_cuda else max(16, triton.next_power_of_2(n))
        _lce_fwd_combine_kernel[(triton.cdiv(n, block),)](
            part, target, loss, lse, n, vocab, n_splits, int(ignore_index), float(label_smoothing), float(z_loss),
            BLOCK=block, num_warps=4,
        )
    return loss, lse


def linear_cross_entropy_bwd(dloss, x, weight, bias, target, lse, ignore_index: int, label_smoothing: float,
                             z_loss: float, softcap, has_bias: bool):
    """fusedlm::linear_cross_entropy_bwd_triton: (dx, dweight, dbias) in the dtypes of x, weight, bias;
    dbias is (0,) without bias. dweight and dbias accumulate in float32."""
    _check(x, weight, bias, target)
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    dloss, lse = dloss.float().contiguous(), lse.contiguous()
    n, d = x.shape
    vocab = weight.shape[0]
    f32 = x.dtype == torch.float32
    if n == 0:
        dbias = torch.zeros_like(bias) if has_bias else x.new_empty((0,))
        return torch.empty_like(x), torch.zeros_like(weight), dbias
    width, n_splits = _splits(x, n, vocab, most=MAX_DX_SPLITS)
    dx32 = torch.empty((n_splits, n, d), dtype=torch.float32, device=x.device)
    dw32 = torch.empty((vocab, d), dtype=torch.float32, device=x.device)
    db32 = torch.empty((vocab if has_bias else 0,), dtype=torch.float32, device=x.device)
    cap = float(softcap) if softcap is not None else 1.0
    b = bias if bias is not None else x
    opts = (int(ignore_index), float(label_smoothing), float(z_loss), cap)
    with device_guard(OP, x):
        _launch("dx", x, vocab, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), n_splits),
                (x, weight, b, target, lse, dloss, dx32, n, vocab, d, width, *opts), _flags(x, bias, softcap))
        _launch("dw", x, vocab, lambda meta: (triton.cdiv(vocab, meta["BLOCK_N"]),),
                (x, weight, b, target, lse, dloss, dw32, db32 if has_bias else dw32, n, vocab, d, *opts),
                _flags(x, bias, softcap))
    dx = dx32[0] if n_splits == 1 else dx32.sum(0)  # the partials in split order
    dx = dx if f32 else dx.to(x.dtype)
    dweight = dw32 if f32 else dw32.to(weight.dtype)
    dbias = db32.to(bias.dtype) if has_bias else x.new_empty((0,))
    return dx, dweight, dbias


# --- static GPU report (python/fusedlm/gpu_report.py compiles these for sm_80 / sm_90a) --------

def static_report_specs() -> list[dict]:
    """One spec per (kernel, autotune configuration, dtype), with bias and softcap on (the most code),
    pointers and d 16-divisible (as the JIT finds them for d % 8 == 0). uses_tensor_cores for the
    16-bit GEMM kernels (HGMMA on sm_90a, HMMA on sm_80); the combine kernel has no dot."""
    specs = []
    fns = {"fwd": _lce_fwd_kernel, "dx": _lce_bwd_dx_kernel, "dw": _lce_bwd_dw_kernel}
    # runtime argument types after the pointers, per kernel
    scalars = {
        "fwd": ["i32", "i32", "i32", "i32", "fp32"],
        "dx": ["i32", "i32", "i32", "i32", "i32", "fp32", "fp32", "fp32"],
        "dw": ["i32", "i32", "i32", "i32", "fp32", "fp32", "fp32"],
    }
    for dtype in ("fp32", "bf16", "fp16"):
        p = "*" + dtype
        pointers = {
            "fwd": [p, p, p, "*i64", "*fp32"],
            "dx": [p, p, p, "*i64", "*fp32", "*fp32", "*fp32"],
            "dw": [p, p, p, "*i64", "*fp32", "*fp32", "*fp32", "*fp32"],
        }
        for kernel, fn in fns.items():
            for entry in CONFIGS[(kernel, dtype != "fp32")]:
                constexprs = {"HAS_BIAS": True, "SOFTCAP": True, "IEEE": dtype == "fp32", **_meta(entry)}
                specs.append(_spec(fn, dtype, entry[4], entry[5], constexprs, pointers[kernel] + scalars[kernel],
                                   tensor_cores=dtype != "fp32"))
        specs.append(_spec(_lce_fwd_combine_kernel, dtype, 4, 1, {"BLOCK": 1024},
                           ["*fp32", "*i64", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "fp32", "fp32"],
                           tensor_cores=False))
    return specs


def _spec(fn, dtype, num_warps, num_stages, constexprs, runtime_types, tensor_cores):
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(runtime_types), (fn.__name__, names, len(runtime_types))
    types = dict(zip(names, runtime_types), **{name: "constexpr" for name in constexprs})
    divisible = [n for n in names if types[n].startswith("*") or n == "d"]
    config = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK"))
    return {
        "kernel": fn.__name__, "fn": fn, "signature": {name: types[name] for name in fn.arg_names},
        "constexprs": dict(constexprs),
        "attrs": {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible},
        "num_warps": num_warps, "num_stages": num_stages, "dtype": dtype, "uses_tensor_cores": tensor_cores,
        "config": f"{config}, {num_warps} warps, {num_stages} stages",
    }
