"""The `fusedlm` command line (also `python -m fusedlm`).

    fusedlm bench [--full] [--device cpu|cuda] [--ops layer_norm,...] [--dtypes float32,bfloat16] ...
        runs the benchmark suite (fusedlm.benchmarks): a markdown table per op on stdout,
        JSON, PNG plots and latest.md in the results folder.
    fusedlm train [--data PATH] [--out CKPT] [--steps N] ...
        trains a byte-level fusedlm.GPT on a text file (fusedlm/training.py).
    fusedlm generate --checkpoint CKPT --prompt TEXT [--max-new-tokens N] ...
        continues a prompt with a trained checkpoint.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list | None = None) -> int:
    from fusedlm import training
    from fusedlm.benchmarks import run as bench

    parser = argparse.ArgumentParser(prog="fusedlm", description="fused transformer kernels for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_parser = commands.add_parser(
        "bench", help="run the benchmark suite",
        description="Time every fusedlm op against PyTorch, its reference, torch.compile and installed peers "
                    "(forward, backward, forward+backward; peak memory and bytes saved for backward).")
    bench.add_arguments(bench_parser)
    training.add_train_arguments(commands.add_parser(
        "train", help="train a byte-level GPT on a text file",
        description="Train fusedlm.GPT on the bytes of a text file and save a checkpoint."))
    training.add_generate_arguments(commands.add_parser(
        "generate", help="continue a prompt with a trained checkpoint",
        description="Load a `fusedlm train` checkpoint and print the prompt with its continuation."))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run(args, argv[1:])
    if args.command == "train":
        return training.train(args)
    if args.command == "generate":
        return training.generate(args)
    parser.error(f"unknown command {args.command!r}")
    return 2
