"""The Triton attention backward's tiles, timed against each other on a GPU: the data behind the
static backward tables of kernels/attention_config.py (_GPU_DKDV, _GPU_DQ and the per-family _GPU_FAMILY).

    python -m fusedlm.benchmarks.attention_tiles [--heads 16] [--tokens 4096] [--batch 4]

Those tables are static rather than timed per call (as the forward's are) because a dK/dV tile fixes
the order of the sums over query blocks: a measured choice could give two processes different bits.
So the timing happens here, once per GPU: for each 16-bit head-dim bucket (D = 64, 128; bf16, causal)
and each of the two backward kernels, every tile of CANDIDATES[family] is forced on that kernel (the
other keeps the library's tile) and one whole Triton backward (fusedlm.kernels.attention.attention_bwd)
is timed: the median of triton.testing.do_bench. Printed: the times and each one's ratio to the tile the
library uses now ("x now", above 1: faster). A candidate that fails to compile or launch is reported, not
fatal. `benchmarks/gpu_check.sh` runs it; its results decide the next table edit.
"""
from __future__ import annotations

import argparse

import torch

# (family, kernel, head-dim bucket) -> (BLOCK_M, BLOCK_N, warps, stages) tiles to time: the library's
# entries plus the neighbours that compile without spills for sm_90a with Triton 3.6 or 3.9 (the report of
# kernels/attention_config.py's _GPU_FAMILY comment has the stack bytes).
CANDIDATES = {
    ("sm90", "dkdv", 64): [(32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2)],
    ("sm90", "dkdv", 128): [(16, 64, 8, 1), (32, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 1)],
    ("sm90", "dq", 64): [(64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2)],
    ("sm90", "dq", 128): [(64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2)],
    ("sm80", "dkdv", 64): [(32, 128, 8, 2), (32, 128, 8, 1), (16, 64, 8, 1)],
    ("sm80", "dkdv", 128): [(16, 64, 8, 1)],
    ("sm80", "dq", 64): [(64, 64, 8, 2), (128, 32, 8, 2)],
    ("sm80", "dq", 128): [(64, 64, 8, 2), (128, 32, 8, 2)],
}


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedlm.benchmarks.attention_tiles", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_tiles: needs a CUDA GPU (the Triton kernels are timed compiled, not interpreted)")
        return 0
    import triton

    from fusedlm.kernels import gpu_family

    family = gpu_family(torch.cuda.current_device())
    print(f"attention backward tiles, {torch.cuda.get_device_name()} ({family}), bf16 causal, B={args.batch} "
          f"H={args.heads} N={args.tokens}; median ms of one Triton backward (dK/dV + dQ + the dO.O pass)")
    sweep(family, args.batch, args.heads, args.tokens, "cuda", torch.bfloat16, triton.testing.do_bench)
    return 0


def sweep(family: str, b: int, h: int, n: int, device: str, dtype: torch.dtype, bench) -> list:
    """Prints and returns [(kernel, D, tile, ms or None, note)]; bench(fn, **do_bench options) -> ms."""
    from fusedlm.kernels import attention as kernels

    config_of = kernels._config
    results = []
    print(f"{'kernel':<6} {'D':>4} {'tile (BLOCK_M, BLOCK_N, warps, stages)':<40} {'ms':>9} {'x now':>7}")
    for d in (64, 128):
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen) for _ in range(4))
        scale = d ** -0.5
        out, lse = kernels.attention_fwd(q, k, v, True, scale)
        for kernel in ("dkdv", "dq"):
            now = config_of(q, d, kernel)
            # the library's tile first, so that every later line can print its ratio at once (a
            # time-boxed run keeps the lines it got to)
            candidates = CANDIDATES.get((family, kernel, d), [])
            base = None
            for config in [now] + [c for c in candidates if c != now]:
                kernels._config = (lambda q_, block_d, name, c=config, forced=kernel:
                                   c if name == forced else config_of(q_, block_d, name))
                try:
                    ms = bench(lambda: kernels.attention_bwd(do, q, k, v, out, lse, None, True, scale),
                               warmup=5, rep=40, return_mode="median")
                except Exception as exc:  # a tile that does not compile or launch here: reported, not fatal
                    first = str(exc).splitlines()[0][:60] if str(exc) else ""
                    ms, note = None, f"failed: {type(exc).__name__}: {first}"
                else:
                    note = ""
                finally:
                    kernels._config = config_of
                if config == now:
                    base = ms
                mark = " (now)" if config == now else ""
                ratio = f"{base / ms:6.2f}x" if ms and base else ""
                shown = f"{ms:9.3f}" if ms is not None else f"{'-':>9}"
                print(f"{kernel:<6} {d:>4} {str(config) + mark:<40} {shown} {ratio:>7} {note}", flush=True)
                results.append((kernel, d, config, ms, note))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
