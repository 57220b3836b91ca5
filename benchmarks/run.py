"""The benchmark runner: `fusedlm bench [--full]`, also `python -m fusedlm.benchmarks.run`.

For every op (one module per op in this package) and every case of the preset, runs the
harness (harness.py) and writes:
    stdout               a markdown table per op
    OUT/<op>.json        every raw number, the settings and the machine (OUT/<op>.cuda.json on a GPU)
    OUT/<op>.png         median time per provider, p20-p80 as error bars (needs matplotlib)
    OUT/latest.md        all tables of this run, with the command that made them
OUT defaults to benchmarks/results in the source tree when writable, else ./fusedlm-bench-results.
The JSON is rewritten after every case, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import OPS, load_op
from .harness import MODES, machine_info, parse_dtypes, run_case

DEFAULT_REPEATS = {("cpu", "quick"): 30, ("cpu", "full"): 20, ("cuda", "quick"): 100, ("cuda", "full"): 100}
MiB = 2**20


def default_out_dir() -> Path:
    here = Path(__file__).resolve().parent
    if (here.parent / "setup.py").is_file():  # a source tree (editable install or a checkout)
        results = here / "results"
        if os.access(results if results.is_dir() else here, os.W_OK):
            return results
    return Path.cwd() / "fusedlm-bench-results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="more shapes and variants (long); default: the quick preset")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="run the CPU presets (default) or the GPU presets on the current CUDA device")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated ops to run (default: {','.join(OPS)})")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated dtypes: float32, bfloat16, float16 (default: float32,bfloat16)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for JSON, PNG and latest.md (default: benchmarks/results in the source tree "
                        "if writable, else ./fusedlm-bench-results)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (faster)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed reps per provider and mode (default: 30 quick / 20 full on CPU; "
                        "on a GPU the reps of the CUDA-event timer, do_bench picks its own)")
    p.add_argument("--skip", default="",
                   help="comma-separated fragments of provider names to leave out, e.g. 'compile,SDPA[math]'")
    p.add_argument("--warmup", type=int, default=3, help="untimed forward+backward runs per provider (default 3)")
    p.add_argument("--shapes", default="",
                   help="comma-separated case shapes to keep, as the tables write them (e.g. 8192x768x50304); "
                        "default: every shape of the preset")


# --- markdown --------------------------------------------------------------------------------

def _fmt(x, spec: str, none: str = "") -> str:
    return none if x is None else format(x, spec)


def markdown(opmod, rows: list, skipped: dict, info: dict) -> str:
    lines = [f"## {opmod.TITLE}", ""]
    lines.append(f"{info['device']}: {info['device_name']}, {info['threads']} threads; torch {info['torch']}, "
                 f"triton {info['triton']}; load average {info['loadavg']} at the start; {info['date']}")
    for variant in dict.fromkeys(r.case.variant for r in rows):
        v = opmod.VARIANTS[variant]
        flops_col = ("TFLOP/s | ", "---:|") if hasattr(opmod, "flops") else ("", "")
        lines += ["", f"### {variant}: {v.title}; baseline {v.baseline}", "",
                  "| shape | dtype | provider | mode | median ms | p20-p80 ms | vs base | GB/s | "
                  f"{flops_col[0]}peak MB | saved MB |",
                  f"|---|---|---|---|---:|---:|---:|---:|{flops_col[1]}---:|---:|"]
        vrows = [r for r in rows if r.case.variant == variant]
        case_index = {c: i for i, c in enumerate(dict.fromkeys((r.case.label, r.case.dtype) for r in vrows))}
        for r in sorted(vrows, key=lambda r: (case_index[(r.case.label, r.case.dtype)], MODES.index(r.mode))):
            spread = f"{r.p20_ms:.3f}-{r.p80_ms:.3f}" if r.median_ms is not None else ""
            median = _fmt(r.median_ms, ".3f", "failed" if r.error else "")
            ratio = _fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else "")
            flag = " (!)" if r.error else ""
            lines.append(f"| {r.case.label} | {r.case.dtype} | {r.provider}{flag} | {r.mode} | {median} | {spread} | "
                         f"{ratio} | {_fmt(r.gbps, '.1f')} | "
                         + (f"{_fmt(r.tflops, '.3f')} | " if flops_col[0] else "")
                         + f"{_fmt(_mb(r.peak_bytes), '.1f')} | "
                         f"{_fmt(_mb(r.saved_bytes), '.1f')} |")
    lines += ["", "Modes: forward with autograd recording (a training step's forward); backward alone (its forward "
              "runs untimed); forward+backward. vs base: the baseline's median / this median "
              "(above 1: faster than the baseline). "
              "GB/s: the op's minimum traffic over the median. TFLOP/s (where the op counts them): its FLOPs over "
              "the median. peak MB: the highest memory in use during the mode "
              "above what existed when it began (CPU: resident set in a fresh child process; GPU: "
              "max_memory_allocated). saved MB: unique storages autograd saves in forward for backward, "
              "inputs and parameters included."]
    compiles = sorted({(r.case.variant, r.case.label, r.case.dtype, r.first_call_s) for r in rows
                       if r.provider.startswith("compile(") and r.first_call_s is not None})
    if compiles:
        lines += ["", "torch.compile, first forward+backward (compile included, excluded from the timings): "
                     + ", ".join(f"{v} {s} {d} {t:.1f} s" for v, s, d, t in compiles) + "."]
    lines.append("")
    lines += [f"- {t}" for t in target_lines(opmod, rows)]
    lines += [f"- {t}" for t in getattr(opmod, "target_notes", lambda rows: [])(rows)]  # goals that are no speed ratio
    errors = sorted({(r.provider, r.case.variant, r.case.label, r.case.dtype, r.error) for r in rows if r.error})
    for prov, variant, label, dtype, err in errors:
        lines.append(f"- (!) {prov}, {variant} {label} {dtype}: {err}")
    for name, why in sorted(skipped.items()):
        lines.append(f"- not run: {name}: {why}")
    return "\n".join(lines) + "\n"


def _mb(n):
    return None if n is None else n / MiB


def key_ratios(rows: list) -> list:
    """(case text, provider, ratio) of every fusedlm backend in forward+backward."""
    return [(f"{r.case.variant} {r.case.label} {r.case.dtype}", r.provider, r.ratio) for r in rows
            if r.provider.startswith("fusedlm[") and r.mode == "forward+backward" and r.ratio is not None]


def paired_ratio(this: list, other: list) -> float | None:
    """The median over reps of other_i / this_i: rep i of two providers ran in the same round of the
    interleaved CPU timing, so a slow spell of the machine that spans a round cancels out (the ratio
    of the two medians does not pair them). None where the reps are not paired (GPU timers)."""
    if not this or len(this) != len(other):
        return None
    return statistics.median(o / t for o, t in zip(other, this))


def target_lines(opmod, rows: list) -> list:
    """One line per goal of a fusedlm row: target(case) is the least forward+backward speed-up over the
    baseline (a number), or a list of (mode, provider, least speed-up[, the fusedlm provider it is for])
    goals; each says met or missed, by the ratio of the medians, and gives the paired ratio too."""
    target = getattr(opmod, "target", lambda case: None)
    by_key = {(r.case, r.provider, r.mode): r for r in rows}
    lines = []
    for r in rows:
        goals = target(r.case) if r.provider.startswith("fusedlm[") else None
        if goals is None:
            continue
        if not isinstance(goals, (list, tuple)):
            goals = [("forward+backward", r.baseline, goals)]
        for mode, against, goal, *only in goals:
            if mode != r.mode or (only and r.provider != only[0]):
                continue
            other = by_key.get((r.case, against, mode))
            ratio = other.median_ms / r.median_ms if other and other.median_ms and r.median_ms else None
            got = "failed" if ratio is None else f"{ratio:.3f}x"
            paired = paired_ratio(r.times_ms, other.times_ms) if ratio is not None else None
            got += "" if paired is None else f" (paired by round: {paired:.3f}x)"
            verdict = "met" if ratio is not None and ratio >= goal else "MISSED"
            lines.append(f"target {verdict}: {r.case.variant} {r.case.label} {r.case.dtype} {r.provider} {mode} "
                         f"{got} vs {against} (goal >= {goal:.3f}x)")
    return lines


# --- JSON and plots --------------------------------------------------------------------------

def write_json(path: Path, opmod, rows: list, skipped: dict, info: dict, settings: dict, complete: bool) -> None:
    doc = {"op": opmod.OP, "complete": complete, "machine": info, "settings": settings,
           "not_run": skipped, "rows": [r.to_json() for r in rows]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def plot(path: Path, opmod, rows: list, info: dict) -> str | None:
    """One subplot per (variant, dtype): bars per provider; groups are the modes (one shape) or the
    shapes in the op's last mode, forward+backward unless it times fewer (several). Returns a note
    when nothing was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "matplotlib is not installed: no plots (pip install matplotlib)"
    variants = list(dict.fromkeys(r.case.variant for r in rows))
    dtypes = list(dict.fromkeys(r.case.dtype for r in rows))
    providers = list(dict.fromkeys(r.provider for r in rows if r.median_ms is not None))
    if not providers:
        return "no timings to plot"
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(len(variants), len(dtypes), squeeze=False,
                             figsize=(max(6, 5 * len(dtypes)), 3.6 * len(variants)))
    for i, variant in enumerate(variants):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            sel = [r for r in rows if r.case.variant == variant and r.case.dtype == dtype and r.median_ms is not None]
            shapes = list(dict.fromkeys(r.case.label for r in sel))
            modes = getattr(opmod, "MODES", MODES)  # a forward-only op plots its forward per shape
            groups = [(shapes[0], m) for m in modes] if len(shapes) == 1 else [(s, modes[-1]) for s in shapes]
            here = [p for p in providers if any(r.provider == p for r in sel)]
            width = 0.8 / max(1, len(here))
            for k, prov in enumerate(here):
                xs, ys, lo, hi = [], [], [], []
                for g, (shape, mode) in enumerate(groups):
                    r = next((r for r in sel if r.provider == prov and r.case.label == shape and r.mode == mode), None)
                    if r is not None:
                        xs.append(g + (k - (len(here) - 1) / 2) * width)
                        ys.append(r.median_ms)
                        lo.append(r.median_ms - r.p20_ms)
                        hi.append(r.p80_ms - r.median_ms)
                ax.bar(xs, ys, width, yerr=[lo, hi], label=prov, capsize=2, color=colors[providers.index(prov) % 10])
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([m if len(shapes) == 1 else s for s, m in groups], fontsize=8)
            ax.set_yscale("log")  # the eager reference can be 10-100x slower than the rest
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            title = shapes[0] if len(shapes) == 1 else modes[-1]
            ax.set_title(f"{variant}, {dtype}, {title}", fontsize=9)
            ax.set_ylabel("ms (median, p20-p80)", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(f"{opmod.OP} on {info['device_name']} ({info['threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- the run ---------------------------------------------------------------------------------

def run(args: argparse.Namespace, argv: list | None = None) -> int:
    t_start = time.perf_counter()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        print(f"bench: --ops takes {', '.join(OPS)}, got {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        dtypes = parse_dtypes(args.dtypes)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda needs a CUDA device, and none is visible", file=sys.stderr)
        return 2
    preset = "full" if args.full else "quick"
    reps = args.repeats or DEFAULT_REPEATS[(args.device, preset)]
    out = args.out or default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".cuda" if args.device == "cuda" else ""
    info = machine_info(args.device)
    command = "fusedlm bench" + ("" if argv is None else " " + " ".join(argv))
    # the ops whose module sets its own count for this preset (GEMM-bound ops whose reps take seconds)
    own_reps = {} if args.repeats else {
        op: n for op in ops if (n := getattr(load_op(op), "REPEATS", {}).get((args.device, preset))) is not None}
    reps_text = f"{reps} reps" + ("".join(f", {op} {n}" for op, n in own_reps.items()) if own_reps else "")
    settings = {"command": command.strip(), "preset": preset, "reps": reps, "warmup": args.warmup,
                "modes": list(MODES), "memory": not args.no_memory, "dtypes": dtypes,
                "skip": args.skip, "shapes": args.shapes}
    shapes = {x.strip() for x in args.shapes.split(",") if x.strip()}
    print(f"# fusedlm bench, {preset} preset on {args.device}: {info['device_name']}")
    print(f"torch {info['torch']}, triton {info['triton']}, fusedlm {info['fusedlm']}, "
          f"torch.get_num_threads() = {info['threads']}, load average {info['loadavg']}, backends {info['backends']}")
    print(f"{reps_text} after {args.warmup} warm-up runs; results in {out}\n", flush=True)

    sections = []
    for op in ops:
        opmod = load_op(op)
        op_reps = args.repeats or getattr(opmod, "REPEATS", {}).get((args.device, preset), reps)
        rows, skipped = [], {}
        json_path = out / f"{op}{suffix}.json"
        op_cases = opmod.cases(preset, args.device, dtypes)
        if shapes:
            kept = [c for c in op_cases if c.label in shapes]
            if not kept:
                print(f"bench: --shapes {args.shapes} matches no {op} case of the {preset} preset on {args.device} "
                      f"(its shapes: {', '.join(dict.fromkeys(c.label for c in op_cases))})", file=sys.stderr)
                return 2
            op_cases = kept
        for case in op_cases:
            t0 = time.perf_counter()
            case_rows, case_skipped = run_case(opmod, case, modes=getattr(opmod, "MODES", MODES), reps=op_reps,
                                               warmup=args.warmup, memory=not args.no_memory,
                                               skip=tuple(filter(None, args.skip.split(","))))
            rows += case_rows
            skipped.update(dict(case_skipped))
            print(f"bench: {op} {case.variant} {case.label} {case.dtype}: {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
            write_json(json_path, opmod, rows, skipped, info, settings, complete=False)
        write_json(json_path, opmod, rows, skipped, info, settings, complete=True)
        table = markdown(opmod, rows, skipped, info)
        print(table, flush=True)
        sections.append(table)
        if not args.no_plots:
            note = plot(out / f"{op}{suffix}.png", opmod, rows, info)
            if note:
                print(f"bench: {note}")
        ratios = key_ratios(rows)
        if ratios:
            print("fusedlm vs baseline, forward+backward: "
                  + "; ".join(f"{c} {p} {r:.2f}x" for c, p, r in ratios) + "\n")
    elapsed = time.perf_counter() - t_start
    header = (f"# fusedlm benchmarks ({args.device})\n\nMade by `{settings['command']}` in {elapsed:.0f} s "
              f"({preset} preset, {reps_text} after {args.warmup} warm-up runs, medians with p20-p80).\n")
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if args.device == "cpu" and max(info["loadavg"] or 0.0, load_end) > 0.5 * info["threads"]:
        busy = (f"The machine was busy (load average {info['loadavg']} at the start, {load_end:.2f} at the end, "
                f"{info['threads']} threads): other work shared the cores, so these timings are slow and noisy; "
                "the ratios of interleaved providers hold better than the absolute times. Rerun on a quiet machine.")
        print(f"bench: {busy}")
        header += "\n" + busy + "\n"
    (out / f"latest{suffix}.md").write_text(header + "\n" + "\n".join(sections))
    print(f"bench: done in {elapsed:.0f} s; wrote {out}")
    return 0


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.benchmarks.run", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
