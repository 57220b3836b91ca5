"""The GPU static report's checker (fusedlm.gpu_report) on small kernels, compiled for sm_90a and
sm_80 without a GPU: a planted register spill makes `python -m fusedlm.gpu_report` exit 1 with a
message that names it, an fp16 tl.dot shows HGMMA on sm_90a and HMMA on sm_80, a plain kernel
passes, and the occupancy model gives known answers.

The Triton kernels below are compiled in a child process run as CI runs the report
(`--specs` this file, TRITON_INTERPRET=0): under TRITON_INTERPRET=1, how `make test` runs, even
tl.max and tl.sum are interpreter objects that cannot be compiled for a GPU target.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fusedlm import gpu_report
from fusedlm.gpu_report import ARCHS, Record, check, occupancy_warps

SM90, SM80 = ARCHS
CUOBJDUMP = gpu_report.find_cuobjdump()

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_tools = pytest.mark.skipif(
    not HAS_TRITON or CUOBJDUMP is None,
    reason="needs the triton package" if not HAS_TRITON else "needs cuobjdump (Triton's wheel or $CUDA_HOME/bin)",
)


def _spilling_softmax(X_ptr, Y_ptr, BLOCK_SIZE: tl.constexpr):
    # One warp holds BLOCK_SIZE / 32 = 256 fp32 values per thread live across two reductions:
    # more than the 255 registers a thread can have, so ptxas spills to the stack.
    offs = tl.arange(0, BLOCK_SIZE)
    x = tl.load(X_ptr + offs)
    x = x - tl.max(x, axis=0)
    tl.store(Y_ptr + offs, x / tl.sum(tl.exp(x), axis=0))


def _scale(X_ptr, Y_ptr, n, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    tl.store(Y_ptr + offs, tl.load(X_ptr + offs, mask=mask) * 2.0, mask=mask)


def _tile_dot(A_ptr, B_ptr, C_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C (M, N) fp32 = A (M, K) fp16 @ B (K, N) fp16, one tile, row-major.
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    a = tl.load(A_ptr + rm[:, None] * BLOCK_K + rk[None, :])
    b = tl.load(B_ptr + rk[:, None] * BLOCK_N + rn[None, :])
    tl.store(C_ptr + rm[:, None] * BLOCK_N + rn[None, :], tl.dot(a, b))


def _spec(fn, signature, constexprs, num_warps, dtype, **extra):
    config = ", ".join(f"{k}={v}" for k, v in constexprs.items()) + f", num_warps={num_warps}"
    return {"kernel": fn.__name__, "fn": triton.jit(fn), "signature": signature, "constexprs": constexprs,
            "num_warps": num_warps, "num_stages": 1, "dtype": dtype, "config": config, **extra}


def static_report_specs():
    """What the child report compiles; the same contract as every kernels/*.py module."""
    return [
        _spec(_spilling_softmax, {"X_ptr": "*fp32", "Y_ptr": "*fp32"}, {"BLOCK_SIZE": 8192}, 1, "fp32"),
        _spec(_spilling_softmax, {"X_ptr": "*fp32", "Y_ptr": "*fp32"}, {"BLOCK_SIZE": 8192}, 1, "fp16",
              pruned="spills at one warp"),
        _spec(_scale, {"X_ptr": "*fp32", "Y_ptr": "*fp32", "n": "i32"}, {"BLOCK_SIZE": 1024}, 4, "fp32"),
        # a configuration only sm_80 launches (a family's own table entry): compiled for sm_80 alone
        _spec(_scale, {"X_ptr": "*fp16", "Y_ptr": "*fp16", "n": "i32"}, {"BLOCK_SIZE": 1024}, 4, "fp16",
              archs=("sm_80",)),
        _spec(_tile_dot, {"A_ptr": "*fp16", "B_ptr": "*fp16", "C_ptr": "*fp32"},
              {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, 4, "fp16", uses_tensor_cores=True),
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run the report CLI on this file's specs: (exit code, stderr, {(kernel, dtype, arch): Record}, markdown)."""
    out = tmp_path_factory.mktemp("gpu_report")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-m", "fusedlm.gpu_report", "--specs", __file__, "--no-cuda",
                           "--root", str(out), "--out-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert (out / "gpu_static.json").is_file(), done.stderr[-2000:]
    records = {(r["kernel"], r["dtype"], r["arch"]): Record(**r) for r in json.loads((out / "gpu_static.json").read_text())}
    return done.returncode, done.stderr, records, (out / "gpu_static.md").read_text()


@needs_tools
def test_planted_spill_fails_the_report(report):
    code, stderr, records, _ = report
    assert code == 1, stderr[-2000:]
    fails = [line for line in stderr.splitlines() if "FAIL" in line]
    assert len(fails) == 2, fails  # the unpruned spill, on each arch; nothing else fails
    for arch, line in zip(("sm_90a", "sm_80"), fails):
        record = records[("_spilling_softmax", "fp32", arch)]
        assert record.stack_bytes > 0, record
        for part in ("_spilling_softmax [BLOCK_SIZE=8192, num_warps=1] fp32", arch, f"stack {record.stack_bytes} bytes"):
            assert part in line, f"{part!r} not in {line!r}"


@needs_tools
def test_pruned_configuration_is_shown_not_failed(report):
    _, _, records, md = report
    pruned = records[("_spilling_softmax", "fp16", "sm_90a")]
    assert pruned.pruned == "spills at one warp" and pruned.stack_bytes > 0
    assert check([pruned]) == []
    assert "pruned: _spilling_softmax [BLOCK_SIZE=8192, num_warps=1] fp16" in md


@needs_tools
def test_plain_kernel_passes_on_both_archs(report):
    _, _, records, _ = report
    plain = [records[("_scale", "fp32", arch.name)] for arch in ARCHS]
    for r in plain:
        assert r.error is None and r.stack_bytes == 0 and 0 < r.registers < 128 and r.threads == 128, r
        assert r.tensor_core == {} and 0 < r.occupancy_warps <= 64, r
    assert check(plain) == []
    # The same kernel claimed to multiply 16-bit matrices fails: it shows no tensor-core op.
    for r in plain:
        r.uses_tensor_cores = True
    failures = check(plain)
    assert len(failures) == 2
    assert "_scale" in failures[0] and "sm_90a" in failures[0] and "0 HGMMA" in failures[0]
    assert "sm_80" in failures[1] and "0 HMMA" in failures[1]


@needs_tools
def test_spec_with_archs_compiles_for_those_only(report):
    _, _, records, _ = report
    assert records[("_scale", "fp16", "sm_80")].error is None
    assert ("_scale", "fp16", "sm_90a") not in records
    assert ("_scale", "fp32", "sm_90a") in records  # without "archs": both


@needs_tools
def test_fp16_dot_shows_hgmma_on_sm90a_and_hmma_on_sm80(report):
    _, _, records, md = report
    sm90, sm80 = records[("_tile_dot", "fp16", "sm_90a")], records[("_tile_dot", "fp16", "sm_80")]
    assert sm90.tensor_core.get("HGMMA", 0) > 0, sm90.tensor_core
    assert sm80.tensor_core.get("HMMA", 0) > 0 and "HGMMA" not in sm80.tensor_core, sm80.tensor_core
    # Triton stages the wgmma operands (two 64x64 fp16 tiles) in dynamic shared memory.
    assert sm90.shared_bytes >= 2 * 64 * 64 * 2
    assert check([sm90, sm80]) == []
    assert re.search(r"\| _tile_dot \| triton \| sm_90a \| fp16 \|.*HGMMA \d+", md)


@pytest.mark.skipif(shutil.which("nvcc") is None and not (gpu_report._cuda_home() / "bin" / "nvcc").is_file(),
                    reason="needs nvcc (set CUDA_HOME)")
@pytest.mark.skipif(CUOBJDUMP is None, reason="needs cuobjdump (Triton's wheel or $CUDA_HOME/bin)")
def test_cuda_kernel_names_launch_bounds_and_marker(tmp_path):
    source = tmp_path / "csrc" / "cuda" / "scale.cu"
    source.parent.mkdir(parents=True)
    source.write_text(
        "// gpu_report: uses_tensor_cores scale_rows\n"
        "namespace demo {\n"
        "template <typename T, int kThreads>\n"
        "__global__ void __launch_bounds__(kThreads) scale_rows(const T* x, T* y, int n) {\n"
        "  int i = blockIdx.x * kThreads + threadIdx.x;\n"
        "  if (i < n) y[i] = x[i] * T(2);\n"
        "}\n"
        "template __global__ void scale_rows<float, 256>(const float*, float*, int);\n"
        "}\n"
    )
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = gpu_report.start_cuda_builds(pool, gpu_report.find_nvcc(), tmp_path, [source], ARCHS, str(tmp_path))
        records = gpu_report.cuda_records(tmp_path, jobs, CUOBJDUMP)
    assert [(r.kernel, r.arch, r.config, r.dtype, r.threads) for r in records] == [
        ("scale_rows", "sm_90a", "<float, 256>", "fp32", 256),
        ("scale_rows", "sm_80", "<float, 256>", "fp32", 256),
    ]
    assert all(r.error is None and r.stack_bytes == 0 and r.occupancy_warps == 64 for r in records)
    # Marked as a 16-bit matrix multiply but it is not one: the check says so per arch.
    failures = check(records)
    assert len(failures) == 2 and "scale_rows [<float, 256>] fp32 sm_90a" in failures[0], failures


def test_occupancy_model():
    # 255 registers -> 8192 per warp, 2 warps per sub-partition: one 8-warp block per SM.
    assert occupancy_warps(SM90, 256, 255, 0) == 8
    # Few registers, 4-warp blocks: the 64-warp limit binds (16 blocks).
    assert occupancy_warps(SM90, 128, 32, 0) == 64
    # 168 registers -> 5376 per warp, 3 per sub-partition: 12 warps, three 4-warp blocks.
    assert occupancy_warps(SM90, 128, 168, 0) == 12
    # 100 KiB of shared memory (+1 KiB reserved): 2 blocks on an H200, 1 on an A100.
    assert occupancy_warps(SM90, 128, 32, 100 * 1024) == 8
    assert occupancy_warps(SM80, 128, 32, 100 * 1024) == 4
    # One-warp blocks: the 32-blocks-per-SM cap binds.
    assert occupancy_warps(SM90, 32, 16, 0) == 32
    assert occupancy_warps(SM90, None, 32, 0) is None


def test_shared_memory_over_the_block_limit_fails():
    records = [
        Record(kernel="k", backend="triton", arch=arch.name, config="BLOCK=1", dtype="bf16", registers=32,
               stack_bytes=0, shared_bytes=arch.smem_per_block + 1)
        for arch in ARCHS
    ]
    failures = check(records)
    assert failures == [
        f"k [BLOCK=1] bf16 sm_90a: shared memory {227 * 1024 + 1} bytes per block > {227 * 1024} limit",
        f"k [BLOCK=1] bf16 sm_80: shared memory {163 * 1024 + 1} bytes per block > {163 * 1024} limit",
    ]
    records[0].shared_bytes = 227 * 1024
    assert len(check(records)) == 1


def test_marker_with_an_op_holds_every_arch_to_that_op():
    """`uses_tensor_cores(HMMA) NAME`: an mma.sync kernel shows HMMA on sm_90a too, and passes there."""
    text = ("// gpu_report: uses_tensor_cores(HMMA) fwd_kernel, bwd_kernel\n"
            "// gpu_report: uses_tensor_cores plain_kernel\n")
    marked = {n.strip(): m.group(1) for m in gpu_report.MARKER.finditer(text) for n in m.group(2).split(",")}
    assert marked == {"fwd_kernel": "HMMA", "bwd_kernel": "HMMA", "plain_kernel": None}

    def record(arch, op, counts):
        return Record(kernel="fwd_kernel", backend="cuda", arch=arch.name, config="-", dtype="fp16", registers=128,
                      stack_bytes=0, shared_bytes=0, tensor_core=counts, uses_tensor_cores=True, tensor_core_op=op)

    assert check([record(SM90, "HMMA", {"HMMA": 8}), record(SM80, "HMMA", {"HMMA": 8})]) == []
    # Without the op, sm_90a wants HGMMA; with it, an HGMMA-only kernel fails (it is not the mma.sync one).
    assert "0 HGMMA" in check([record(SM90, None, {"HMMA": 8})])[0]
    assert "0 HMMA" in check([record(SM90, "HMMA", {"HGMMA": 8})])[0]
