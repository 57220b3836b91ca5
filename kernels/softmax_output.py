r"""Triton kernels for the linear cross-entropy: fusedlm::linear_cross_entropy_{fwd,bwd}_triton.
Math and op schema: python/fusedlm/ops/softmax_output.py. x (N, d), W (V, d) row-major, d contiguous.

Forward, in the Cut Cross-Entropy manner (no (N, V) tensor): every logit tile z = x_blk W_blk^T (+ b)
lives in registers. Program (token block m, vocabulary split s), over the V blocks of its split, in float32:

    z = x_m W_v^T + b_v   (K loop over d)     c = softcap * tanh(z / softcap)   (c = z without softcap)
    mx' = max(mx, rowmax(c));  se = se * exp(mx - mx') + rowsum(exp(c - mx'))   online log-sum-exp
    sc += rowsum(c)  (label smoothing's mean);  ct += rowsum(c * [v == t])   target logit, from the tile

The partial (mx, se, sc, ct) of each split goes to a (S, N) float32 buffer; `_lce_fwd_combine_kernel`
merges the S splits of a token in split order (deterministic) into lse and the loss; a target outside
[0, V) that is not ignore_index matches no column (never read) and gives loss NaN, as the C++ kernels.

Backward, by vocabulary slabs: for v0 = 0, C, 2C, ... (all N tokens in every slab, the last slab
partial), with g = dloss of the token, p = exp(c - lse), eps = label_smoothing:

    1. L = x W[v0:v0+C]^T (+ b[v0:v0+C])     cuBLAS, into an (N, C) buffer in x's dtype (as F.linear)
    2. L <- dz = g ((1 + 2 z_loss lse) p - (1 - eps)[v == t] - eps / V) (1 - (c / softcap)^2)
              `_lce_bwd_dz_kernel`, in place, float32 math; 0 for ignored and bad targets
    3. dW[v0:v0+C] = dz^T x                   one GEMM with K = N, straight into dweight's rows
    4. dX += dz W[v0:v0+C]                    float32 accumulator (the output itself for fp32)
    5. db[v0:v0+C] = column sums of dz        float32

Every GEMM accumulates in float32 and rounds once to its output, as autograd of F.linear does
(16-bit: cuBLAS on tensor cores; dX takes the out_dtype=float32 form of addmm). No atomics and a
fixed slab order: the same bits on every run; no host sync.

Memory traffic per slab, beyond what the GEMMs read of x and W: the buffer (2 N C bytes for 16-bit)
is written by GEMM 1, read and written by the dz kernel, read by GEMMs 3 and 4 (4 passes, 8 N C
bytes); the dX accumulator is read and written once (8 N d bytes). Over the V / C slabs: 8 N V
+ 8 N d V / C bytes, e.g. 17 GB + 4 GB at N = 16384, d = 2048, V = 128256 bf16 (C = 8192, 16 slabs),
about 5 ms of HBM time beside 6 N V d = 2.6e13 GEMM flops (eager's backward: 4 N V d, as it keeps
the logits; here they are recomputed, as the forward keeps nothing V-sized).
Why slabs and cuBLAS: the earlier backward (two Triton kernels recomputing logit tiles, one owning
dX rows, one owning dW rows) kept its float32 accumulators in global memory, read and written once
per V block or token block: 8 N V d / BLOCK_N + 8 N V d / BLOCK_M bytes, hundreds of GB at that
shape, and took 476 ms on an H200 where eager's backward takes ~35 ms.
Extra memory: the (N, C) buffer, SLAB_BYTES (256 MiB) or less (C >= 128 above 2^20 16-bit tokens), and for
16-bit inputs the float32 dX (4 N d: 134 MB at that shape); the earlier float32 dW (4 V d) was 1 GB.

Launch configuration: `@triton.autotune` over CONFIGS (forward: one list for sm_80 and sm_90, 16-bit
or fp32 inputs) and DZ_CONFIGS, every entry compiled without spills for both archs by
static_report_specs() + `python -m fusedlm.gpu_report`. The forward kernels are idempotent; the
in-place dz kernel is autotuned with its buffer restored between trials. fp32 forward dots are
ieee (FMA, small tiles); 16-bit ones run on tensor cores (HGMMA / HMMA).
Under TRITON_INTERPRET=1 (CPU tensors) one fixed set of large blocks and a single split: few programs;
the 16-bit GEMMs run widened to float32 and rounded once (CPU has no out_dtype GEMM).
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
SLAB_BYTES = 256 << 20  # backward: bytes of the (N, C) logits / dz buffer (tests shrink it)
SLAB_ALIGN = 128  # slab widths C are multiples of this (but the last), so buffer rows stay aligned
# addmm(..., out_dtype=torch.float32) with a float32 input to add to: CUDA, torch >= 2.10 (2.9 has the
# out_dtype form but rejects a float32 input with 16-bit matrices; as csrc/torch/checks.h's
# FUSEDLM_ADDMM_OUT_DTYPE).
ADDMM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10)  # pre-releases too

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
    """(softcap * tanh(z / softcap), tanh(z / softcap)), or (z, z) without SOFTCAP; tanh(y) = sign(y) (1 - e) / (1 + e)
    with e = exp(-2|y|) (no overflow). The backward's derivative 1 - tanh^2 takes the tanh from here
    rather than dividing the capped logit by softcap again."""
    t = z
    if SOFTCAP:
        y = z / softcap
        e = tl.math.exp2(tl.abs(y) * (-2.0 * LOG2E))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(y < 0, -t, t)
        z = softcap * t
    return z, t


@triton.jit
def _dlogits(z, is_target, lse, scale_p, hit, shift, keep, softcap, SOFTCAP: tl.constexpr):
    """dz of a tile from its logits z; the per-token terms come broadcast to the tile's shape:
    scale_p = g (1 + 2 z_loss lse), hit = g (1 - eps), shift = g eps / V; keep masks rows and columns."""
    c, t = _cap(z, softcap, SOFTCAP)
    p = tl.math.exp2((c - lse) * LOG2E)
    dz = scale_p * p - shift - tl.where(is_target, hit, 0.0)
    if SOFTCAP:
        dz = dz * (1.0 - t * t)
    return tl.where(keep, dz, 0.0)  # a where, not a product: p of a padded row may be inf


@triton.jit
def _token_terms(T_ptr, LSE_ptr, DLOSS_ptr, rows, row_mask, ignore_index, n_vocab, label_smoothing, z_loss):
    """(t, lse, scale_p, hit, shift, valid) of a block of tokens; g = 0 for ignored and bad targets."""
    t = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index) & (t >= 0) & (t < n_vocab)
    lse = tl.load(LSE_ptr + rows, mask=row_mask, other=0.0)
    g = tl.where(valid, tl.load(DLOSS_ptr + rows, mask=row_mask, other=0.0), 0.0)
    return t, lse, g * (1.0 + 2.0 * z_loss * lse), g * (1.0 - label_smoothing), g * label_smoothing / n_vocab, valid


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
        if not IEEE:  # 16-bit: z rounded to x's dtype, as F.linear returns it and the backward's GEMM gives it
            z = z.to(X_ptr.dtype.element_ty).to(tl.float32)
        c, _ = _cap(z, softcap, SOFTCAP)
        c_max = tl.where(col_mask[None, :], c, float("-inf"))
        mx_new = tl.maximum(mx, tl.max(c_max, 1))
        shift = tl.where(mx_new == float("-inf"), 0.0, mx_new)  # all -inf so far (a masked range): sums stay 0
        se = se * tl.math.exp2((mx - shift) * LOG2E) + tl.sum(tl.math.exp2((c_max - shift[:, None]) * LOG2E), 1)
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
        shift = tl.where(mx_new == float("-inf"), 0.0, mx_new)  # splits of -inf logits only: sums stay 0
        se = se * tl.math.exp2((mx - shift) * LOG2E) + \
            tl.load(at + plane, mask=row_mask, other=1.0) * tl.math.exp2((m_s - shift) * LOG2E)
        mx = mx_new
        sc += tl.load(at + 2 * plane, mask=row_mask, other=0.0)
        ct += tl.load(at + 3 * plane, mask=row_mask, other=0.0)
    lse = mx + tl.log(se)
    smooth = label_smoothing * tl.where(label_smoothing > 0, lse - sc / n_vocab, 0.0)  # sc = -inf with a -inf logit
    loss = (1.0 - label_smoothing) * (lse - ct) + smooth + z_loss * lse * lse
    t = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    loss = tl.where(t == ignore_index, 0.0, tl.where((t >= 0) & (t < n_vocab), loss, float("nan")))
    tl.store(Loss_ptr + rows, loss, mask=row_mask)
    tl.store(LSE_ptr + rows, lse, mask=row_mask)


# --- backward ------------------------------------------------------------------------------

@triton.jit
def _lce_bwd_dz_kernel(
    Z_ptr, T_ptr, LSE_ptr, DLOSS_ptr,
    n_rows, n_cols, v0, n_vocab, ignore_index, label_smoothing, z_loss, softcap,
    SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (m, n): the logits Z[m block, n block] of the slab (N, n_cols), row-major, whose column
    c is vocabulary entry v0 + c, overwritten by their dz (float32 math, stored in Z's dtype)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    t, lse, scale_p, hit, shift, valid = _token_terms(T_ptr, LSE_ptr, DLOSS_ptr, rows, row_mask, ignore_index,
                                                      n_vocab, label_smoothing, z_loss)
    ptrs = Z_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    dz = _dlogits(z, (v0 + cols)[None, :] == t[:, None], lse[:, None], scale_p[:, None], hit[:, None],
                  shift[:, None], valid[:, None] & col_mask[None, :], softcap, SOFTCAP)
    tl.store(ptrs, dz.to(Z_ptr.dtype.element_ty), mask=mask)


# --- launch configuration ------------------------------------------------------------------

# Forward: (BLOCK_M tokens, BLOCK_N vocabulary, BLOCK_K, num_warps, num_stages) per input class
# (16-bit?), one list for sm_80 and sm_90 (autotuned on the GPU). Every entry compiles with stack 0 on
# both archs (static_report_specs() + `python -m fusedlm.gpu_report`); the 16-bit ones show HGMMA on
# sm_90a and HMMA on sm_80. fp32 takes ieee dots (FMA, which holds whole K-slices of both operands in
# registers): small tiles.
# Pruned because they spill (stack bytes sm_90a / sm_80, bf16 and fp16 alike): the 64 x 64-per-thread
# accumulator tiles, 128x128 8 warps (16 / 136), 128x64 4 warps (8 / 160).
CONFIGS = {
    True: [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3)],
    False: [(32, 64, 16, 4, 2), (64, 64, 16, 8, 2)],
}
# The dz kernel: (BLOCK_M tokens, BLOCK_N slab columns, num_warps), any dtype. Streaming elementwise
# work wants occupancy: 16 values a thread (64-97 registers, 16-32 resident warps an SM) or 32 (96-124
# registers); 64 a thread (BLOCK 32 x 512, 8 warps) took 164-202 registers, 8 warps an SM: left out.
DZ_CONFIGS = [(8, 256, 4), (4, 512, 4), (32, 128, 8), (16, 256, 4)]

# Under the interpreter: the whole problem in a few large tiles (numpy arrays of up to 2^18 elements);
# its cost is mostly per program and loop iteration.
INTERPRET_TILE = 1 << 18


def _interpret_meta(n: int, vocab: int, d: int) -> dict:
    block_m = min(max(16, triton.next_power_of_2(n)), 256)
    block_k = min(max(16, triton.next_power_of_2(d)), 256)
    block_n = min(max(16, triton.next_power_of_2(vocab)), INTERPRET_TILE // max(block_m, block_k))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}


@functools.lru_cache(None)
def _tuned_fwd(low_precision: bool):
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in CONFIGS[low_precision]]
    return triton.autotune(configs=configs, key=["n_vocab", "d"])(_lce_fwd_kernel)


@functools.lru_cache(None)
def _tuned_dz():
    # restore_value: the kernel overwrites its input, so each autotune trial starts from the logits.
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=1) for bm, bn, w in DZ_CONFIGS]
    # key: none but the dtypes (Triton adds them): one tuning per process and dtype, on the first call's
    # shape. Keyed on the shape, a run whose token count changes every step would retune every step.
    return triton.autotune(configs=configs, key=[], restore_value=["Z_ptr"])(_lce_bwd_dz_kernel)


def _launch_fwd(x: torch.Tensor, vocab: int, grid, args: tuple, flags: dict) -> None:
    """Autotuned on a GPU; one configuration of large blocks under the interpreter."""
    if x.is_cuda:
        _tuned_fwd(x.dtype != torch.float32)[grid](*args, **flags)
        return
    meta = _interpret_meta(x.shape[0], vocab, x.shape[1])
    _lce_fwd_kernel[grid(meta)](*args, **flags, **meta)


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
        _launch_fwd(x, vocab, lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), n_splits),
                    (x, weight, bias if bias is not None else x, target, part, n, vocab, d, width, cap),
                    _flags(x, bias, softcap))
        block = 1024 if x.is_cuda else max(16, triton.next_power_of_2(n))
        _lce_fwd_combine_kernel[(triton.cdiv(n, block),)](
            part, target, loss, lse, n, vocab, n_splits, int(ignore_index), float(label_smoothing), float(z_loss),
            BLOCK=block, num_warps=4,
        )
    return loss, lse


def _slab_cols(n: int, vocab: int, element_size: int) -> int:
    """C: the widest multiple of SLAB_ALIGN columns whose (N, C) buffer fits SLAB_BYTES, within [SLAB_ALIGN, V]."""
    return min(max(SLAB_BYTES // (n * element_size) // SLAB_ALIGN * SLAB_ALIGN, SLAB_ALIGN), vocab)


def _gemm(out, a, b, add=None, accumulate=False):
    """out = a b (+ add, a row broadcast over rows) (+ out if accumulate), accumulated in float32 and
    rounded once to out's dtype. out is a's dtype, or float32 for 16-bit a and b (dX): cuBLAS's
    out_dtype form then (for torch < 2.10 the product rounded to a's dtype and added). CPU tensors have
    no out_dtype GEMM and slow 16-bit ones: their 16-bit operands are widened to float32."""
    if not a.is_cuda and a.dtype != torch.float32:  # CPU: widened, rounded once by the copy
        prod = torch.mm(a.float(), b.float()) if add is None else torch.addmm(add.float(), a.float(), b.float())
        if accumulate:
            out.add_(prod)
        else:
            out.copy_(prod)
        return
    if out.dtype == a.dtype:
        if add is not None:
            torch.addmm(add, a, b, out=out)
        elif accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif ADDMM_OUT_DTYPE:
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=out.dtype, out=out)
    elif accumulate:
        out.add_(torch.mm(a, b))
    else:
        out.copy_(torch.mm(a, b))


def linear_cross_entropy_bwd(dloss, x, weight, bias, target, lse, ignore_index: int, label_smoothing: float,
                             z_loss: float, softcap, has_bias: bool):
    """fusedlm::linear_cross_entropy_bwd_triton: (dx, dweight, dbias) in the dtypes of x, weight, bias;
    dbias is (0,) without bias. By vocabulary slabs (module docstring): cuBLAS GEMMs around the dz kernel."""
    _check(x, weight, bias, target)
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    dloss, lse = dloss.float().contiguous(), lse.contiguous()
    n, d = x.shape
    vocab = weight.shape[0]
    if n == 0:
        dbias = torch.zeros_like(bias) if has_bias else x.new_empty((0,))
        return torch.empty_like(x), torch.zeros_like(weight), dbias
    cols = _slab_cols(n, vocab, x.element_size())
    buf = torch.empty((n * cols,), dtype=x.dtype, device=x.device)
    f32 = x.dtype == torch.float32
    # float32 dx: the output itself, or for 16-bit inputs a zeroed accumulator that every slab adds to
    # (beta = 1 throughout: no reliance on beta = 0 skipping an uninitialised input in the out_dtype GEMM)
    dx = (torch.empty if f32 else torch.zeros)((n, d), dtype=torch.float32, device=x.device)
    dweight = torch.empty_like(weight)
    db32 = torch.empty((vocab if has_bias else 0,), dtype=torch.float32, device=x.device)
    opts = (int(ignore_index), float(label_smoothing), float(z_loss), float(softcap) if softcap is not None else 1.0)
    with device_guard(OP, x):
        for v0 in range(0, vocab, cols):
            c = min(cols, vocab - v0)
            z = buf[: n * c].view(n, c)  # contiguous: the last, narrower slab packs its rows
            w = weight.narrow(0, v0, c)
            _gemm(z, x, w.t(), add=bias.narrow(0, v0, c) if bias is not None else None)
            _launch_dz(z, target, lse, dloss, v0, vocab, opts, softcap is not None)
            _gemm(dweight.narrow(0, v0, c), z.t(), x)
            _gemm(dx, z, w, accumulate=v0 > 0 or not f32)
            if has_bias:
                torch.sum(z, 0, dtype=torch.float32, out=db32.narrow(0, v0, c))
    dbias = db32.to(bias.dtype) if has_bias else x.new_empty((0,))
    return dx.to(x.dtype), dweight, dbias


def _launch_dz(z, target, lse, dloss, v0: int, vocab: int, opts: tuple, softcap: bool) -> None:
    """z (N, C) <- dz in place: autotuned on a GPU, one configuration of large blocks under the interpreter."""
    n, c = z.shape
    args = (z, target, lse, dloss, n, c, v0, vocab, *opts)
    if z.is_cuda:
        _tuned_dz()[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]))](
            *args, SOFTCAP=softcap)
        return
    block_m = min(max(16, triton.next_power_of_2(n)), 256)
    block_n = min(max(16, triton.next_power_of_2(c)), INTERPRET_TILE // block_m)
    _lce_bwd_dz_kernel[(triton.cdiv(n, block_m), triton.cdiv(c, block_n))](
        *args, SOFTCAP=softcap, BLOCK_M=block_m, BLOCK_N=block_n)


# --- static GPU report (python/fusedlm/gpu_report.py compiles these for sm_80 / sm_90a) --------

def static_report_specs() -> list[dict]:
    """One spec per (kernel, autotune configuration, dtype), with bias and softcap on (the most code),
    pointers, d and the dz kernel's row length 16-divisible (as the JIT finds them for multiples of 16).
    uses_tensor_cores for the 16-bit forward GEMM kernel (HGMMA on sm_90a, HMMA on sm_80); the
    combine and dz kernels have no dot."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        p = "*" + dtype
        for bm, bn, bk, warps, stages in CONFIGS[dtype != "fp32"]:
            constexprs = {"HAS_BIAS": True, "SOFTCAP": True, "IEEE": dtype == "fp32",
                          "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
            specs.append(_spec(_lce_fwd_kernel, dtype, warps, stages, constexprs,
                               [p, p, p, "*i64", "*fp32", "i32", "i32", "i32", "i32", "fp32"],
                               tensor_cores=dtype != "fp32"))
        specs.append(_spec(_lce_fwd_combine_kernel, dtype, 4, 1, {"BLOCK": 1024},
                           ["*fp32", "*i64", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "fp32", "fp32"],
                           tensor_cores=False))
        for bm, bn, warps in DZ_CONFIGS:
            specs.append(_spec(_lce_bwd_dz_kernel, dtype, warps, 1, {"SOFTCAP": True, "BLOCK_M": bm, "BLOCK_N": bn},
                               [p, "*i64", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "i32", "fp32", "fp32",
                                "fp32"], tensor_cores=False, divisible_ints=("n_cols",)))
    return specs


def _spec(fn, dtype, num_warps, num_stages, constexprs, runtime_types, tensor_cores, divisible_ints=("d",)):
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(runtime_types), (fn.__name__, names, len(runtime_types))
    types = dict(zip(names, runtime_types), **{name: "constexpr" for name in constexprs})
    divisible = [n for n in names if types[n].startswith("*") or n in divisible_ints]
    config = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith("BLOCK"))
    return {
        "kernel": fn.__name__, "fn": fn, "signature": {name: types[name] for name in fn.arg_names},
        "constexprs": dict(constexprs),
        "attrs": {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible},
        "num_warps": num_warps, "num_stages": num_stages, "dtype": dtype, "uses_tensor_cores": tensor_cores,
        "config": f"{config}, {num_warps} warps, {num_stages} stages",
    }
