r"""Triton kernels of lm_head_softmax: next-token probabilities from hidden states.

    probs = softmax((x W^T + b) / T)        x (N, d), W (V, d), b (V,), probs (N, V) float32

Two launches; the logits never exist outside the output buffer.

1. `_lm_head_logits_kernel`, program (v, m): the GEMM tile of V-columns [v BV, (v+1) BV) against
   tokens [m BM, (m+1) BM), accumulated in float32 over d in BLOCK_D steps, computed as W_v x_m^T
   so that the vocabulary side (BV = 128 on a GPU) is the MMA's M side: a decode step with one to
   sixteen tokens still runs HGMMA / HMMA tiles. The epilogue adds the bias, stores the logits
   l = z + b into probs (the output doubles as the logits buffer) and writes each token's tile
   statistics m_t = max l, s_t = sum 2^((l - m_t) c), c = log2(e) / T, to a small (N, V / BV) float32
   buffer pair: the online max/sum, one tile at a time.
2. `_lm_head_normalize_kernel`, program (r, v): folds a token's tile statistics into its row max m
   and sum s = sum_t s_t 2^((m_t - m) c), then rewrites its columns as p = 2^((l - m) c) / s.
The max is subtracted before the scaling by c: the largest logit gives exactly 2^0 at any T (scaled
first, a tiny T overflows l c to inf, and inf - inf is NaN), and the exponent's rounding error is
that of l - m, not of l / T (3e-4 relative in p at logits near 2000 and T = 0.25 on an H200, CUDA).

Traffic: the GEMM reads W once per token block (the whole cost for decode: V d 2 bytes, 500 MiB
at 128256 x 2048 in bf16) and writes N V 4 bytes; the second pass reads and writes those N V 4
bytes again, plus 8 bytes per (token, tile). Recomputing the GEMM instead of the second pass would
read W twice, which costs more than rewriting the row at any N a decode or a prefill uses.
fp32 math everywhere; fp32 inputs use IEEE dots (no TF32), 16-bit ones tensor cores, whose float32
logits are not rounded to the input dtype (F.linear's are: one rounding fewer than the reference).

GPU tiles (tables below, checked for spills by static_report_specs() / `make gpu-report`);
under TRITON_INTERPRET=1 (CPU tensors, fp32) large tiles: few programs, since the interpreter's
cost grows with the number of programs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedlm.kernels import device_guard

OP = "lm_head_softmax"
LOG2E = 1.4426950408889634

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _lm_head_logits_kernel(
    X_ptr, W_ptr, B_ptr, U_ptr, TileMax_ptr, TileSum_ptr,
    n_rows, vocab, d, x_row_stride, w_row_stride, u_row_stride, n_tiles, scale,
    HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program (v, m): l = W_v x_m^T + b_v, (BLOCK_V, BLOCK_M), stored transposed into the rows of U; per
    token the tile's max and sum of 2^((l - max) scale) into TileMax / TileSum[token, v] (a tile of
    only -inf logits, e.g. a masked stretch of the vocabulary: max -inf, sum 0)."""
    pid_v = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_v = offs_v < vocab
    mask_m = offs_m < n_rows
    w_ptrs = W_ptr + offs_v.to(tl.int64)[:, None] * w_row_stride + offs_d[None, :]
    x_ptrs = X_ptr + offs_m.to(tl.int64)[:, None] * x_row_stride + offs_d[None, :]
    acc = tl.zeros((BLOCK_V, BLOCK_M), dtype=tl.float32)
    for k in range(0, d, BLOCK_D):
        mask_d = (k + offs_d) < d
        w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
        w_ptrs += BLOCK_D
        x_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(B_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[:, None]
    u = tl.where(mask_v[:, None], acc, float("-inf"))
    tile_max = tl.max(u, 0)
    safe = tl.where(tile_max == float("-inf"), 0.0, tile_max)  # 2^(-inf) = 0, never -inf - -inf
    tile_sum = tl.sum(tl.math.exp2((u - safe[None, :]) * scale), 0)
    u_ptrs = U_ptr + offs_m.to(tl.int64)[None, :] * u_row_stride + offs_v[:, None]
    tl.store(u_ptrs, u, mask=mask_v[:, None] & mask_m[None, :])
    stat = offs_m.to(tl.int64) * n_tiles + pid_v
    tl.store(TileMax_ptr + stat, tile_max, mask=mask_m)
    tl.store(TileSum_ptr + stat, tile_sum, mask=mask_m)


@triton.jit
def _lm_head_normalize_kernel(
    U_ptr, TileMax_ptr, TileSum_ptr,
    n_rows, vocab, u_row_stride, n_tiles, scale,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Program (r, v): rows [r BLOCK_R, ...) x columns [v BLOCK_V, ...) of U := 2^((U - m) scale) / s, with
    each row's (m, s) folded from its n_tiles tile statistics (every program of a row folds them
    again: n_tiles * 8 bytes, small beside the BLOCK_V * 8 bytes it rewrites). Rows on grid axis 0,
    which takes 2^31 - 1 programs (axis 1 takes 65535)."""
    pid_r = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    rows64 = rows.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    # Online merge, one running (max, sum) per lane; lanes that saw no tile keep (-inf, 0).
    run_max = tl.full((BLOCK_R, BLOCK_T), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        mask = mask_r[:, None] & ((t0 + offs_t) < n_tiles)[None, :]
        stat = rows64[:, None] * n_tiles + (t0 + offs_t)[None, :]
        t_max = tl.load(TileMax_ptr + stat, mask=mask, other=float("-inf"))
        t_sum = tl.load(TileSum_ptr + stat, mask=mask, other=0.0)
        new_max = tl.maximum(run_max, t_max)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # 2^(-inf - 0) = 0, never -inf - -inf
        run_sum = run_sum * tl.math.exp2((run_max - safe) * scale) + t_sum * tl.math.exp2((t_max - safe) * scale)
        run_max = new_max
    row_max = tl.max(run_max, 1)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # only the masked rows
    row_sum = tl.sum(run_sum * tl.math.exp2((run_max - safe_max[:, None]) * scale), 1)
    inv_sum = 1.0 / tl.where(mask_r, row_sum, 1.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = mask_r[:, None] & (offs_v < vocab)[None, :]
    u_ptrs = U_ptr + rows64[:, None] * u_row_stride + offs_v[None, :]
    u = tl.load(u_ptrs, mask=mask, other=0.0)
    tl.store(u_ptrs, tl.math.exp2((u - safe_max[:, None]) * scale) * inv_sum[:, None], mask=mask)


# --- launch configurations -------------------------------------------------------------------

# GEMM tiles on sm_80 / sm_90a, per (16-bit?): (BLOCK_V, BLOCK_D, num_stages) and {BLOCK_M: num_warps},
# BLOCK_M (tokens) the narrowest that covers the token count: decode steps take narrow token tiles,
# prefill the widest. Pruned because they spill on sm_90a with odd V (the transposed store of u
# then runs element by element; stack bytes): 16-bit BLOCK_M = 64 on 4 warps (160), BLOCK_M = 128 on
# 8 warps (320, also with 2 or 3 stages).
_GPU_GEMM = {True: (128, 64, 4), False: (64, 32, 2)}
_GPU_BLOCK_M = {True: {16: 4, 32: 4, 64: 8}, False: {16: 4, 32: 4}}
# Normalise pass on a GPU: one row, 4096 columns, 8 warps (16 values a thread).
GPU_NORMALIZE = (1, 4096, 8)
BLOCK_T = 128  # tile statistics folded per step
INTERPRET_GEMM = (512, 128, 256)  # BLOCK_V, BLOCK_M (most), BLOCK_D (most) under the interpreter
INTERPRET_NORMALIZE = (128, 1024)  # BLOCK_R, BLOCK_V under the interpreter


def _gpu_block_m(n_rows: int, wide: bool) -> int:
    """The narrowest token tile of the table that covers n_rows, else the widest."""
    choices = sorted(_GPU_BLOCK_M[wide])
    return next((b for b in choices if n_rows <= b), choices[-1])


def _gemm_config(x: torch.Tensor, n_rows: int, d: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_V, BLOCK_M, BLOCK_D, num_warps, num_stages)."""
    if x.is_cuda:
        wide = x.dtype != torch.float32
        block_v, block_d, stages = _GPU_GEMM[wide]
        block_m = _gpu_block_m(n_rows, wide)
        return block_v, block_m, block_d, _GPU_BLOCK_M[wide][block_m], stages
    block_v, most_m, most_d = INTERPRET_GEMM
    return (block_v, min(most_m, max(16, triton.next_power_of_2(n_rows))),
            min(most_d, max(16, triton.next_power_of_2(d))), 4, 1)


def _check(x: torch.Tensor, weight: torch.Tensor, bias) -> None:
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"{OP}: the triton backend takes float32, bfloat16 or float16 x, got {x.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{OP}: the triton backend takes x (N, d) and weight (V, d), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device or t.stride(-1) != 1):
            raise ValueError(f"{OP}: the triton backend takes {name} of x's dtype and device with unit "
                             f"stride in its last dimension")


# --- launcher --------------------------------------------------------------------------------

def lm_head_softmax(x, weight, bias, temperature: float):
    """fusedlm::lm_head_softmax_triton: probs (N, V) float32 (python/fusedlm/ops/lm_head.py)."""
    _check(x, weight, bias)
    if not temperature > 0:
        raise ValueError(f"{OP}: temperature must be > 0, got {temperature}")
    n_rows, d = x.shape
    vocab = weight.shape[0]
    probs = torch.empty((n_rows, vocab), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return probs
    scale = LOG2E / temperature  # finite for temperature >= ops.lm_head.MIN_TEMPERATURE
    block_v, block_m, block_d, warps, stages = _gemm_config(x, n_rows, d)
    n_tiles = triton.cdiv(vocab, block_v)
    tile_max = torch.empty((n_rows, n_tiles), dtype=torch.float32, device=x.device)
    tile_sum = torch.empty_like(tile_max)
    if x.is_cuda:
        block_r, block_vn, warps_n = GPU_NORMALIZE
    else:
        block_r, most_v = INTERPRET_NORMALIZE
        block_r = min(block_r, triton.next_power_of_2(n_rows))
        block_vn, warps_n = min(most_v, triton.next_power_of_2(vocab)), 4
    with device_guard(OP, x):
        _lm_head_logits_kernel[(n_tiles, triton.cdiv(n_rows, block_m))](
            x, weight, bias if bias is not None else weight, probs, tile_max, tile_sum,
            n_rows, vocab, d, x.stride(0), weight.stride(0), probs.stride(0), n_tiles, scale,
            HAS_BIAS=bias is not None, BLOCK_V=block_v, BLOCK_M=block_m, BLOCK_D=block_d,
            IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages,
        )
        _lm_head_normalize_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(vocab, block_vn))](
            probs, tile_max, tile_sum, n_rows, vocab, probs.stride(0), n_tiles, scale,
            BLOCK_R=block_r, BLOCK_V=block_vn, BLOCK_T=BLOCK_T, num_warps=warps_n, num_stages=1,
        )
    return probs


# --- static GPU report (python/fusedlm/gpu_report.py compiles these for sm_80 / sm_90a) --------

def static_report_specs() -> list[dict]:
    """One spec per (kernel, GPU configuration the tables can pick, dtype), with bias (the variant
    with the most code). attrs: pointers and row strides 16-divisible, as the JIT finds them for
    d % 8 == 0 (every hidden size in use); odd V is a run-time mask, not a separate compile.
    uses_tensor_cores: the 16-bit GEMM (HGMMA on sm_90a, HMMA on sm_80); fp32 uses IEEE dots (FMA)."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        p = "*" + dtype
        wide = dtype != "fp32"
        block_v, block_d, stages = _GPU_GEMM[wide]
        for block_m, warps in _GPU_BLOCK_M[wide].items():
            for aligned_v in (True, False):  # probs rows 16-divisible (V % 16 == 0) or not (odd V)
                strides = ("x_row_stride", "w_row_stride") + (("u_row_stride",) if aligned_v else ())
                specs.append(_spec(
                    _lm_head_logits_kernel, dtype, warps, stages,
                    {"HAS_BIAS": True, "BLOCK_V": block_v, "BLOCK_M": block_m, "BLOCK_D": block_d,
                     "IEEE": not wide},
                    [p, p, p, "*fp32", "*fp32", "*fp32"] + ["i32"] * 7 + ["fp32"], strides, wide,
                    "V % 16 == 0" if aligned_v else "odd V",
                ))
    block_r, block_v, warps = GPU_NORMALIZE
    specs.append(_spec(
        _lm_head_normalize_kernel, "fp32", warps, 1, {"BLOCK_R": block_r, "BLOCK_V": block_v, "BLOCK_T": BLOCK_T},
        ["*fp32"] * 3 + ["i32"] * 4 + ["fp32"], (), False, "any V",
    ))
    return specs


def _spec(fn, dtype, num_warps, num_stages, constexprs, runtime_types, strides, tensor_cores, what):
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(runtime_types), (fn.__name__, names, len(runtime_types))
    types = dict(zip(names, runtime_types), **{name: "constexpr" for name in constexprs})
    divisible = [n for n in names if types[n].startswith("*") or n in strides]
    config = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k not in ("HAS_BIAS", "IEEE"))
    return {
        "kernel": fn.__name__, "fn": fn, "signature": {name: types[name] for name in fn.arg_names},
        "constexprs": dict(constexprs),
        "attrs": {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible},
        "num_warps": num_warps, "num_stages": num_stages, "dtype": dtype, "uses_tensor_cores": tensor_cores,
        "config": f"{config}, {num_warps} warps, {num_stages} stages, {what}",
    }
