"""The benchmark harness: how every fusedlm op is timed and its memory measured.

An op's benchmark module (layer_norm.py, ...) describes cases (shape, dtype, variant), makes
inputs and lists providers (callables over the inputs). This file runs them, the same way
for every op:

Modes. "forward" runs the provider with autograd recording (the training forward: outputs
and the tensors saved for backward are made). "backward" times only the backward: each rep
runs the forward outside the timed region, then times torch.autograd.backward over every
output with fixed gradients; the graph is freed by that backward (nothing is retained
between reps) and the leaves' .grad are reset to None outside the timed region.
"forward+backward" times both together.

Timing. CPU: time.perf_counter around one rep, after warm-up; the providers of a case are
interleaved rep by rep (round-robin, rotating who goes first) so that machine noise falls on
all of them alike. GPU: triton.testing.do_bench (L2 flushed before every rep) for forward
and forward+backward; backward alone, and every mode when Triton is missing, with CUDA
events around each rep after the same flush. Reported: the median and p20-p80 of the reps; the
target lines (run.py) also give, on the CPU, the median of the per-round ratios of two providers,
which a slow spell of a shared machine moves less than the ratio of their medians.

Memory (peak bytes per mode, bytes saved for backward): memory.py.
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .memory import CudaMeter, measure_memory_cpu, measure_phases, saved_bytes

MODES = ("forward", "backward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
# Forward outputs must agree with the baseline provider's to this, relative to max(1, max|y_baseline|).
CHECK_TOL = {"float32": 1e-3, "bfloat16": 8e-2, "float16": 1e-2}


@dataclass(frozen=True)
class Variant:
    """A benchmark variant whose only settings are its baseline provider and its title (ops with more
    settings, attention's causal flag or layer_norm's norm, define their own)."""
    baseline: str
    title: str


@dataclass(frozen=True)
class Case:
    op: str
    variant: str
    shape: tuple
    dtype: str
    device: str

    @property
    def label(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Inputs:
    """Keyword tensors for the providers, and one gradient per provider output. No gradients (an
    empty tuple) marks a forward-only op (generation): its inputs need no grad, nothing runs backward,
    and its module times MODES = ("forward",)."""
    tensors: dict
    grads: tuple

    def leaves(self) -> list:
        return [t for t in self.tensors.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def zero_grad(self) -> None:
        for t in self.leaves():
            t.grad = None


@dataclass
class Provider:
    """fn(tensors: dict) -> Tensor or tuple of Tensors. fn None: cannot run here, `why` says why.
    kind "compile": the harness wraps fn in torch.compile once per case. kind "floor": a lower
    bound on the time that does not compute the op (e.g. its GEMMs alone); its output is not
    compared with the baseline's."""
    name: str
    fn: Callable | None
    kind: str
    why: str = ""


@dataclass
class Row:
    case: Case
    provider: str
    mode: str
    times_ms: list = field(default_factory=list)
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    ratio: float | None = None          # baseline median / this median: > 1 is faster
    baseline: str = ""
    gbps: float | None = None           # minimum bytes moved by the op / median time
    tflops: float | None = None         # the op's FLOPs (its module's flops(case, mode), if any) / median time
    peak_bytes: int | None = None
    saved_bytes: int | None = None
    first_call_s: float | None = None   # the first forward+backward, for compile providers the compile
    max_abs_diff: float | None = None   # forward output vs the baseline provider's
    error: str = ""

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "case"}
        d.update(op=self.case.op, variant=self.case.variant, shape=list(self.case.shape),
                 dtype=self.case.dtype, device=self.case.device)
        return d


def parse_dtypes(text: str) -> list:
    out = []
    for name in filter(None, (s.strip() for s in text.split(","))):
        name = DTYPE_ALIASES.get(name, name)
        if name not in DTYPES:
            raise ValueError(f"bench: --dtypes takes {', '.join(DTYPES)}, got {name!r}")
        out.append(name)
    return out


def float32_cases(op: str, variants, shapes: list, device: str, preset: str, dtypes: list) -> list:
    """The Case list of a GEMM-bound benchmark: every variant x shape x dtype, except that the CPU's
    quick preset runs float32 only unless only other dtypes were asked (CPU bf16 GEMMs are another
    benchmark, fp16 ones unusable)."""
    if device == "cpu" and preset == "quick":
        dtypes = [dt for dt in dtypes if dt == "float32"] or dtypes
    return [Case(op, v, shape, dt, device) for v in variants for shape in shapes for dt in dtypes]


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class Quantiles(list):
    """[min, p20, median, p80, max] in ms, where a timer gave no per-rep times."""


def _summarize(row: Row, times_ms: list) -> None:
    if isinstance(times_ms, Quantiles):
        row.min_ms, row.p20_ms, row.median_ms, row.p80_ms, row.max_ms = times_ms
        return
    row.times_ms = [round(t, 6) for t in times_ms]
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 9
    row.median_ms = statistics.median(times_ms)
    row.p20_ms, row.p80_ms = q[1], q[7]
    row.min_ms, row.max_ms = min(times_ms), max(times_ms)


# --- providers ready to run ----------------------------------------------------------------

def ready_providers(opmod, case: Case, skip: tuple = ()) -> tuple[list, list]:
    """(runnable providers, [(name, why) not runnable here]); compile providers wrapped, fresh per case.
    `skip`: name fragments (`fusedlm bench --skip`); a provider whose name contains one is left out."""
    listed = [p if not any(s in p.name for s in skip) or p.fn is None
              else Provider(p.name, None, p.kind, "left out by --skip") for p in opmod.providers(case)]
    if any(p.kind == "compile" and p.fn is not None for p in listed):
        # A fresh Dynamo cache per case: one compile per shape and dtype, no automatic dynamic
        # shapes and no recompile limit reached across a long --full run.
        torch._dynamo.reset()
    runnable, skipped = [], []
    for p in listed:
        if p.fn is None:
            skipped.append((p.name, p.why))
        elif p.kind == "compile":
            runnable.append(Provider(p.name, torch.compile(p.fn, dynamic=False), p.kind, p.why))
        else:
            runnable.append(p)
    return runnable, skipped


# --- one rep ---------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cpu_rep(fn, inputs: Inputs, mode: str) -> float:
    """Seconds of one rep; setup and teardown stay outside the timed region."""
    if mode == "forward":
        t0 = time.perf_counter()
        out = fn(inputs.tensors)
        t1 = time.perf_counter()
        del out
        return t1 - t0
    if mode == "backward":
        outs = _as_tuple(fn(inputs.tensors))
        t0 = time.perf_counter()
        torch.autograd.backward(outs, inputs.grads)
        t1 = time.perf_counter()
    else:
        t0 = time.perf_counter()
        outs = _as_tuple(fn(inputs.tensors))
        torch.autograd.backward(outs, inputs.grads)
        t1 = time.perf_counter()
    del outs
    inputs.zero_grad()
    return t1 - t0


def backward(outs, inputs: Inputs) -> None:
    """Backward over every output with the fixed gradients; nothing for a forward-only op."""
    if inputs.grads:
        torch.autograd.backward(outs, inputs.grads)


def _fwd_bwd(fn, inputs: Inputs) -> None:
    backward(_as_tuple(fn(inputs.tensors)), inputs)


# --- timing ----------------------------------------------------------------------------------

def time_cpu(providers: list, inputs: Inputs, mode: str, reps: int) -> dict:
    """{provider name: [ms per rep]}, providers interleaved rep by rep."""
    times = {p.name: [] for p in providers}
    gc.collect()
    gc.disable()  # as timeit does: no collector pause inside a timed region
    try:
        for rep in range(reps):
            k = rep % len(providers)
            for p in providers[k:] + providers[:k]:
                times[p.name].append(1e3 * _cpu_rep(p.fn, inputs, mode))
    finally:
        gc.enable()
    return times


def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")


def _time_gpu_events(fn, inputs: Inputs, mode: str, reps: int) -> list:
    flush = _l2_flush_buffer()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        inputs.zero_grad()
        outs = _as_tuple(fn(inputs.tensors)) if mode == "backward" else None
        flush.zero_()
        starts[i].record()
        if mode == "forward":
            outs = fn(inputs.tensors)
        elif mode == "backward":
            torch.autograd.backward(outs, inputs.grads)
        else:
            _fwd_bwd(fn, inputs)
        ends[i].record()
        del outs
    torch.cuda.synchronize()
    inputs.zero_grad()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_gpu(provider: Provider, inputs: Inputs, mode: str, reps: int) -> list:
    """ms per rep: triton.testing.do_bench where the mode allows, else CUDA events."""
    if mode != "backward":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            fn = provider.fn
            bench = (lambda: fn(inputs.tensors)) if mode == "forward" else (lambda: _fwd_bwd(fn, inputs))
            try:  # raw per-rep times (newer Triton); older ones only return quantiles
                times = do_bench(bench, grad_to_none=inputs.leaves(), return_mode="all")
            except (AssertionError, TypeError, ValueError):
                times = Quantiles(do_bench(bench, grad_to_none=inputs.leaves(), quantiles=[0.0, 0.2, 0.5, 0.8, 1.0]))
            inputs.zero_grad()
            return times if isinstance(times, Quantiles) else list(times)
    return _time_gpu_events(provider.fn, inputs, mode, reps)


# --- one case --------------------------------------------------------------------------------

def _warm_up(providers: list, inputs: Inputs, warmup: int, device: str, errors: dict, first_call: dict,
             outputs: dict) -> list:
    healthy = []
    for p in providers:
        try:
            t0 = time.perf_counter()
            outs = _as_tuple(p.fn(inputs.tensors))
            backward(outs, inputs)
            _sync(device)
            first_call[p.name] = time.perf_counter() - t0
            if p.kind != "floor":
                outputs[p.name] = outs[0].detach()
            del outs
            inputs.zero_grad()
            for _ in range(max(0, warmup - 1)):
                _fwd_bwd(p.fn, inputs)
                inputs.zero_grad()
            _sync(device)
            healthy.append(p)
        except Exception as exc:  # noqa: BLE001 - a provider that fails is reported, not fatal
            inputs.zero_grad()
            errors[p.name] = _short(exc)
    return healthy


def run_case(opmod, case: Case, *, modes=MODES, reps=30, warmup=3, memory=True, skip=()) -> tuple[list, list]:
    """Rows for every (provider, mode) of one case, and the [(provider, why)] not run here."""
    inputs = opmod.make_inputs(case)
    providers, skipped = ready_providers(opmod, case, skip)
    baseline = opmod.baseline(case)
    errors, first_call, outputs = {}, {}, {}
    healthy = _warm_up(providers, inputs, warmup, case.device, errors, first_call, outputs)

    diffs = {}
    ref = outputs.get(baseline)
    for name, y in outputs.items():
        if ref is not None:
            scale = max(1.0, ref.float().abs().max().item())
            diffs[name] = (y.float() - ref.float()).abs().max().item() / scale
            if diffs[name] > CHECK_TOL[case.dtype]:
                errors[name] = f"forward output differs from {baseline}: max rel. diff {diffs[name]:.2e}"
    outputs.clear()

    times = {}
    for mode in modes:
        if case.device == "cuda":
            for p in healthy:
                times[(p.name, mode)] = time_gpu(p, inputs, mode, reps)
        else:
            for name, ts in time_cpu(healthy, inputs, mode, reps).items():
                times[(name, mode)] = ts

    saved, peaks = {}, {}
    for p in healthy:
        try:
            saved[p.name] = saved_bytes(p.fn, inputs)
        except Exception as exc:  # noqa: BLE001
            errors.setdefault(p.name, "saved_tensors_hooks: " + _short(exc))
    if memory and healthy:
        if case.device == "cuda":
            meter = CudaMeter()
            for p in healthy:
                peaks[p.name] = measure_phases(p.fn, inputs, meter, torch.cuda.empty_cache)
        else:
            peaks = measure_memory_cpu(opmod, case, [p.name for p in healthy])
            if "__error__" in peaks:
                print(f"bench: memory of {case.op} {case.variant} {case.label} not measured: "
                      f"{peaks['__error__']}", file=sys.stderr)
                peaks = {}

    rows = []
    for p in providers:
        for mode in modes:
            row = Row(case, p.name, mode, baseline=baseline, error=errors.get(p.name, ""),
                      first_call_s=first_call.get(p.name), max_abs_diff=diffs.get(p.name),
                      saved_bytes=saved.get(p.name))
            if (p.name, mode) in times:
                _summarize(row, times[(p.name, mode)])
                nbytes = opmod.min_bytes(case, mode)
                row.gbps = nbytes / (row.median_ms * 1e-3) / 1e9 if nbytes and row.median_ms else None
                if hasattr(opmod, "flops") and row.median_ms:
                    row.tflops = opmod.flops(case, mode) / (row.median_ms * 1e-3) / 1e12
            peak = peaks.get(p.name)
            if isinstance(peak, dict):
                row.peak_bytes = peak[mode]
            elif isinstance(peak, str):
                row.error = row.error or "memory: " + peak
            rows.append(row)
    base = {r.mode: r.median_ms for r in rows if r.provider == baseline and r.median_ms}
    for r in rows:
        if r.median_ms and r.mode in base:
            r.ratio = base[r.mode] / r.median_ms
    return rows, skipped


# --- the machine -----------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import datetime
    import platform

    import fusedlm

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fusedlm": fusedlm.__version__,
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "backends": fusedlm.available_backends(),
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        # other work on the machine at the start: timings taken under load are noisier and slower
        "loadavg": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["device_name"] = info["cpu"]
    return info
