"""The `fusedlm` command line (also `python -m fusedlm`).

    fusedlm bench [--full] [--device cpu|cuda] [--ops layer_norm,...] [--dtypes float32,bfloat16] ...
        runs the benchmark suite (fusedlm.benchmarks): a markdown table per op on stdout,
        JSON, PNG plots and latest.md in the results folder.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list | None = None) -> int:
    from fusedlm.benchmarks import run as bench

    parser = argparse.ArgumentParser(prog="fusedlm", description="fused transformer kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_parser = commands.add_parser(
        "bench", help="run the benchmark suite",
        description="Time every fusedlm op against PyTorch, its reference, torch.compile and installed peers "
                    "(forward, backward, forward+backward; peak memory and bytes saved for backward).")
    bench.add_arguments(bench_parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run(args, argv[1:])
    parser.error(f"unknown command {args.command!r}")
    return 2
