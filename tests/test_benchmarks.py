"""Smoke tests of the benchmark harness: tiny shapes, few reps, no torch.compile, no timing assertions."""
import json
import math

import os

import pytest
import torch

from fusedlm.benchmarks import harness, layer_norm as ln_bench, memory, run as bench_run
from fusedlm.cli import main as cli_main


def _only(names):
    full = ln_bench.providers

    def providers(case):
        return [p for p in full(case) if p.name in names]
    return providers


def test_run_case_rows_and_markdown(monkeypatch):
    monkeypatch.setattr(ln_bench, "providers", _only({"F.layer_norm", "reference"}))
    case = harness.Case("layer_norm", "layernorm", (64, 32), "float32", "cpu")
    rows, skipped = harness.run_case(ln_bench, case, reps=5, warmup=1, memory=False)

    assert skipped == []
    assert [(r.provider, r.mode) for r in rows] == [
        (p, m) for p in ("F.layer_norm", "reference") for m in harness.MODES]
    for r in rows:
        assert r.error == "", r.error
        assert len(r.times_ms) == 5 and all(t > 0 for t in r.times_ms)
        assert r.min_ms <= r.p20_ms <= r.median_ms <= r.p80_ms <= r.max_ms
        assert r.ratio is not None and r.ratio > 0 and r.gbps > 0
        assert r.max_abs_diff is not None and r.max_abs_diff < harness.CHECK_TOL["float32"]
        # F.layer_norm and the reference both keep at least x and weight for backward
        assert r.saved_bytes >= (64 * 32 + 32) * 4
        assert r.peak_bytes is None  # memory=False
    assert all(r.ratio == 1.0 for r in rows if r.provider == "F.layer_norm")
    json.dumps([r.to_json() for r in rows])  # every number is JSON-serialisable

    info = harness.machine_info("cpu")
    table = bench_run.markdown(ln_bench, rows, {"liger": "not installed"}, info)
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| shape |"))
    body = [line for line in lines[header + 2:] if line.startswith("|")]
    assert len(body) == 6
    cells = body[0].strip("|").split("|")
    assert len(cells) == lines[header].count("|") - 1
    assert [c.strip() for c in cells[:4]] == ["64x32", "float32", "F.layer_norm", "forward"]
    assert math.isfinite(float(cells[4]))
    assert "not run: liger: not installed" in table


def test_failing_provider_is_reported_not_fatal(monkeypatch):
    def broken(t):
        raise RuntimeError("kernel exploded")

    peer = _only({"F.layer_norm"})

    def providers(case):
        return peer(case) + [harness.Provider("broken", broken, "peer")]
    monkeypatch.setattr(ln_bench, "providers", providers)
    case = harness.Case("layer_norm", "layernorm", (8, 16), "float32", "cpu")
    rows, _ = harness.run_case(ln_bench, case, reps=2, warmup=1, memory=False)
    bad = [r for r in rows if r.provider == "broken"]
    assert len(bad) == 3 and all(r.median_ms is None and "kernel exploded" in r.error for r in bad)
    assert all(r.median_ms is not None for r in rows if r.provider == "F.layer_norm")


def test_gpt_benchmark_runs_the_fused_and_reference_models(monkeypatch):
    """The whole-model benchmark on a tiny GPT: the fused model and the reference start from one set
    of weights (their losses agree), and the parameters' gradients are reset between reps."""
    from fusedlm.benchmarks import gpt as gpt_bench

    full = gpt_bench.providers
    monkeypatch.setattr(gpt_bench, "providers", lambda case: [p for p in full(case) if p.kind != "compile"])
    case = harness.Case("gpt", "gpt2", (2, 16, 1, 32, 2, 97), "float32", "cpu")
    inputs = gpt_bench.make_inputs(case)
    params = [t for k, t in inputs.tensors.items() if k.startswith("model:fusedlm[cpu].")]
    assert params and all(p.requires_grad for p in params) and set(params) <= set(inputs.leaves())
    rows, skipped = harness.run_case(gpt_bench, case, modes=gpt_bench.MODES, reps=2, warmup=1, memory=False)
    assert {r.provider for r in rows} == {"fusedlm[cpu]", "reference"}
    assert all(r.error == "" and r.median_ms > 0 for r in rows), [r.error for r in rows]
    assert all(r.max_abs_diff < harness.CHECK_TOL["float32"] for r in rows)
    assert [name for name, _ in skipped] == ["fusedlm[triton]"]


def test_cpu_peak_memory_measures_the_output():
    """F.layer_norm's forward makes y (4 MiB here) and 8 bytes of statistics per row; the child-process
    high-water mark must see that, and not the parent's memory."""
    try:
        memory.CpuMeter()
    except OSError as exc:
        pytest.skip(f"no resettable resident-set high-water mark here: {exc}")
    ballast = torch.ones(64 * 2**20)  # 256 MiB in this process, which the child must not count
    case = harness.Case("layer_norm", "layernorm", (1024, 1024), "float32", "cpu")
    peaks = memory.measure_memory_cpu(ln_bench, case, ["F.layer_norm"])
    del ballast
    fwd = peaks["F.layer_norm"]["forward"]
    y_bytes = 1024 * 1024 * 4
    assert y_bytes <= fwd <= y_bytes + 512 * 1024, peaks
    assert peaks["F.layer_norm"]["forward+backward"] >= fwd


def test_cli_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--full", "--ops", "--dtypes", "--out", "--no-plots", "--repeats", "--device"):
        assert option in out


def test_cli_bench_shapes_keeps_the_named_cases(monkeypatch, tmp_path, capsys):
    """--shapes runs only the preset's cases of those shapes (as the tables write them), and names the
    preset's shapes when none matches."""
    monkeypatch.setattr(ln_bench, "providers", _only({"F.layer_norm"}))
    monkeypatch.setattr(ln_bench, "cases", lambda preset, device, dtypes: [
        harness.Case("layer_norm", "layernorm", shape, "float32", device) for shape in ((8, 16), (12, 32))])
    common = ["bench", "--ops", "layer_norm", "--dtypes", "float32", "--repeats", "2", "--warmup", "1",
              "--no-plots", "--no-memory", "--out", str(tmp_path)]
    assert cli_main(common + ["--shapes", "12x32"]) == 0
    rows = json.loads((tmp_path / "layer_norm.json").read_text())["rows"]
    assert rows and {tuple(r["shape"]) for r in rows} == {(12, 32)}
    assert cli_main(common + ["--shapes", "9x9"]) == 2
    assert "8x16, 12x32" in capsys.readouterr().err


def test_parse_dtypes():
    assert harness.parse_dtypes("fp32, bf16") == ["float32", "bfloat16"]
    with pytest.raises(ValueError, match="--dtypes"):
        harness.parse_dtypes("float8")


def test_profile_lists_each_providers_largest_entries(monkeypatch):
    """The breakdown tool: one line per provider with its per-step total, then its largest operators;
    a failing provider is reported in its line, not fatal."""
    from fusedlm.benchmarks import profile

    def broken(t):
        raise RuntimeError("kernel exploded")

    peer = _only({"F.layer_norm"})
    monkeypatch.setattr(ln_bench, "providers",
                        lambda case: peer(case) + [harness.Provider("fusedlm[x]", broken, "fusedlm")])
    case = harness.Case("layer_norm", "layernorm", (256, 64), "float32", "cpu")
    lines = profile.profile_case(ln_bench, case, warmup=1, steps=2, top=3)
    assert lines[0] == "layer_norm layernorm 256x64 float32 (cpu)"
    head = next(i for i, line in enumerate(lines) if line.startswith("  F.layer_norm: "))
    assert lines[head].endswith("ms self CPU time per step")
    entries = lines[head + 1:head + 4]
    assert len(entries) == 3 and any("native_layer_norm" in e for e in entries)
    assert "  fusedlm[x]: failed: RuntimeError: kernel exploded" in lines


def test_paired_times_both_settings_and_restores_the_environment(monkeypatch, capsys):
    """paired alternates A and B by round and leaves the switches as it found them."""
    from fusedlm.benchmarks import paired

    monkeypatch.setenv("FUSEDLM_LNMLP_BLOCK_ROWS", "7")
    assert paired.main(["--op", "layernorm_mlp", "--dtype", "fp32", "--shape", "40x32x64", "--mode", "backward",
                        "--env", "FUSEDLM_LNMLP_FLIP=0,FUSEDLM_LNMLP_BLOCK_ROWS=16", "--rounds", "3",
                        "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "40x32x64 float32 (cpu), fusedlm[cpu], backward, 3 paired rounds" in out
    assert "B FUSEDLM_LNMLP_FLIP=0,FUSEDLM_LNMLP_BLOCK_ROWS=16: median" in out
    assert "B - A per round: median" in out
    assert os.environ["FUSEDLM_LNMLP_BLOCK_ROWS"] == "7" and "FUSEDLM_LNMLP_FLIP" not in os.environ
    with pytest.raises(ValueError, match="NAME=VALUE"):
        paired.main(["--op", "layernorm_mlp", "--env", "FUSEDLM_LNMLP_FLIP"])


@pytest.mark.triton
def test_attention_tiles_forces_each_candidate(monkeypatch, capsys):
    """The backward-tile sweep times every candidate of the family on the kernel it names (the other
    kernel keeps the library's tile), restores the library's tile choice afterwards, and reports a tile
    that fails instead of stopping. In the interpreter: fp16, a tiny shape, one call per 'timing'."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter variant of this check; on a GPU gpu_check runs the tool itself")
    from fusedlm.benchmarks import attention_tiles
    from fusedlm.kernels import attention as kernels

    monkeypatch.setitem(attention_tiles.CANDIDATES, ("sm90", "dq", 64), [(64, 64, 8, 2), (48, 64, 8, 2)])
    config_of = kernels._config
    seen = []

    def bench(fn, **options):
        seen.append(options)
        fn()
        return 1.0

    rows = attention_tiles.sweep("sm90", 1, 2, 40, "cpu", torch.float16, bench)
    assert kernels._config is config_of
    now = kernels.INTERPRET_BLOCK, kernels.INTERPRET_BLOCK, 4, 1  # the library's tile here, timed first
    expected = [(kernel, d, c) for d in (64, 128) for kernel in ("dkdv", "dq")
                for c in [now] + attention_tiles.CANDIDATES[("sm90", kernel, d)]]
    assert [(kernel, d, c) for kernel, d, c, _, _ in rows] == expected
    failed = [row for row in rows if row[3] is None]
    assert [row[2] for row in failed] == [(48, 64, 8, 2)]  # BLOCK_M 48 is no power of two
    assert failed[0][4].startswith("failed: ")
    assert len(seen) == len(rows) and all(o["return_mode"] == "median" for o in seen)
    assert "dkdv" in capsys.readouterr().out


def test_overhead_table_has_every_op_and_mode(capsys):
    from fusedlm.benchmarks import overhead

    overhead.main(["--reps", "3"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 10
    for op in ("layer_norm", "attention", "layernorm_mlp", "linear_cross_entropy", "lm_head_softmax"):
        assert sum(row.startswith(f"| {op} ") for row in rows) == 2
    from fusedlm.ops import autograd
    assert autograd.EAGER_FAST_PATH  # the library-path provider restores the switch


def test_target_lines_pair_the_reps_by_round():
    """A target line gives the ratio of the medians (the verdict) and the median of the per-round
    ratios; a goal for one fusedlm provider leaves the others alone."""
    case = harness.Case("layernorm_mlp", "gpt2", (4096, 768, 3072), "float32", "cpu")
    # slow rounds (3 to 5) move the medians apart (5 against 25: 0.2x); round by round the op takes 1.25x
    # the floor's time or more (median 0.8x)
    floor = [4.0, 4.0, 20.0, 20.0, 5.0]
    ours = [5.0, 5.0, 25.0, 30.0, 30.0]
    rows = []
    for name, times in (("six GEMMs", floor), ("fusedlm[cpu]", ours), ("fusedlm[cpu,recompute]", ours)):
        row = harness.Row(case, name, "forward+backward", baseline="eager")
        harness._summarize(row, times)
        rows.append(row)
    opmod = type("Op", (), {"target": staticmethod(lambda c: [("forward+backward", "six GEMMs", 0.9, "fusedlm[cpu]")])})
    lines = bench_run.target_lines(opmod, rows)
    assert len(lines) == 1 and lines[0].startswith("target MISSED: gpt2 4096x768x3072 float32 fusedlm[cpu] ")
    assert "0.200x (paired by round: 0.800x) vs six GEMMs (goal >= 0.900x)" in lines[0]
    assert bench_run.paired_ratio([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]) == 1.0
    assert bench_run.paired_ratio([1.0], [1.0, 2.0]) is None


def test_layernorm_mlp_target_notes_judge_recompute_and_saved_bytes():
    """recompute's extra forward+backward time in units of one GEMM (the six GEMMs' forward over two), and
    the bytes saved for backward beyond the parameters as a share of eager's, each against its goal."""
    from fusedlm.benchmarks import layernorm_mlp as mlp_bench

    case = harness.Case("layernorm_mlp", "gpt2", (64, 8, 32), "float32", "cpu")
    params = mlp_bench._param_bytes(case)
    assert params == (2 * 8 * 32 + 32 + 3 * 8) * 4
    rows = []
    # (provider, mode, median ms, bytes saved beyond the parameters)
    for name, mode, ms, saved in (("six GEMMs", "forward", 10.0, 0), ("fusedlm[cpu]", "forward+backward", 40.0, 500),
                                  ("fusedlm[cpu,recompute]", "forward+backward", 46.0, 160),
                                  ("eager", "forward+backward", 50.0, 1000)):
        row = harness.Row(case, name, mode, median_ms=ms, saved_bytes=saved + params)
        rows.append(row)
    lines = mlp_bench.target_notes(rows)
    assert len(lines) == 3
    assert lines[0].startswith("target MISSED: gpt2 64x8x32 float32 fusedlm[cpu,recompute] forward+backward adds 6.0 ms,")
    assert "1.20 of one GEMM's 5.0 ms" in lines[0]
    assert lines[1].startswith("target met: gpt2 64x8x32 float32 fusedlm[cpu] saves 50.00% of eager's bytes")
    assert lines[2].startswith("target MISSED: gpt2 64x8x32 float32 fusedlm[cpu,recompute] saves 16.00%")
    rows[2].median_ms = 44.0  # 0.8 of a GEMM
    assert mlp_bench.target_notes(rows)[0].startswith("target met: ")
