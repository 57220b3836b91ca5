"""Where one forward+backward spends its time, per provider: the breakdown behind a benchmark ratio.

    python -m fusedlm.benchmarks.profile [--device cpu|cuda] [--ops OPS] [--dtypes DTYPES] [--top N]

For the first case of each op's quick preset in each dtype (the shape its table leads with), every
fusedlm provider and the baseline run `--warmup` untimed steps, then `--steps` steps under
torch.profiler. Printed per provider: the time per step under the profiler and the `--top` entries
that take most of it, per step -- on a GPU the CUDA kernels by device time (GEMMs, element-wise
kernels, memsets), on the CPU the operators by self CPU time (ATen GEMMs, the fusedlm kernels).
The profiler adds overhead: use the benchmark suite for the times, this for their shares.
`benchmarks/gpu_check.sh` runs it for the ops that miss their GPU targets.
"""
from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from . import OPS, load_op
from .harness import _fwd_bwd, _sync, parse_dtypes, ready_providers


def _self_device_us(event) -> float:
    # torch >= 2.4 names it self_device_time_total; older ones self_cuda_time_total
    if hasattr(event, "self_device_time_total"):
        return event.self_device_time_total
    return event.self_cuda_time_total


def _top(prof, device: str, steps: int, top: int) -> tuple[float, list]:
    """(total ms per step of the ranked entries, [(ms per step, calls per step, name)] of the largest).
    On a GPU only the device events (kernels, memcpy, memset): the profiler also credits each kernel's
    time to the CPU operator that launched it, which would count it twice."""
    events = prof.key_averages()
    if device == "cuda":
        ranked = [(_self_device_us(e), e.count, e.key) for e in events
                  if e.device_type == DeviceType.CUDA and _self_device_us(e) > 0]
    else:
        ranked = [(e.self_cpu_time_total, e.count, e.key) for e in events if e.self_cpu_time_total > 0]
    ranked.sort(key=lambda r: -r[0])
    total = sum(r[0] for r in ranked) / 1e3 / steps
    return total, [(us / 1e3 / steps, count / steps, name) for us, count, name in ranked[:top]]


def profile_case(opmod, case, *, warmup: int, steps: int, top: int) -> list[str]:
    """The report lines of one case: every fusedlm provider and the baseline."""
    lines = [f"{case.op} {case.variant} {'x'.join(map(str, case.shape))} {case.dtype} ({case.device})"]
    runnable, skipped = ready_providers(opmod, case)
    wanted = [p for p in runnable if p.name.startswith("fusedlm[") or p.name == opmod.baseline(case)]
    inputs = opmod.make_inputs(case)
    for p in wanted:
        try:
            for _ in range(warmup):
                _fwd_bwd(p.fn, inputs)
                inputs.zero_grad()
            _sync(case.device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device == "cuda" else [])
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    _fwd_bwd(p.fn, inputs)
                    inputs.zero_grad()
                _sync(case.device)
        except Exception as exc:  # noqa: BLE001 - a provider that fails is reported, not fatal
            inputs.zero_grad()
            lines.append(f"  {p.name}: failed: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        total, rows = _top(prof, case.device, steps, top)
        what = "kernel time" if case.device == "cuda" else "self CPU time"
        lines.append(f"  {p.name}: {total:.3f} ms {what} per step")
        for ms, calls, name in rows:
            share = 100 * ms / total if total else 0.0
            lines.append(f"    {ms:9.3f} ms {share:5.1f}% {calls:5.1f}x  {name[:90]}")
    lines += [f"  not run: {name}: {why}" for name, why in skipped if name.startswith("fusedlm[")]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated ops (default: all)")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes (default: bfloat16)")
    parser.add_argument("--top", type=int, default=8, help="entries per provider (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    dtypes = parse_dtypes(args.dtypes)
    for op in filter(None, (s.strip() for s in args.ops.split(","))):
        opmod = load_op(op)
        for dtype in dtypes:  # the first case of the preset in each dtype
            cases = opmod.cases("quick", args.device, [dtype])
            if not cases:
                print(f"{op}: no {args.device} case in {dtype}")
                continue
            print("\n".join(profile_case(opmod, cases[0], warmup=args.warmup, steps=args.steps, top=args.top)),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
