r"""Triton kernels of layernorm_mlp's backward (the forward, the shared pieces, the launch configuration and
the math overview are in kernels/layernorm_mlp.py). With u = pre_act, F its width (h, or 2h gated):

    _dpre_kernel     dact = dy @ proj_w, then in its epilogue u (read, or recomputed by a second K loop over d
                     with the norm applied on load), dpre = dact * act'(u) -> (M, F) and act(u) -> (M, h)
    _dweight_kernel  dproj_w = dy^T @ act with dproj_b = colsum(dy);
                     dfc_w = dpre^T @ xn (x normalised on load) with dfc_b = colsum(dpre)
    _linear_kernel   dxn = dpre @ fc_w, (M, d) float32
    layer_norm_bwd   kernels/layer_norm.py: the norm's backward of dxn, + dy when residual; dnorm_w, dnorm_b

Gated (act = f(a) b): da = dact b f'(a), db = dact f(a). Each weight-gradient tile is summed by one program
over all M rows in order, its bias's column sums riding along in the first column tile: deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedlm.kernels import device_guard
from fusedlm.kernels import layer_norm as norm_kernels
from fusedlm.kernels.layernorm_mlp import (
    DPRE, OP, WIDE, _act_parts, _check, _dense, _fc_pre, _gemm, _gemm_specs, _linear_kernel, _load_stats, _mma,
    _normalise, _or, _tile_ids, _tuned, _widths, row_stats,
)


# --- backward --------------------------------------------------------------------------------

@triton.jit
def _dpre_kernel(
    DY_ptr, PW_ptr, X_ptr, Mean_ptr, Rstd_ptr, NW_ptr, NB_ptr, FCW_ptr, FCB_ptr, Pre_ptr, Act_ptr, DPre_ptr,
    n_rows, d, h,
    HAS_NORM_BIAS: tl.constexpr, RMS: tl.constexpr, HAS_FC_BIAS: tl.constexpr, GATED: tl.constexpr,
    ACTIVATION: tl.constexpr, RECOMPUTE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile (m, n) of dact = dy @ proj_w (K = d); epilogue: u from pre_act or recomputed (K = d again),
    dpre = dact * act'(u) -> (M, F) (gated: both halves), act(u) -> (M, h)."""
    pid_m, pid_n = _tile_ids(n_rows, h, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_m < n_rows
    col_mask = offs_n < h
    rows = offs_m.to(tl.int64)[:, None]
    dact = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d
        dy = tl.load(DY_ptr + rows * d + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        pw = tl.load(PW_ptr + offs_k.to(tl.int64)[:, None] * h + offs_n[None, :],
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        dact = _mma(dy, pw, dact, IEEE)
    mask = row_mask[:, None] & col_mask[None, :]
    fc_out = 2 * h if GATED else h
    pre_offs = rows * fc_out + offs_n[None, :]
    if RECOMPUTE:
        a, b = _fc_pre(X_ptr, Mean_ptr, Rstd_ptr, NW_ptr, NB_ptr, FCW_ptr, FCB_ptr, offs_m, offs_n, n_rows, d, h,
                       HAS_NORM_BIAS, RMS, HAS_FC_BIAS, GATED, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        a = tl.load(Pre_ptr + pre_offs, mask=mask, other=0.0).to(tl.float32)
        b = a
        if GATED:
            b = tl.load(Pre_ptr + pre_offs + h, mask=mask, other=0.0).to(tl.float32)
    f, df = _act_parts(a, ACTIVATION)
    dtype = Act_ptr.dtype.element_ty
    if GATED:
        tl.store(Act_ptr + rows * h + offs_n[None, :], (f * b).to(dtype), mask=mask)
        tl.store(DPre_ptr + pre_offs, (dact * b * df).to(dtype), mask=mask)
        tl.store(DPre_ptr + pre_offs + h, (dact * f).to(dtype), mask=mask)
    else:
        tl.store(Act_ptr + rows * h + offs_n[None, :], f.to(dtype), mask=mask)
        tl.store(DPre_ptr + pre_offs, (dact * df).to(dtype), mask=mask)


@triton.jit
def _dweight_kernel(
    A_ptr, B_ptr, Mean_ptr, Rstd_ptr, NW_ptr, NB_ptr, C_ptr, DBias_ptr, n_rows, n_a, n_b,
    NORM_B: tl.constexpr, RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Weight gradient tile C[i, j] = sum_r A[r, i] B[r, j] over all M rows r in order (K = M), A (M, n_a) and
    B (M, n_b) row-major; B normalised on load when NORM_B (B = x, giving dfc_w). BIAS_GRAD: the programs
    of the first j tile also store DBias[i] = sum_r A[r, i]. C and DBias in their own dtypes."""
    pid_i, pid_j = _tile_ids(n_a, n_b, BLOCK_M, BLOCK_N, GROUP_M)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    i_mask = offs_i < n_a
    j_mask = offs_j < n_b
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < n_rows
        a = tl.load(A_ptr + rows.to(tl.int64)[:, None] * n_a + offs_i[None, :],
                    mask=r_mask[:, None] & i_mask[None, :], other=0.0)
        b = tl.load(B_ptr + rows.to(tl.int64)[:, None] * n_b + offs_j[None, :],
                    mask=r_mask[:, None] & j_mask[None, :], other=0.0)
        if NORM_B:  # rows past M give b = norm bias; their a rows are 0
            mean, rstd = _load_stats(Mean_ptr, Rstd_ptr, rows, r_mask, RMS)
            b = _normalise(b, mean, rstd, NW_ptr, NB_ptr, offs_j, j_mask, HAS_NORM_BIAS)
        acc = _mma(tl.trans(a), b, acc, IEEE)
        if BIAS_GRAD:
            if pid_j == 0:
                bias_acc += tl.sum(a.to(tl.float32), axis=0)
    tl.store(C_ptr + offs_i.to(tl.int64)[:, None] * n_b + offs_j[None, :], acc.to(C_ptr.dtype.element_ty),
             mask=i_mask[:, None] & j_mask[None, :])
    if BIAS_GRAD:
        if pid_j == 0:
            tl.store(DBias_ptr + offs_i, bias_acc.to(DBias_ptr.dtype.element_ty), mask=i_mask)


_tuned(_dpre_kernel, DPRE, ["d", "h", "GATED", "RECOMPUTE"])
# dW on sm_90a also fits 128x256 tiles (246-254 registers, no spill with Triton 3.6 and 3.9; the proj GEMM
# with its bias and residual epilogue spills there, hence a table of its own).
DWEIGHT = {**WIDE, "sm90": WIDE["sm90"] + ((128, 256, 64, 8, 3),)}
_tuned(_dweight_kernel, DWEIGHT, ["n_a", "n_b", "NORM_B"])


# --- launcher ------------------------------------------------------------------------------------

def backward(dy, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias, pre_act,
             eps: float, rms: bool, activation: str, residual: bool):
    """layernorm_mlp_bwd (kernels/layernorm_mlp.py): (dx, dnorm_weight, dnorm_bias, dfc_weight, dfc_bias,
    dproj_weight, dproj_bias), each in its input's dtype; the gradient of an absent bias (and dnorm_bias for
    rmsnorm) is (0,). pre_act with numel 0 means recompute it."""
    _check(x, fc_weight, proj_weight, activation)
    dy, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias = map(
        _dense, (dy, x, norm_weight, norm_bias, fc_weight, fc_bias, proj_weight, proj_bias))
    m, d = x.shape
    fc_out, h, gated = _widths(fc_weight, activation)

    def grad_of(bias):
        return torch.empty_like(bias) if bias is not None else x.new_empty((0,))

    dfc_w, dfc_b = torch.empty_like(fc_weight), grad_of(fc_bias)
    dproj_w, dproj_b = torch.empty_like(proj_weight), grad_of(proj_bias)
    if m == 0:
        dnorm_w, dnorm_b = torch.zeros_like(norm_weight), grad_of(norm_bias).zero_()
        return (torch.empty_like(x), dnorm_w, dnorm_b, dfc_w.zero_(), dfc_b.zero_(), dproj_w.zero_(),
                dproj_b.zero_())
    recompute = pre_act.numel() == 0
    mean = x.new_empty((0,) if rms else (m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    mean_arg = rstd if rms else mean
    act = x.new_empty((m, h))  # transients
    dpre = x.new_empty((m, fc_out))
    dxn = x.new_empty((m, d), dtype=torch.float32)
    norm = dict(HAS_NORM_BIAS=norm_bias is not None, RMS=rms)
    nb = _or(norm_bias, norm_weight)
    dproj_b_arg = dproj_b if proj_bias is not None else dproj_w  # absent biases: flags keep these unwritten
    dfc_b_arg = dfc_b if fc_bias is not None else dfc_w
    with device_guard(OP, x):
        row_stats(x, mean, rstd, eps, rms)  # the forward's statistics, the same bits
        _gemm(_dpre_kernel, x, m, h, d,
              (dy, proj_weight, x, mean_arg, rstd, norm_weight, nb, fc_weight, _or(fc_bias, fc_weight),
               dpre if recompute else pre_act.contiguous(), act, dpre, m, d, h),
              dict(norm, HAS_FC_BIAS=fc_bias is not None, GATED=gated, ACTIVATION=activation, RECOMPUTE=recompute))
        _gemm(_dweight_kernel, x, d, h, m,
              (dy, act, mean_arg, rstd, norm_weight, nb, dproj_w, dproj_b_arg, m, d, h),
              dict(NORM_B=False, RMS=rms, HAS_NORM_BIAS=False, BIAS_GRAD=proj_bias is not None))
        _gemm(_dweight_kernel, x, fc_out, d, m,
              (dpre, x, mean_arg, rstd, norm_weight, nb, dfc_w, dfc_b_arg, m, fc_out, d),
              dict(norm, NORM_B=True, BIAS_GRAD=fc_bias is not None))
        _gemm(_linear_kernel, x, m, d, fc_out, (dpre, fc_weight, fc_weight, dxn, dxn, m, d, fc_out),
              dict(B_ROWS_N=False, HAS_BIAS=False, HAS_RESIDUAL=False))
    # the norm's backward with the residual's gradient added (kernels/layer_norm.py, fixed-order partials)
    dx, dnorm_w, dnorm_b = norm_kernels.layer_norm_bwd(dxn, dy if residual else None, x, norm_weight, mean, rstd,
                                                       rms, norm_bias is not None)
    return dx, dnorm_w, dnorm_b, dfc_w, dfc_b, dproj_w, dproj_b


# --- static GPU report (python/fusedlm/gpu_report.py compiles these for sm_80 / sm_90a) ---------

def static_report_specs() -> list[dict]:
    """Both kernels in every entry of their tables (kernels/layernorm_mlp.py _gemm_specs), in the variants that hold
    the most registers: dpre gated (geglu) and recomputing u (three accumulators), dfc_w's normalise-on-load."""
    def variants(p, ieee):
        return (
            (_dpre_kernel, {"HAS_NORM_BIAS": True, "RMS": False, "HAS_FC_BIAS": True, "GATED": True,
                            "ACTIVATION": "geglu", "RECOMPUTE": True, "IEEE": ieee},
             [p, p, p, "*fp32", "*fp32"] + [p] * 7 + ["i32"] * 3),
            (_dweight_kernel,
             {"NORM_B": True, "RMS": False, "HAS_NORM_BIAS": True, "BIAS_GRAD": True, "IEEE": ieee},
             [p, p, "*fp32", "*fp32", p, p, p, p] + ["i32"] * 3),
        )

    return _gemm_specs(variants)
