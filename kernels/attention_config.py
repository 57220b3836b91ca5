"""Launch configuration of the Triton attention kernels (kernels/attention.py): the GPU tile tables, the
per-arch-family backward entries and the forward's timed choice among candidate tiles.

A configuration is (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel ("fwd", "dkdv", "dq"), head-dim
bucket (64, 128, 256: BLOCK_D = next_power_of_2(D)) and input width (16-bit or fp32). Every entry is
compiled, causal and not, by kernels/attention.py's static_report_specs() (python -m fusedlm.gpu_report).
Under TRITON_INTERPRET=1 (CPU tensors) every kernel takes INTERPRET_BLOCK x INTERPRET_BLOCK tiles.
"""
from __future__ import annotations

import os
import sys

import torch
import triton

from fusedlm.kernels import gpu_family, triton_version

INTERPRET_BLOCK = 64
_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) per kernel and (head-dim bucket, 16-bit input?),
# one table for sm_80 and sm_90. Every entry compiles with no spill (stack 0) on both archs, checked by
# static_report_specs() + `python -m fusedlm.gpu_report`; 16-bit entries show HGMMA on sm_90a, which needs the
# M side of each dot >= 64 (the forward's and dQ's BLOCK_M, the dK/dV kernel's BLOCK_N).
# Pruned because they spill (stack bytes sm_90a / sm_80, causal; Triton 3.9), and also, non-causal: 16-bit
# forward D128 64x128 8 warps (0 / 192), fp32 dK/dV D128 16x32 8 warps (0 / 8), 16x16 (0 / 24):
#   16-bit forward D64 128x64 4 warps (72 / 176), D128 128x64 8 warps (120 / 168), D256 64x64 4-8 warps (728 / 704);
#   16-bit dK/dV D64 64x128 (0 / 48), D128 64x128 (72 / 5296), 64x64 8 warps (0 / 48), 32x64 (0 / 8);
#   D256 every tile with dK and dV in one launch
#   (64x64 8 warps 408 / 40, 16x64 168 / 8), hence the split of `_dkdv_passes`;
#   fp32 (ieee dots run on FMA, and Triton's FMA dot keeps whole K-slices of both operands in registers,
#   so fp32 tiles are small): forward 64x64 (1544 / 10960), D128 32x32 4 warps (864 / 160), D80 16x16 4 warps
#   (8 / 0);
#   dK/dV D64 32x32 and 32x64 (616 / 0, 656 / 8), D80 16x32 4 warps (32 / 0), D256 16x32 8 warps (0 / 16,
#   the dK half);
#   the dO * O row sums on 4096-element tiles (fp16 D64 and D256: 0 / 24, 48 / 8), hence PRE_TILE.
# With Triton 3.6 (the H200 machine's) also, fp32: forward D64 32x32 at 2 stages (8-16 / 0), hence 1 stage;
# dK/dV D64 16x32 4 warps (0 / 24); dQ D80 32x32 8 warps (0 / 16). Their replacements (forward 32x32 at 1
# stage, dK/dV 32x16, dQ 16x32) compile clean with Triton 3.6 and 3.9 on both archs.
_GPU_FWD = {
    (64, True): (128, 64, 8, 3), (128, True): (64, 64, 8, 2), (256, True): (64, 32, 8, 2),
    (64, False): (32, 32, 4, 1), (128, False): (16, 16, 8, 1), (256, False): (16, 16, 4, 1),
}
_GPU_DKDV = {
    (64, True): (32, 128, 8, 2), (128, True): (16, 64, 8, 1), (256, True): (16, 64, 8, 1),
    (64, False): (32, 16, 4, 1), (128, False): (16, 64, 8, 1), (256, False): (16, 32, 4, 1),
}
_GPU_DQ = {
    (64, True): (64, 64, 8, 2), (128, True): (64, 64, 8, 2), (256, True): (64, 32, 8, 1),
    (64, False): (32, 32, 4, 2), (128, False): (16, 32, 8, 1), (256, False): (16, 16, 4, 1),
}
_TABLES = {"fwd": _GPU_FWD, "dkdv": _GPU_DKDV, "dq": _GPU_DQ}

# Backward entries that differ by arch family: (family, kernel, head-dim bucket, 16-bit?) -> configuration,
# looked up before _TABLES. Static, not timed as the forward's are: a dK/dV tile sets the order of the
# sums over query blocks, so a measured choice could give different bits in two processes. Chosen from
# benchmarks/attention_tiles.py on the H200 (gpu_check of 2026-11-30, Triton 3.6, bf16 causal B=4 H=16
# N=4096; "x" = the whole backward's speed-up over the entry it replaced), and checked with the report
# for the family's arch under Triton 3.6 and 3.9 (stack bytes there):
#   sm90 16-bit D64 dK/dV 64 x 128, 8 warps, 2 stages: 1.11x over 32 x 128; no spills with either.
#   sm90 16-bit D128 dK/dV 64 x 64, 8 warps: 2 stages 1.24x and 1 stage 1.31x over 32 x 64 (which
#     compiles clean with both). Triton 3.9 compiles the 2-stage tile clean and spills 48 bytes at 1 stage;
#     Triton 3.6 spills 8 bytes at 2 stages and 16 at 1. Measured beats the proxy: with 3.6 (the H200
#     machine's release, _GPU_FAMILY_BEFORE_3_9) the 1-stage tile, the fastest despite its 16 bytes;
#     with 3.9 the 2-stage one, clean. 32 x 128 spills 232-368 bytes.
#   sm90 16-bit dQ D64 128 x 32 and D128 128 x 64, 8 warps, 2 stages: 128-row tiles give each warpgroup
#     64 rows (as the forward's); D128 128 x 64 is 1.09x over 128 x 32; no spills with either version.
#   sm80 16-bit D64 dK/dV 32 x 128 at 1 stage: the shared 2-stage entry spills 16 bytes on sm_80 with 3.6.
_GPU_FAMILY = {
    ("sm90", "dkdv", 64, True): (64, 128, 8, 2),
    ("sm90", "dkdv", 128, True): (64, 64, 8, 2),
    ("sm90", "dq", 64, True): (128, 32, 8, 2),
    ("sm90", "dq", 128, True): (128, 64, 8, 2),
    ("sm80", "dkdv", 64, True): (32, 128, 8, 1),
}
# Entries that depend on the Triton release. sm90 16-bit forward at D = 256: Triton 3.6 spills 120-160
# bytes on sm_90a with the shared 64 x 32 tile (and with every 64 x 16 / 64 x 32 / 128 x 32 tile tried);
# 64 x 64 at 8 warps and 1 stage is its only clean one, which Triton 3.9 in turn spills (64-72 bytes) while
# it compiles 64 x 32 clean. Releases between were not checked: they take the 3.6 entry.
_GPU_FAMILY_BEFORE_3_9 = {("sm90", "fwd", 256, True): (64, 64, 8, 1), ("sm90", "dkdv", 128, True): (64, 64, 8, 1)}
if triton_version() < (3, 9):
    _GPU_FAMILY.update(_GPU_FAMILY_BEFORE_3_9)

# The forward's measured choices: (arch family, head-dim bucket, 16-bit?) -> candidates, each compiled
# without spills for its arch (the "archs" of its report spec) by Triton 3.6 and 3.9. On the first call
# of a (device, dtype, bucket, causal, Nq, Nk, B * Hq) class (powers of two) each is timed on the call's own
# inputs and the fastest is kept for the process (`_fwd_config`). Why at 16-bit D = 128: the H200 run
# of 2026-11-29 had this forward at 0.81x SDPA's flash backend with 64 x 128 tiles, and at D = 64, with
# 128-row tiles, 1.35x; a 64-row tile at 8 warps splits each score row across two warpgroups. The
# 128 x 64 tile spills on sm_90a with Triton 3.9 (120 bytes) and 128 x 32 does not.
_GPU_FWD_CANDIDATES = {
    ("sm90", 128, True): ((128, 32, 8, 3), (64, 128, 8, 3), (64, 64, 8, 2)),
    ("sm80", 128, True): ((64, 64, 8, 2), (64, 32, 4, 3)),
}
_FWD_CHOICE: dict = {}  # the class key of `_fwd_config` -> the chosen configuration


def _bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _gpu_config(block_d: int, dtype_name: str, kernel: str) -> tuple[int, int, int, int]:
    return _TABLES[kernel][(_bucket(block_d), dtype_name != "fp32")]


def _dkdv_passes(block_d: int) -> tuple:
    """(DO_DK, DO_DV, first output column, OUT_COLS) per launch of the dK/dV kernel: one launch for both, or at
    D = 256 three: dV, then dK in two column halves (also under the interpreter, so the tests cover it).
    P is recomputed three times, but dK and dV together spill, and so does a whole dK (56 bytes on sm_90a
    at 16 x 64, 8 warps)."""
    if block_d > 128:
        half = block_d // 2
        return (False, True, 0, block_d), (True, False, 0, half), (True, False, half, half)
    return ((True, True, 0, block_d),)


def _config(q: torch.Tensor, block_d: int, kernel: str) -> tuple[int, int, int, int]:
    if q.is_cuda:
        family = _GPU_FAMILY.get((gpu_family(q.device.index or 0), kernel, _bucket(block_d), q.dtype != torch.float32))
        return family or _gpu_config(block_d, _TL_DTYPE[q.dtype], kernel)
    return INTERPRET_BLOCK, INTERPRET_BLOCK, 4, 1


def _pow2_class(n: int, most: int) -> int:
    return triton.next_power_of_2(max(1, min(n, most)))


def _fwd_config(q: torch.Tensor, n_k: int, block_d: int, causal: bool, launch) -> tuple[int, int, int, int]:
    """The forward's (BLOCK_M, BLOCK_N, warps, stages). With several candidates for this GPU (see
    _GPU_FWD_CANDIDATES) each runs `launch(config)` under triton.testing.do_bench once per class of
    shapes and the fastest (median) is kept; FUSEDLM_LOG_TUNING=1 prints the times. While a CUDA graph
    is being captured nothing is timed: the first candidate runs. The choice can differ between
    processes when candidates time alike, and with it the forward's last bits."""
    if not q.is_cuda:
        return _config(q, block_d, "fwd")
    candidates = _GPU_FWD_CANDIDATES.get((gpu_family(q.device.index or 0), _bucket(block_d), q.dtype != torch.float32))
    if candidates is None:
        return _config(q, block_d, "fwd")
    b, hq, n_q, _ = q.shape
    key = (q.device.index, q.dtype, _bucket(block_d), causal, _pow2_class(n_q, 16384), _pow2_class(n_k, 16384),
           _pow2_class(b * hq, 1024))
    choice = _FWD_CHOICE.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return candidates[0]
        times = [triton.testing.do_bench(lambda c=c: launch(c), warmup=5, rep=20, return_mode="median")
                 for c in candidates]
        choice = candidates[min(range(len(candidates)), key=times.__getitem__)]
        _FWD_CHOICE[key] = choice
        if os.environ.get("FUSEDLM_LOG_TUNING"):
            timing = ", ".join(f"{c}: {t:.3f} ms" for c, t in zip(candidates, times))
            print(f"fusedlm attention forward {key[1:]} (BLOCK_M, BLOCK_N, warps, stages): {timing} -> {choice}",
                  file=sys.stderr)
    return choice
