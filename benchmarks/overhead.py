"""Host time per call: each fused op on inputs so small that the kernels take microseconds, so the
time is Python, autograd and the dispatcher.

    python -m fusedlm.benchmarks.overhead [--device cpu|cuda] [--reps N]

Providers, per op, interleaved rep by rep (median of --reps):
  fusedlm                  the public function (its checks, backend choice and the eager fast
                           path of fusedlm.ops.autograd)
  fusedlm (library path)   the same with fusedlm.ops.autograd.EAGER_FAST_PATH = False: every call
                           through torch.library's autograd kernel
  PyTorch                  the eager PyTorch equivalent (ATen ops with C++ autograd)
vs PyTorch: PyTorch's time over fusedlm's (above 1: fusedlm is faster), as in `fusedlm bench`.
Modes: forward under torch.no_grad() (generation), and forward+backward of the sum of the output
with every input a leaf that needs a gradient. On a GPU each rep ends with a synchronize.
This is a measurement of overhead, not of kernels: `fusedlm bench` times the kernels.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import reference
from fusedlm.ops import autograd


def _cases(device):
    """(name, fusedlm fn, PyTorch fn, leaf tensors) per op."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device).requires_grad_()

    x, w, b = leaf(32, 64), leaf(64), leaf(64)
    yield ("layer_norm (32, 64)", lambda: fusedlm.layer_norm(x, w, b),
           lambda: F.layer_norm(x, (64,), w, b), (x, w, b))
    q = leaf(1, 4, 16, 32)
    yield ("attention (1, 4, 16, 32) causal", lambda: fusedlm.attention(q, q, q, causal=True),
           lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), (q,))
    fw, fb, pw, pb = leaf(256, 64, scale=0.1), leaf(256), leaf(64, 256, scale=0.1), leaf(64)
    mlp = (x, w, b, fw, fb, pw, pb)
    yield ("layernorm_mlp (32, 64), h=256", lambda: fusedlm.layernorm_mlp(*mlp),
           lambda: reference.layernorm_mlp(*mlp), mlp)
    wv, t = leaf(1000, 64, scale=0.1), torch.randint(0, 1000, (32,), generator=g).to(device)
    yield ("linear_cross_entropy (32, 64), V=1000", lambda: fusedlm.linear_cross_entropy(x, wv, t),
           lambda: F.cross_entropy(F.linear(x, wv), t), (x, wv))
    x1 = leaf(1, 64)
    yield ("lm_head_softmax (1, 64), V=1000", lambda: fusedlm.lm_head_softmax(x1, wv),
           lambda: torch.softmax(F.linear(x1, wv), -1), (x1, wv))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _rep(fn, leaves, mode, device):
    for t in leaves:
        t.grad = None
    t0 = time.perf_counter()
    if mode == "forward":
        with torch.no_grad():
            fn()
    else:
        _first(fn()).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _library(fn):
    def run():
        autograd.EAGER_FAST_PATH = False
        try:
            return fn()
        finally:
            autograd.EAGER_FAST_PATH = True
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--reps", type=int, default=500)
    args = p.parse_args(argv)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median us per call of {args.reps} interleaved reps\n", flush=True)
    print("| op | mode | fusedlm | fusedlm (library path) | PyTorch | vs PyTorch |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, fn, base, leaves in _cases(args.device):
        providers = {"fusedlm": fn, "library": _library(fn), "torch": base}
        for mode in ("forward", "forward+backward"):
            times = {k: [] for k in providers}
            for f in providers.values():  # warm up
                for _ in range(20):
                    _rep(f, leaves, mode, args.device)
            gc.collect()
            gc.disable()
            try:
                for _ in range(args.reps):
                    for k, f in providers.items():
                        times[k].append(_rep(f, leaves, mode, args.device))
            finally:
                gc.enable()
            us = {k: 1e6 * statistics.median(v) for k, v in times.items()}
            print(f"| {name} | {mode} | {us['fusedlm']:.0f} | {us['library']:.0f} | {us['torch']:.0f} | "
                  f"{us['torch'] / us['fusedlm']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
