r"""Triton kernels for the fused (residual add +) LayerNorm / RMSNorm: fusedlm::layer_norm_*_triton.

Forward, row by row (M rows of width N), element-wise math and statistics in float32:

    h    = x + residual                      rounded to x.dtype and stored: the norm is of the stored h
    mean = sum(h) / N                        (layernorm; centred two-pass variance, no E[h^2] - mean^2)
    var  = sum((h - mean)^2) / N             (rmsnorm: var = sum(h^2) / N, no centring)
    rstd = 1 / sqrt(var + eps),  xhat = (h - mean) * rstd,  y = xhat * weight (+ bias)

Backward, with g = dy * weight and the row means <.> taken over the N columns:

    dh = rstd * (g - <g> - xhat * <g * xhat>)        (rmsnorm: rstd * (g - xhat * <g * xhat>))
    dx = dh (+ dh_in, the gradient arriving at the h output in the residual form)
    dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)

The weight/bias gradients are deterministic: program p owns the FIXED row range
[p * rows_per_program, (p + 1) * rows_per_program) and writes its float32 column sums to row p of
a (n_programs, N) buffer; `_layer_norm_bwd_reduce_kernel` then sums that buffer over p in a fixed
order (a [BLOCK_PARTIALS, BLOCK_SIZE] accumulator reduced once) and casts to weight's dtype.

Memory traffic (s = bytes per element, P = backward row programs):
    forward   reads x (+ residual): M*N*s (2*M*N*s); writes y (+ h): M*N*s (2*M*N*s), mean + rstd 8*M;
              weight and bias are re-read per tile from L1/L2 (2*N*s per tile).
    backward  reads dy, h (+ dh): 2*M*N*s (3*M*N*s), mean + rstd 8*M; writes dx: M*N*s;
              partials 4*P*N written and read again (P ~ 2 * SM count on a GPU), dweight/dbias N*s.
    Rows wider than MAX_TILE = 4096 columns are processed in 2048-column chunks so that no program holds
    more than a chunk in registers. Forward makes three passes over the row's chunks (sum, centred sum
    of squares, normalise); the later passes re-read x (+ residual) from L1/L2, not DRAM. Backward gives
    each chunk its own column program, which first sums <g> and <g * xhat> over the whole row (L2 hits:
    its sibling programs read the same row at the same time).

Launch configuration (no autotuning: one heuristic table, `_gpu_tile`, identical for sm_80 and sm_90,
since the kernels are memory-bound and the table only has to keep tiles in registers without spilling):
    BLOCK_SIZE = next_power_of_2(N) (at least 16) with masked columns; narrow rows stacked BLOCK_ROWS high
    into tiles of >= 1024 elements; 4 warps up to 2048-element tiles, 8 beyond (two odd-width exceptions:
    `_ODD_N_WARPS`). Checked with `static_report_specs()` + cuobjdump on sm_80 and sm_90, with Triton 3.6
    and 3.9: no configuration spills (stack 0), with vectorised (N % 16 == 0) or scalar (odd N) loads.
    Under TRITON_INTERPRET=1 (CPU tensors) the grid is at most 8 programs with large tiles, since the
    interpreter's cost grows with the number of programs and loop iterations.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusedlm.kernels import device_guard

OP = "layer_norm"
MAX_COLS = 16384  # widest row the launchers take
MAX_TILE = 4096  # widest row held in registers whole; wider rows loop over CHUNK-column chunks
CHUNK = 2048
MIN_BLOCK = 16
INTERPRET_PROGRAMS = 8  # most programs per launch under the interpreter
INTERPRET_TILE = 32768  # most elements per tile under the interpreter

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _load_h(X_ptr, R_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """h = x (+ residual) rounded to x's dtype, as float32 (the value that is stored and normalised)."""
    h = tl.load(X_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + offsets, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(X_ptr.dtype.element_ty)
    return h


@triton.jit
def _layer_norm_fwd_kernel(
    X_ptr, R_ptr, W_ptr, B_ptr, Y_ptr, H_ptr, Mean_ptr, Rstd_ptr,
    row_stride, n_rows, n_cols, rows_per_program, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNKED: tl.constexpr,
):
    """One program normalises rows [pid * rows_per_program, ...) in tiles of BLOCK_ROWS x BLOCK_SIZE.

    CHUNKED for rows wider than MAX_TILE (BLOCK_SIZE = CHUNK): three passes over the row's
    chunks (sum -> mean, centred sum of squares -> rstd, normalise); passes 2 and 3 re-read x (+ r)
    from L1/L2 and recompute h rather than reading back the h this program just stored.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    # a run-time trip count for the chunk loops: a constant one gets unrolled, and all its loads hoisted
    n_chunks = tl.cdiv(n_cols, BLOCK_SIZE) if CHUNKED else 1
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row0 in range(row_start, row_end, BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        row_offsets = rows.to(tl.int64)[:, None] * row_stride
        if not CHUNKED:
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            h = _load_h(X_ptr, R_ptr, row_offsets + cols[None, :], mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(H_ptr + row_offsets + cols[None, :], h, mask=mask)
            h = h.to(tl.float32)
            if RMS:
                mean = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
            else:
                mean = tl.sum(h, axis=1) / n_cols
                centred = tl.where(mask, h - mean[:, None], 0.0)
                rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
        else:
            sum_h = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            for k in range(n_chunks):
                k_cols = k * BLOCK_SIZE + cols
                k_mask = row_mask[:, None] & (k_cols < n_cols)[None, :]
                h = _load_h(X_ptr, R_ptr, row_offsets + k_cols[None, :], k_mask, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    tl.store(H_ptr + row_offsets + k_cols[None, :], h, mask=k_mask)
                h = h.to(tl.float32)
                sum_h += tl.sum(h * h if RMS else h, axis=1)
            if RMS:
                mean = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                rstd = tl.rsqrt(sum_h / n_cols + eps)
            else:
                mean = sum_h / n_cols
                sum_sq = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
                for k in range(n_chunks):
                    k_cols = k * BLOCK_SIZE + cols
                    k_mask = row_mask[:, None] & (k_cols < n_cols)[None, :]
                    h = _load_h(X_ptr, R_ptr, row_offsets + k_cols[None, :], k_mask, HAS_RESIDUAL).to(tl.float32)
                    centred = tl.where(k_mask, h - mean[:, None], 0.0)
                    sum_sq += tl.sum(centred * centred, axis=1)
                rstd = tl.rsqrt(sum_sq / n_cols + eps)
        if not RMS:
            tl.store(Mean_ptr + rows, mean, mask=row_mask)
        tl.store(Rstd_ptr + rows, rstd, mask=row_mask)
        for k in range(n_chunks):
            k_cols = k * BLOCK_SIZE + cols
            col_mask = k_cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            if CHUNKED:
                h = _load_h(X_ptr, R_ptr, row_offsets + k_cols[None, :], mask, HAS_RESIDUAL).to(tl.float32)
            # weight and bias are loaded per tile (L1 hits) so that they hold no registers across tiles
            w = tl.load(W_ptr + k_cols, mask=col_mask, other=0.0).to(tl.float32)
            y = (h - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(B_ptr + k_cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(Y_ptr + row_offsets + k_cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY_ptr, DH_ptr, H_ptr, W_ptr, Mean_ptr, Rstd_ptr, DX_ptr, DW_partial_ptr, DB_partial_ptr,
    row_stride, n_rows, n_cols, rows_per_program,
    HAS_DH: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNKED: tl.constexpr,
):
    """Program (c, p): columns [c * BLOCK_SIZE, ...) of rows [p * rows_per_program, ...).

    dx for its tile, and its float32 column sums of dy * xhat and dy into row p of the partial buffers.
    CHUNKED when the row is split over cdiv(N, BLOCK_SIZE) column programs: then the row sums
    <g * xhat> and <g> are first taken over the whole row, chunk by chunk.
    """
    pid_col = tl.program_id(0)
    pid_row = tl.program_id(1)
    n_chunks = tl.cdiv(n_cols, BLOCK_SIZE)  # run-time trip count: no unrolling of the row-sum loop
    cols = pid_col * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # this program's columns, all rows
    # tile-shaped accumulators, reduced over rows once at the end: no cross-row reduction per tile
    dw_acc = tl.zeros([BLOCK_ROWS, BLOCK_SIZE], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_ROWS, BLOCK_SIZE], dtype=tl.float32)
    row_start = pid_row * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row0 in range(row_start, row_end, BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < row_end
        row_offsets = rows.to(tl.int64)[:, None] * row_stride
        rstd = tl.load(Rstd_ptr + rows, mask=row_mask, other=0.0)
        if RMS:
            mean = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        else:
            mean = tl.load(Mean_ptr + rows, mask=row_mask, other=0.0)
        if CHUNKED:
            sum_gx = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            sum_g = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
            for k in range(n_chunks):
                k_cols = k * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
                k_mask = row_mask[:, None] & (k_cols < n_cols)[None, :]
                k_h = tl.load(H_ptr + row_offsets + k_cols[None, :], mask=k_mask, other=0.0).to(tl.float32)
                k_dy = tl.load(DY_ptr + row_offsets + k_cols[None, :], mask=k_mask, other=0.0).to(tl.float32)
                k_w = tl.load(W_ptr + k_cols, mask=k_cols < n_cols, other=0.0).to(tl.float32)
                k_xhat = tl.where(k_mask, (k_h - mean[:, None]) * rstd[:, None], 0.0)
                k_g = k_dy * k_w[None, :]
                sum_gx += tl.sum(k_g * k_xhat, axis=1)
                sum_g += tl.sum(k_g, axis=1)
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_offsets + cols[None, :]
        h = tl.load(H_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        if not CHUNKED:
            sum_gx = tl.sum(g * xhat, axis=1)
            sum_g = tl.sum(g, axis=1)
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
        if RMS:
            dx = (g - xhat * (sum_gx / n_cols)[:, None]) * rstd[:, None]
        else:
            dx = (g - (sum_g / n_cols)[:, None] - xhat * (sum_gx / n_cols)[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX_ptr + offsets, dx.to(DX_ptr.dtype.element_ty), mask=mask)
    tl.store(DW_partial_ptr + pid_row * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial_ptr + pid_row * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    Partial_ptr, Out_ptr, n_partials, n_cols,
    BLOCK_PARTIALS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Out[c] = sum_p Partial[p, c] for a block of columns, in a fixed order (deterministic)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_PARTIALS, BLOCK_SIZE], dtype=tl.float32)
    for p0 in range(0, n_partials, BLOCK_PARTIALS):
        parts = p0 + tl.arange(0, BLOCK_PARTIALS)
        mask = (parts < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(Partial_ptr + parts.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(Out_ptr + cols, tl.sum(acc, axis=0).to(Out_ptr.dtype.element_ty), mask=col_mask)


# --- launch configuration ------------------------------------------------------------------

GPU_TILE = 1024  # smallest tile (elements) on a GPU: narrow rows are stacked BLOCK_ROWS high to reach it
GPU_REDUCE = (32, 64, 4)  # BLOCK_PARTIALS, BLOCK_SIZE, num_warps of the partial-sum reduction on a GPU
NUM_STAGES = 1  # no software pipelining: the loops carry no dot; stages would only cost shared memory


def _chunks(n_cols: int) -> tuple[int, bool]:
    """(BLOCK_SIZE, CHUNKED): rows up to MAX_TILE columns are one power-of-two block (>= MIN_BLOCK);
    wider rows are covered by cdiv(N, CHUNK) blocks of CHUNK columns."""
    block_size = max(MIN_BLOCK, triton.next_power_of_2(n_cols))
    return (block_size, False) if block_size <= MAX_TILE else (CHUNK, True)


# Odd widths (N % 16 != 0: scalar loads, more registers) where Triton 3.6 spilled 8 bytes on sm_80 with the
# table's warps: (kernel, BLOCK_SIZE) -> num_warps, clean with Triton 3.6 and 3.9 on both archs. Doubling
# the warps for every odd width instead moved the spills to other tiles (ptxas caps registers per thread).
_ODD_N_WARPS = {("fwd", 4096): 16, ("bwd", 128): 8}


def _gpu_tile(kernel: str, block_size: int, chunked: bool, aligned: bool) -> tuple[int, int]:
    """(BLOCK_ROWS, num_warps) of `kernel` ("fwd" or "bwd") on sm_80 / sm_90 (one table for both: the
    kernels are memory-bound); aligned: N % 16 == 0.

    Tiles of >= 1024 elements, 8-16 elements per thread per row tensor: 4 warps up to 2048-element tiles,
    8 warps for 4096 and for the 2048-column chunks of wider rows, but for the odd-width exceptions of
    _ODD_N_WARPS. Measured with static_report_specs(): 16 elements per thread in a chunk loop, or
    8192-element tiles on 16 warps (ptxas caps a thread at 128 registers there), spill when N is odd and
    the loads cannot be vectorised.
    """
    if chunked:
        return 1, 8
    block_rows = max(1, GPU_TILE // block_size)
    num_warps = 4 if block_rows * block_size <= 2048 else 8
    if not aligned:
        num_warps = _ODD_N_WARPS.get((kernel, block_size), num_warps)
    return block_rows, num_warps


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _interpreter_tile(block_size: int, n_rows: int) -> tuple[int, int]:
    """(BLOCK_ROWS, rows_per_program) for CPU tensors: at most INTERPRET_PROGRAMS programs."""
    rows = triton.cdiv(max(n_rows, 1), INTERPRET_PROGRAMS)
    block_rows = max(1, min(triton.next_power_of_2(rows), INTERPRET_TILE // block_size))
    return block_rows, triton.cdiv(rows, block_rows) * block_rows


def _check(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"{OP}: the triton backend takes float32, bfloat16 or float16 {what}, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] > MAX_COLS:
        raise ValueError(
            f"{OP}: the triton backend takes {what} of shape (M, N) with N <= {MAX_COLS}, got {tuple(x.shape)}"
        )


# --- launchers -----------------------------------------------------------------------------

def layer_norm_fwd(x, weight, bias, residual, eps: float, rms: bool):
    """fusedlm::layer_norm_fwd_triton: (y, h, mean, rstd) as in the op schema (python/fusedlm/ops/layer_norm.py)."""
    _check(x, "x")
    m, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0,) if rms else (m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    if m == 0:
        return y, h, mean, rstd
    block_size, chunked = _chunks(n)
    if x.is_cuda:
        block_rows, num_warps = _gpu_tile("fwd", block_size, chunked, n % 16 == 0)
        rows_per_program = block_rows
    else:
        block_rows, rows_per_program = _interpreter_tile(block_size, m)
        num_warps = 4
    with device_guard(OP, x):
        _layer_norm_fwd_kernel[(triton.cdiv(m, rows_per_program),)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight,
            y, h if residual is not None else y, rstd if rms else mean, rstd,
            x.stride(0), m, n, rows_per_program, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms,
            BLOCK_ROWS=block_rows, BLOCK_SIZE=block_size, CHUNKED=chunked,
            num_warps=num_warps, num_stages=NUM_STAGES,
        )
    return y, h, mean, rstd


def _reduce_partials(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out = partials.sum(0) in a fixed order, cast to out.dtype."""
    n_partials, n = partials.shape
    if partials.is_cuda:
        block_partials, block_size, num_warps = GPU_REDUCE
    else:
        block_partials = triton.next_power_of_2(n_partials)
        block_size = max(MIN_BLOCK, min(triton.next_power_of_2(n), INTERPRET_TILE // block_partials))
        num_warps = 4
    _layer_norm_bwd_reduce_kernel[(triton.cdiv(n, block_size),)](
        partials, out, n_partials, n,
        BLOCK_PARTIALS=block_partials, BLOCK_SIZE=block_size, num_warps=num_warps, num_stages=NUM_STAGES,
    )


def layer_norm_bwd(dy, dh, h, weight, mean, rstd, rms: bool, has_bias: bool):
    """fusedlm::layer_norm_bwd_triton: (dx, dweight, dbias) as in the op schema."""
    _check(h, "h")
    m, n = h.shape
    dx = torch.empty_like(h)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(weight) if has_bias else weight.new_empty((0,))
    if m == 0:
        dweight.zero_()
        dbias.zero_()
        return dx, dweight, dbias
    block_size, chunked = _chunks(n)
    if h.is_cuda:
        # ~2 row programs per SM (times cdiv(N, CHUNK) column programs when chunked): enough parallelism,
        # and the P * N * 4 bytes of partials stay small beside the M * N tensors. The row split depends
        # on the SM count, so the gradients are bit-identical run to run on one GPU model.
        block_rows, num_warps = _gpu_tile("bwd", block_size, chunked, n % 16 == 0)
        n_programs = min(triton.cdiv(m, block_rows), 2 * _sm_count(h.device.index or 0))
        rows_per_program = triton.cdiv(triton.cdiv(m, n_programs), block_rows) * block_rows
    else:
        block_rows, rows_per_program = _interpreter_tile(block_size, m)
        num_warps = 4
    n_programs = triton.cdiv(m, rows_per_program)
    dw_partial = torch.empty((n_programs, n), dtype=torch.float32, device=h.device)
    db_partial = torch.empty((n_programs, n), dtype=torch.float32, device=h.device) if has_bias else dw_partial
    with device_guard(OP, h):
        _layer_norm_bwd_kernel[(triton.cdiv(n, block_size), n_programs)](
            dy, dh if dh is not None else dy, h, weight, rstd if rms else mean, rstd,
            dx, dw_partial, db_partial,
            h.stride(0), m, n, rows_per_program,
            HAS_DH=dh is not None, HAS_BIAS=has_bias, RMS=rms,
            BLOCK_ROWS=block_rows, BLOCK_SIZE=block_size, CHUNKED=chunked,
            num_warps=num_warps, num_stages=NUM_STAGES,
        )
        _reduce_partials(dw_partial, dweight)
        if has_bias:
            _reduce_partials(db_partial, dbias)
    return dx, dweight, dbias


# --- static GPU report (python/fusedlm/gpu_report.py compiles these for sm_80 / sm_90) ---------

def static_report_specs() -> list[dict]:
    """One spec per (kernel, launch configuration the GPU table can pick, dtype, alignment), with the
    feature flags that hold the most registers (residual, bias, layernorm; dh in backward).

    `signature` holds every argument in order (constexprs typed "constexpr", as Triton >= 3.2 expects),
    `constexprs` is keyed by name, `attrs` is what the JIT adds when N is a multiple of 16 (pointers, row_stride
    and n_cols 16-divisible, so loads vectorise; "aligned"), or nothing for odd N ("unaligned": scalar
    loads, the register-hungriest case).
    python/fusedlm/gpu_report.py builds the triton.compiler.ASTSource from the spec.
    """
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        p = "*" + dtype
        for aligned in (True, False):
            # every (BLOCK_SIZE, CHUNKED) that _chunks returns for 1 <= N <= MAX_COLS
            tiles = [(MIN_BLOCK << i, False) for i in range((MAX_TILE // MIN_BLOCK).bit_length())]
            tiles.append((CHUNK, True))
            for block_size, chunked in tiles:
                block_rows, fwd_warps = _gpu_tile("fwd", block_size, chunked, aligned)
                _, bwd_warps = _gpu_tile("bwd", block_size, chunked, aligned)
                what = (f"{MAX_TILE} < N <= {MAX_COLS}: {CHUNK}-column chunks" if chunked else
                        f"N <= {block_size}: {block_rows}x{block_size} tile")
                constexprs = {"BLOCK_ROWS": block_rows, "BLOCK_SIZE": block_size, "CHUNKED": chunked}
                specs.append(_spec(
                    _layer_norm_fwd_kernel, dtype, aligned, fwd_warps,
                    {"HAS_RESIDUAL": True, "HAS_BIAS": True, "RMS": False, **constexprs},
                    [p] * 6 + ["*fp32", "*fp32", "i32", "i32", "i32", "i32", "fp32"],
                    f"{what}, {fwd_warps} warps",
                ))
                specs.append(_spec(
                    _layer_norm_bwd_kernel, dtype, aligned, bwd_warps,
                    {"HAS_DH": True, "HAS_BIAS": True, "RMS": False, **constexprs},
                    [p] * 4 + ["*fp32", "*fp32", p, "*fp32", "*fp32", "i32", "i32", "i32", "i32"],
                    f"{what}, {bwd_warps} warps",
                ))
            block_partials, block_size, num_warps = GPU_REDUCE
            specs.append(_spec(
                _layer_norm_bwd_reduce_kernel, dtype, aligned, num_warps,
                {"BLOCK_PARTIALS": block_partials, "BLOCK_SIZE": block_size}, ["*fp32", p, "i32", "i32"],
                f"{block_partials}x{block_size} tile, {num_warps} warps",
            ))
    return specs


def _spec(fn, dtype, aligned, num_warps, constexprs, runtime_types, config):
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(runtime_types), (fn.__name__, names)
    types = dict(zip(names, runtime_types), **{name: "constexpr" for name in constexprs})
    divisible = [n for n in names if aligned and (types[n].startswith("*") or n in ("row_stride", "n_cols"))]
    return {
        "kernel": fn.__name__, "fn": fn, "signature": {name: types[name] for name in fn.arg_names},
        "constexprs": dict(constexprs),
        "attrs": {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible},
        "num_warps": num_warps, "num_stages": NUM_STAGES, "dtype": dtype,
        "config": config + (", N % 16 == 0" if aligned else ", odd N"),
    }

