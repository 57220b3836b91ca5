r"""Triton kernels for the fused pre-norm feed-forward sub-block: fusedlm::layernorm_mlp_{fwd,bwd}_triton.

x (M, d) contiguous; fc_weight (F, d) with F = h, or F = 2h for the gated activations (rows [0, h) the
gate a, [h, 2h) the up b); proj_weight (d, h). Every GEMM runs in x's dtype with float32 accumulation
(fp32: IEEE dots, no TF32); every element-wise step is float32 math (the interpreter cannot do bf16 math).

Forward (3 launches):

    _row_stats_kernel   mean, rstd per row (layernorm: centred two-pass variance; rmsnorm: rstd only)
    _fc_fwd_kernel      u = xn @ fc_w^T + fc_b, where each A tile is normalised as it is loaded,
                        xn = ((x - mean) * rstd * w + b) rounded to x.dtype (what the reference feeds fc);
                        epilogue: pre_act = u (stored unless recompute), act = act(u) -> (M, h), a transient
    _linear_kernel      y = act @ proj_w^T + proj_b (+ x): bias and residual in the epilogue

Backward (kernels/layernorm_mlp_bwd.py): dact = dy @ proj_w with act'(u) fused in its epilogue (u read from
pre_act, or recomputed in the same program with the norm applied on load) giving dpre; dproj_w = dy^T @ act
and dfc_w = dpre^T @ norm(x) with their bias column sums; dxn = dpre @ fc_w; the norm's backward with the
residual's gradient added (kernels/layer_norm.py); first of all the forward's _row_stats_kernel again
(the statistics are not saved). Every gradient is deterministic (no atomics).

Memory (s = bytes per element): saved for backward x and, unless recompute, pre_act (M F s); the backward
runs the statistics pass again rather than keep mean + rstd. Transients: forward act (M h s); backward
mean + rstd (8 M bytes), act (M h s), dpre (M F s), dxn (4 M d).
Traffic beyond the GEMMs' own operand reads: forward writes pre_act + act and reads act once; backward
writes act + dpre + dxn and reads them once more (plus pre_act, unless recomputed).

Launch configuration: on a GPU every GEMM kernel is @triton.autotune'd over a short list per class
(WIDE / NARROW: "sm90" 16-bit, "sm80" 16-bit, "fp32" IEEE dots on FMA units), pruned at launch to the class
of the input dtype and the device; every listed entry compiles without spills for the archs of its class
(sm90: sm_90a, sm80: sm_80, the others both) and, 16-bit, with HGMMA / HMMA (static_report_specs(),
python -m fusedlm.gpu_report). Under TRITON_INTERPRET=1
(CPU tensors) no autotuning: one large-block configuration sized to the problem, so few programs run.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from fusedlm.kernels import REPORT_ARCHS, device_guard, gpu_family, triton_version
from fusedlm.reference import ACTIVATIONS, GATED_ACTIVATIONS

OP = "layernorm_mlp"
_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --- activations, float32 in and out ---------------------------------------------------------

@triton.jit
def _gelu_erf(x):
    """(gelu(x), gelu'(x)) = (x Phi(x), Phi(x) + x phi(x)), Phi the normal CDF, phi its density."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _gelu_tanh(x):
    """(f, f') of f = 0.5 x (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3); tanh(z) = 2 sigmoid(2z) - 1,
    which saturates to +-1 without overflow. f''s second term 0.5 x (1 - t^2) z'(x) is taken at x clamped
    to [-20, 20]: it is exactly 0 beyond (t = +-1), where x^2 = inf (|x| > 1.8e19) made it 0 * inf = NaN."""
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
    xc = tl.minimum(tl.maximum(x, -20.0), 20.0)
    dz = 0.7978845608028654 * (1.0 + 0.134145 * xc * xc)
    return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * xc * (1.0 - t * t) * dz


@triton.jit
def _silu(x):
    """(x s, s (1 + x (1 - s))), s = sigmoid(x)."""
    s = 1.0 / (1.0 + tl.exp(-x))
    return x * s, s * (1.0 + x * (1.0 - s))


@triton.jit
def _act_parts(x, ACTIVATION: tl.constexpr):
    """(f(x), f'(x)) of the (gate) activation: gelu / geglu use erf, swiglu uses silu."""
    if ACTIVATION == "gelu_tanh":
        f, df = _gelu_tanh(x)
    elif ACTIVATION == "relu":
        f = tl.where(x < 0.0, 0.0, x)  # NaN kept, as torch.relu (tl.maximum would give 0)
        df = tl.where(x <= 0.0, 0.0, 1.0)  # NaN -> 1 (passes the gradient on), as torch's threshold_backward
    elif ACTIVATION == "silu" or ACTIVATION == "swiglu":
        f, df = _silu(x)
    else:
        f, df = _gelu_erf(x)
    return f, df


# --- shared GEMM pieces ----------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_ids(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles walk the column tiles together, so the B tiles they share
    stay in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(n_rows, BLOCK_M)
    grid_n = tl.cdiv(n_cols, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _normalise(x, mean, rstd, NW_ptr, NB_ptr, offs_k, k_mask, HAS_NORM_BIAS: tl.constexpr):
    """(x - mean) * rstd * w (+ b) in float32, rounded to the MMA dtype (the norm output the reference feeds fc).
    mean, rstd per row of x; w, b per column. Masked columns have w = b = 0, so they come out 0."""
    w = tl.load(NW_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    xn = (x.to(tl.float32) - mean[:, None]) * (rstd[:, None] * w[None, :])
    if HAS_NORM_BIAS:
        xn += tl.load(NB_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    return xn.to(NW_ptr.dtype.element_ty)


@triton.jit
def _load_stats(Mean_ptr, Rstd_ptr, rows, row_mask, RMS: tl.constexpr):
    rstd = tl.load(Rstd_ptr + rows, mask=row_mask, other=0.0)
    if RMS:
        mean = tl.zeros_like(rstd)
    else:
        mean = tl.load(Mean_ptr + rows, mask=row_mask, other=0.0)
    return mean, rstd


@triton.jit
def _fc_pre(X_ptr, Mean_ptr, Rstd_ptr, NW_ptr, NB_ptr, FCW_ptr, FCB_ptr, offs_m, offs_n, n_rows, d, h,
            HAS_NORM_BIAS: tl.constexpr, RMS: tl.constexpr, HAS_FC_BIAS: tl.constexpr, GATED: tl.constexpr,
            IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """u = norm(x) @ fc_w^T + fc_b for rows offs_m and fc outputs offs_n (gated: also outputs h + offs_n),
    rounded to the MMA dtype and returned as float32 (a, b); b is a dummy when not GATED."""
    row_mask = offs_m < n_rows
    col_mask = offs_n < h
    mean, rstd = _load_stats(Mean_ptr, Rstd_ptr, offs_m, row_mask, RMS)
    x_rows = X_ptr + offs_m.to(tl.int64)[:, None] * d
    wa_cols = FCW_ptr + offs_n.to(tl.int64)[None, :] * d  # fc_w^T tile [k, n] = fc_w[n, k]
    wb_cols = wa_cols + h * d
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d
        x = tl.load(x_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        xn = _normalise(x, mean, rstd, NW_ptr, NB_ptr, offs_k, k_mask, HAS_NORM_BIAS)
        w_mask = k_mask[:, None] & col_mask[None, :]
        acc_a = _mma(xn, tl.load(wa_cols + offs_k[:, None], mask=w_mask, other=0.0), acc_a, IEEE)
        if GATED:
            acc_b = _mma(xn, tl.load(wb_cols + offs_k[:, None], mask=w_mask, other=0.0), acc_b, IEEE)
    if HAS_FC_BIAS:
        acc_a += tl.load(FCB_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_b += tl.load(FCB_ptr + h + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    dtype = FCW_ptr.dtype.element_ty
    return acc_a.to(dtype).to(tl.float32), acc_b.to(dtype).to(tl.float32)


# --- forward ---------------------------------------------------------------------------------

@triton.jit
def _row_stats_kernel(X_ptr, Mean_ptr, Rstd_ptr, n_rows, d, eps,
                      RMS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """mean (layernorm) and rstd of BLOCK_ROWS rows, in BLOCK_D-column chunks (pass 2 re-reads from L1/L2)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    x_rows = X_ptr + rows.to(tl.int64)[:, None] * d
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_rows + cols[None, :], mask=row_mask[:, None] & (cols < d)[None, :], other=0.0)
        x = x.to(tl.float32)
        acc += x * x if RMS else x
    if RMS:
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / d + eps)
    else:
        mean = tl.sum(acc, axis=1) / d
        acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < d)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            centred = tl.where(mask, x - mean[:, None], 0.0)
            acc += centred * centred
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / d + eps)
        tl.store(Mean_ptr + rows, mean, mask=row_mask)
    tl.store(Rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _fc_fwd_kernel(
    X_ptr, Mean_ptr, Rstd_ptr, NW_ptr, NB_ptr, FCW_ptr, FCB_ptr, Pre_ptr, Act_ptr, n_rows, d, h,
    HAS_NORM_BIAS: tl.constexpr, RMS: tl.constexpr, HAS_FC_BIAS: tl.constexpr, GATED: tl.constexpr,
    ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile (m, n) of act = act(norm(x) @ fc_w^T + fc_b), (M, h); and of pre_act, (M, F), when STORE_PRE."""
    pid_m, pid_n = _tile_ids(n_rows, h, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a, b = _fc_pre(X_ptr, Mean_ptr, Rstd_ptr, NW_ptr, NB_ptr, FCW_ptr, FCB_ptr, offs_m, offs_n, n_rows, d, h,
                   HAS_NORM_BIAS, RMS, HAS_FC_BIAS, GATED, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    mask = (offs_m < n_rows)[:, None] & (offs_n < h)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    dtype = Act_ptr.dtype.element_ty
    if STORE_PRE:
        fc_out = 2 * h if GATED else h
        tl.store(Pre_ptr + rows * fc_out + offs_n[None, :], a.to(dtype), mask=mask)
        if GATED:
            tl.store(Pre_ptr + rows * fc_out + h + offs_n[None, :], b.to(dtype), mask=mask)
    act, _ = _act_parts(a, ACTIVATION)
    if GATED:
        act = act * b
    tl.store(Act_ptr + rows * h + offs_n[None, :], act.to(dtype), mask=mask)


@triton.jit
def _linear_kernel(
    A_ptr, B_ptr, Bias_ptr, R_ptr, C_ptr, n_rows, n_cols, n_inner,
    B_ROWS_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = A (M, K) @ B (+ bias) (+ R), A row-major; B is a weight stored (N, K) (B_ROWS_N: C = A W^T,
    proj in forward) or (K, N) (C = A W, dxn = dpre @ fc_w in backward). C in its own dtype."""
    pid_m, pid_n = _tile_ids(n_rows, n_cols, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < n_rows
    col_mask = offs_n < n_cols
    a_rows = A_ptr + offs_m.to(tl.int64)[:, None] * n_inner
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_inner, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < n_inner
        a = tl.load(a_rows + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if B_ROWS_N:
            b_ptrs = B_ptr + offs_n.to(tl.int64)[None, :] * n_inner + offs_k[:, None]
        else:
            b_ptrs = B_ptr + offs_k.to(tl.int64)[:, None] * n_cols + offs_n[None, :]
        acc = _mma(a, tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0), acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(Bias_ptr + offs_n, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * n_cols + offs_n[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(R_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(C_ptr + offs, acc.to(C_ptr.dtype.element_ty), mask=mask)


# --- launch configuration --------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per class (_config_class); GROUP_M = 8. Every entry compiles
# with no spill (static_report_specs()) for the archs its class runs on: "sm90" entries for sm_90a, "sm80" ones
# for sm_80, the others for both. 16-bit entries have BLOCK_M >= 64 and 4-warp multiples, which wgmma (HGMMA)
# needs on sm_90a. WIDE: one accumulator (_linear_kernel, _dweight_kernel). NARROW: the fc and
# dpre kernels, which hold up to two (fc gated) or three (dpre gated and recomputing) accumulator tiles.
# Pruned because they spill (stack bytes sm_90a / sm_80, bf16, the heaviest variant):
#   fc   128x128x64 8 warps (0 / 3856), 128x64x64 4 warps (40 / 216), 64x128x64 4 warps (40 / 128),
#        128x128x32 8 warps (0 / 128), 128x64x32 4 warps (8 / 40); fp32 64x64x16 (0 / 8), 64x32x16 (64 / 0);
#   dpre every 4-warp tile above 64x64 (304-720 / 248-4744), 128x128 8 warps (584-720 / 248-344),
#        64x128x64 8 warps (0 / 136); fp32 32x32x32 (80 / 0), 64x32x16 (0 / 8); with Triton 3.6 also fp32
#        32x64x16 at 2 stages (fc: 16 / 0), hence 1 stage (clean with 3.6 and 3.9 on both archs).
# odd16 / odd32: widths not all multiples of 16 (e.g. d = 97). Without the JIT's divisibility
# specialisation the loads are scalar and pipelining stages them through registers: every entry above
# spills there (wide 16-bit 8-1848 bytes, fc / dpre 8-1040, fp32 64x64 16). Their entries run one or two
# stages on small tiles; fc / dpre 16-bit need 64x32 (64x64x16 one stage: 8-256 bytes).
WIDE = {
    "sm90": ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 4)),
    "sm80": ((128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4)),
    "fp32": ((64, 64, 16, 4, 2), (32, 64, 16, 4, 2)),
    "odd16": ((128, 64, 32, 8, 1), (64, 64, 32, 4, 2)),
    "odd32": ((32, 64, 16, 4, 1), (32, 32, 16, 4, 1)),
}
NARROW = {
    "sm90": ((128, 64, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 4, 3)),
    "sm80": ((128, 64, 32, 8, 4), (64, 128, 32, 8, 3), (64, 64, 32, 4, 4)),
    "fp32": ((32, 64, 16, 4, 1), (32, 32, 16, 4, 2)),
    "odd16": ((64, 32, 32, 4, 1), (64, 32, 16, 4, 1)),
    "odd32": ((32, 64, 16, 4, 1), (32, 32, 16, 4, 1)),
}
# The fc kernel on sm_90a also fits 128x128 tiles (two accumulators of 64 floats a thread at 8 warps: 253
# registers, no spill with Triton 3.6 and 3.9); the dpre kernel, with up to three, does not (512-900 bytes).
FC = {**NARROW, "sm90": NARROW["sm90"] + ((128, 128, 64, 8, 3), (128, 128, 64, 8, 4))}
# The dpre kernel on sm_80 with Triton before 3.9 (3.6 checked: the H200 machine's release): every NARROW
# sm80 entry spills 8-32 bytes, 64x64x32 at 8 warps and 3 stages none (3.9 compiles them all clean).
DPRE = {**NARROW, "sm80": ((64, 64, 32, 8, 3),)} if triton_version() < (3, 9) else NARROW
GROUP_M = 8
STATS_TILE = 2048  # elements per row-stats program on a GPU (4 warps: 16 per thread)
MAX_STATS_BLOCK = 1024
INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, INTERPRET_BLOCK_K = 128, 256, 128
INTERPRET_STATS_TILE = 32768


# the widths among the kernels' arguments: aligned when all are multiples of 16 (n_rows need not be)
_WIDTHS = ("d", "h", "n_cols", "n_inner", "n_a", "n_b")
CLASS_DTYPES = {"sm90": ("bf16", "fp16"), "sm80": ("bf16", "fp16"), "fp32": ("fp32",),
                "odd16": ("bf16", "fp16"), "odd32": ("fp32",)}


def _config_class(named_args: dict) -> str:
    """The table class of a launch: its MMA dtype (the first tensor's), the GPU, and whether the widths are
    multiples of 16 (what the JIT's divisibility specialisation needs to vectorise and pipeline the loads)."""
    t = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    aligned = all(v % 16 == 0 for k, v in named_args.items() if k in _WIDTHS)
    if t.dtype == torch.float32:
        return "fp32" if aligned else "odd32"
    if not aligned:
        return "odd16"
    return gpu_family(t.device.index or 0)


_TUNED = {}  # plain kernel -> its autotuned launcher (GPU)
_TABLES = {}  # plain kernel -> its configuration table (WIDE or NARROW)


def _tuned(fn, table, key):
    """Register fn autotuned over every entry of table, pruned at launch to the entries of its class.
    key: the widths and the variant (M is not in it: tuned once per model width and dtype)."""
    by_class = {
        cls: [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
                            num_warps=warps, num_stages=stages)
              for bm, bn, bk, warps, stages in entries]
        for cls, entries in table.items()
    }

    def prune(configs, named_args, **kwargs):
        return by_class[_config_class(named_args)]

    _TABLES[fn] = table
    _TUNED[fn] = triton.autotune(configs=[c for cs in by_class.values() for c in cs], key=key,
                                 prune_configs_by={"early_config_prune": prune})(fn)


_tuned(_fc_fwd_kernel, FC, ["d", "h", "GATED", "STORE_PRE"])
_tuned(_linear_kernel, WIDE, ["n_cols", "n_inner", "B_ROWS_N"])


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _gemm(kernel, ref: torch.Tensor, n_rows: int, n_cols: int, n_inner: int, args: tuple, flags: dict) -> None:
    """Launch a GEMM kernel over an (n_rows, n_cols) output with inner size n_inner: autotuned on a GPU;
    under the interpreter one large-block configuration (few programs)."""
    flags = dict(flags, IEEE=ref.dtype == torch.float32)
    if ref.is_cuda:
        def grid(meta):
            return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(n_cols, meta["BLOCK_N"]),)

        _TUNED[kernel][grid](*args, **flags)
        return
    bm = _pow2(n_rows, 16, INTERPRET_BLOCK_M)
    bn = _pow2(n_cols, 16, INTERPRET_BLOCK_N)
    bk = _pow2(n_inner, 16, INTERPRET_BLOCK_K)
    kernel[(triton.cdiv(n_rows, bm) * triton.cdiv(n_cols, bn),)](
        *args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=4, num_stages=1)


def _stats_blocks(d: int, m: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_D) of the row-statistics pass."""
    block_d = _pow2(d, 16, MAX_STATS_BLOCK)
    tile = STATS_TILE if on_gpu else INTERPRET_STATS_TILE
    return (max(1, tile // block_d) if on_gpu else _pow2(m, 1, tile // block_d)), block_d


def _check(x, fc_weight, proj_weight, activation: str) -> None:
    if x.dtype not in _TL_DTYPE:
        raise TypeError(f"{OP}: the triton backend takes float32, bfloat16 or float16 x, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{OP}: the triton backend takes x of shape (M, d), got {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, w in (("fc_weight", fc_weight), ("proj_weight", proj_weight)):
        if w.dtype != x.dtype:
            raise TypeError(f"{OP}: the triton backend takes {name} in x's dtype {x.dtype}, got {w.dtype}")


def _widths(fc_weight, activation: str) -> tuple[int, int, bool]:
    gated = activation in GATED_ACTIVATIONS
    fc_out = fc_weight.shape[0]
    return fc_out, fc_out // 2 if gated else fc_out, gated


def _dense(t):
    return None if t is None else t.contiguous()


# --- launchers -------------------------------------------------------------------------------

def layernorm_mlp_fwd(x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                      eps: float, rms: bool, activation: str, residual: bool, recompute: bool):
    """fusedlm::layernorm_mlp_fwd_triton: (y (M, d), mean (M,) fp32 or (0,) for rmsnorm, rstd (M,) fp32,
    pre_act (M, F) in x.dtype, or (0,) when recompute)."""
    _check(x, fc_weight, proj_weight, activation)
    x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias = map(
        _dense, (x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias))
    m, d = x.shape
    fc_out, h, gated = _widths(fc_weight, activation)
    y = torch.empty_like(x)
    mean = x.new_empty((0,) if rms else (m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    pre = x.new_empty((0,) if recompute else (m, fc_out))
    if m == 0:
        return y, mean, rstd, pre
    act = x.new_empty((m, h))  # transient: proj's A operand
    norm = dict(HAS_NORM_BIAS=norm_bias is not None, RMS=rms)
    with device_guard(OP, x):
        row_stats(x, mean, rstd, eps, rms)
        _gemm(_fc_fwd_kernel, x, m, h, d,
              (x, rstd if rms else mean, rstd, norm_weight, _or(norm_bias, norm_weight), fc_weight,
               _or(fc_bias, fc_weight), act if recompute else pre, act, m, d, h),
              dict(norm, HAS_FC_BIAS=fc_bias is not None, GATED=gated, ACTIVATION=activation,
                   STORE_PRE=not recompute))
        _gemm(_linear_kernel, x, m, d, h, (act, proj_weight, _or(proj_bias, proj_weight), x, y, m, d, h),
              dict(B_ROWS_N=True, HAS_BIAS=proj_bias is not None, HAS_RESIDUAL=residual))
    return y, mean, rstd, pre


def row_stats(x, mean, rstd, eps: float, rms: bool) -> None:
    """mean (M,) (unused for rmsnorm) and rstd (M,) of x's rows, float32, into the given tensors; the
    forward's statistics pass, which the backward runs again (the same bits) instead of saving them."""
    m, d = x.shape
    block_rows, block_d = _stats_blocks(d, m, x.is_cuda)
    _row_stats_kernel[(triton.cdiv(m, block_rows),)](
        x, rstd if rms else mean, rstd, m, d, eps, RMS=rms, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=4)


def layernorm_mlp_bwd(dy, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, pre_act,
                      eps: float, rms: bool, activation: str, residual: bool):
    """fusedlm::layernorm_mlp_bwd_triton: (dx, dnorm_weight, dnorm_bias, dfc_weight, dfc_bias, dproj_weight,
    dproj_bias); the kernels and their launcher are in kernels/layernorm_mlp_bwd.py."""
    from fusedlm.kernels.layernorm_mlp_bwd import backward

    return backward(dy, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, pre_act,
                    eps, rms, activation, residual)


def _or(t, fallback):
    """A pointer argument for an absent tensor (the kernel's constexpr flag keeps it unread)."""
    return t if t is not None else fallback


# --- static GPU report (python/fusedlm/gpu_report.py compiles these for sm_80 / sm_90a) ---------

def static_report_specs() -> list[dict]:
    """The forward GEMMs in every entry of their tables (see _gemm_specs), in the variants that hold the most
    registers (fc: gated geglu, both biases, layernorm, storing pre_act; proj: bias and residual; and the
    dxn = dpre @ fc_w use of _linear_kernel, float32 output); plus every BLOCK_D of the row statistics,
    for widths that are multiples of 16 and for odd ones."""
    def variants(p, ieee):
        return (
            (_fc_fwd_kernel, {"HAS_NORM_BIAS": True, "RMS": False, "HAS_FC_BIAS": True, "GATED": True,
                              "ACTIVATION": "geglu", "STORE_PRE": True, "IEEE": ieee},
             [p] + ["*fp32"] * 2 + [p] * 6 + ["i32"] * 3),
            (_linear_kernel, {"B_ROWS_N": True, "HAS_BIAS": True, "HAS_RESIDUAL": True, "IEEE": ieee},
             [p] * 5 + ["i32"] * 3),
            (_linear_kernel, {"B_ROWS_N": False, "HAS_BIAS": False, "HAS_RESIDUAL": False, "IEEE": ieee},
             [p] * 3 + ["*fp32"] * 2 + ["i32"] * 3),
        )

    specs = _gemm_specs(variants)
    for dtype in ("fp32", "bf16", "fp16"):
        for block_d in (16 << i for i in range((MAX_STATS_BLOCK // 16).bit_length())):
            block_rows, _ = _stats_blocks(block_d, 1, True)
            for aligned in (True, False):
                specs.append(_spec(_row_stats_kernel, dtype, 4, 1,
                                   {"RMS": False, "BLOCK_ROWS": block_rows, "BLOCK_D": block_d},
                                   ["*" + dtype, "*fp32", "*fp32", "i32", "i32", "fp32"],
                                   f"{block_rows}x{block_d} tile, 4 warps, {'d % 16 == 0' if aligned else 'odd d'}",
                                   False, aligned))
    return specs


def _gemm_specs(variants) -> list[dict]:
    """One spec per (variant, entry of its kernel's table, dtype of the entry's class: bf16 and fp16 for the
    16-bit classes); variants(pointer type, ieee) gives (kernel, constexpr flags, runtime argument types).
    attrs as the JIT finds them: pointers 16-divisible always, the widths too in the aligned classes."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for fn, flags, types in variants("*" + dtype, dtype == "fp32"):
            for cls, entries in _TABLES[fn].items():
                if dtype not in CLASS_DTYPES[cls]:
                    continue
                for bm, bn, bk, warps, stages in entries:
                    tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M}
                    spec = _spec(fn, dtype, warps, stages, {**flags, **tile}, types,
                                 f"{cls}: {bm}x{bn}x{bk}, {warps} warps, {stages} stages", dtype != "fp32",
                                 aligned=not cls.startswith("odd"))
                    specs.append({**spec, "archs": REPORT_ARCHS[cls]} if cls in REPORT_ARCHS else spec)
    return specs


def _spec(fn, dtype, num_warps, num_stages, constexprs, runtime_types, config, uses_tensor_cores, aligned=True):
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(runtime_types), (fn.__name__, names, len(runtime_types))
    types = dict(zip(names, runtime_types), **{name: "constexpr" for name in constexprs})
    divisible = [n for n in names if types[n].startswith("*") or (aligned and n in _WIDTHS)]
    return {
        "kernel": fn.__name__, "fn": fn, "signature": {name: types[name] for name in fn.arg_names},
        "constexprs": dict(constexprs),
        "attrs": {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible},
        "num_warps": num_warps, "num_stages": num_stages, "dtype": dtype,
        "uses_tensor_cores": uses_tensor_cores, "config": config,
    }
