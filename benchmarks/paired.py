"""A paired A/B of one provider under two settings of the environment switches that fusedlm reads
on every call: the measurement behind a tuning choice, in one process on the same inputs.

    python -m fusedlm.benchmarks.paired --op OP --env NAME=VALUE[,NAME=VALUE] [--base-env ...]
        [--provider fusedlm[cpu]] [--dtype bfloat16] [--shape 4096x768x3072] [--mode backward]
        [--rounds 21] [--warmup 2]

A runs with --base-env (default: the switches of --env unset), B with --env. Each round times one
rep of A and one of B, the order alternating by round, so that a drift of the machine's speed falls
on both; printed are both medians and the median of the per-round differences B - A with their
p20-p80 range (negative: B is faster). The switches include FUSEDLM_LNMLP_BLOCK_ROWS and
FUSEDLM_LNMLP_FLIP (layernorm_mlp's token blocks and weight-gradient orientation, on the CPU),
FUSEDLM_CPU_ISA and FUSEDLM_CPU_BF16. --shape takes any shape of the op's benchmark (default: the first
case of its quick preset); the rest of the case (variant, inputs) is the benchmark's. CPU tensors only
(the switches are the CPU kernels'); a torch.compile provider is refused (it would run uncompiled).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics

import torch

from . import OPS, load_op
from .harness import _cpu_rep, parse_dtypes, ready_providers

MODES = ("forward", "backward", "forward+backward")


def _parse_env(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"paired: --env takes NAME=VALUE[,NAME=VALUE], got {item!r}")
        out[name] = value
    return out


def _apply(env: dict, names) -> None:
    for name in names:
        if env.get(name) is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = env[name]


def _quantile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(op: str, env_a: dict, env_b: dict, *, provider: str, dtype: str, shape, mode: str, rounds: int,
        warmup: int) -> dict:
    """{"a": [ms], "b": [ms], "case": Case} of `rounds` paired reps."""
    device = "cpu"
    opmod = load_op(op)
    cases = opmod.cases("quick", device, [dtype]) or opmod.cases("full", device, [dtype])
    if not cases:
        raise ValueError(f"paired: {op} has no {device} case in {dtype}")
    case = cases[0] if shape is None else dataclasses.replace(cases[0], shape=tuple(shape))
    runnable, skipped = ready_providers(opmod, case)
    chosen = [p for p in runnable if p.name == provider and p.kind != "compile"]
    if not chosen:
        why = dict(skipped).get(provider, "no such provider")
        raise ValueError(f"paired: provider {provider!r} cannot run {op} here: {why}")
    fn = chosen[0].fn
    inputs = opmod.make_inputs(case)
    names = set(env_a) | set(env_b)
    saved = {name: os.environ.get(name) for name in names}
    times = {"a": [], "b": []}
    try:
        for env in (env_a, env_b):
            _apply(env, names)
            for _ in range(warmup):
                _cpu_rep(fn, inputs, mode)
        gc.collect()
        gc.disable()
        for r in range(rounds):
            for key in (("a", "b") if r % 2 == 0 else ("b", "a")):
                _apply(env_a if key == "a" else env_b, names)
                times[key].append(1e3 * _cpu_rep(fn, inputs, mode))
    finally:
        gc.enable()
        _apply(saved, names)
    times["case"] = case
    return times


def report(times: dict, env_a: dict, env_b: dict, provider: str, mode: str) -> str:
    a, b = times["a"], times["b"]
    diffs = [y - x for x, y in zip(a, b)]
    case = times["case"]

    def show(env):
        return ",".join(f"{k}={v}" for k, v in env.items()) or "(switches unset)"

    return "\n".join([
        f"{case.op} {case.variant} {case.label} {case.dtype} ({case.device}), {provider}, {mode}, "
        f"{len(a)} paired rounds; torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"  A {show(env_a)}: median {statistics.median(a):.3f} ms",
        f"  B {show(env_b)}: median {statistics.median(b):.3f} ms",
        f"  B - A per round: median {statistics.median(diffs):+.3f} ms "
        f"(p20 {_quantile(diffs, 0.2):+.3f}, p80 {_quantile(diffs, 0.8):+.3f}); "
        f"B / A {statistics.median(b) / statistics.median(a):.3f}",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.benchmarks.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, choices=OPS)
    parser.add_argument("--env", required=True, help="B's switches: NAME=VALUE[,NAME=VALUE]")
    parser.add_argument("--base-env", default="", help="A's switches (default: those of --env unset)")
    parser.add_argument("--provider", default="fusedlm[cpu]")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", default=None, help="e.g. 4096x768x3072 (default: the quick preset's first)")
    parser.add_argument("--mode", choices=MODES, default="forward+backward")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    env_b = _parse_env(args.env)
    env_a = _parse_env(args.base_env)
    shape = [int(s) for s in args.shape.split("x")] if args.shape else None
    (dtype,) = parse_dtypes(args.dtype)
    times = run(args.op, env_a, env_b, provider=args.provider, dtype=dtype, shape=shape, mode=args.mode,
                rounds=args.rounds, warmup=args.warmup)
    print(report(times, env_a, env_b, args.provider, args.mode), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
