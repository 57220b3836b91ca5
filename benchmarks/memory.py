"""The memory half of the benchmark harness: peak bytes per mode, and bytes saved for backward.

Peak. GPU: torch.cuda.max_memory_allocated minus the allocated bytes at the phase start.
CPU: in a fresh child process per case (multiprocessing spawn), the kernel's resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident set at the
phase start. Allocations of 64 KiB and up are forced to mmap (mallopt), so freed tensors
leave the resident set at once, and malloc_trim runs between phases. (ru_maxrss is not
used: a spawned child inherits its parent's high-water mark through exec.) Phases:
forward = peak during forward over the state with the inputs made; backward = peak during
backward over the state after forward (outputs and saved tensors alive);
forward+backward = the peak of both over the inputs-only state.

Saved for backward: during one forward, torch.autograd.graph.saved_tensors_hooks sees every
tensor autograd packs; the bytes of the unique storages (by data_ptr) are summed. Inputs
and parameters that are saved (x, weight, ...) count; a saved view counts its whole storage.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import multiprocessing
import traceback
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .harness import Case, Inputs

MEMORY_CHILD_TIMEOUT_S = 600


class CpuMeter:
    """Resident set of this process (Linux /proc), its high-water mark resettable."""

    def __init__(self):
        with open("/proc/self/clear_refs", "w") as f:  # raises where unsupported: measurement off
            f.write("5")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"bench: {key} missing from /proc/self/status")

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    def current(self) -> int:
        return self._status("VmRSS:")

    def peak(self) -> int:
        return self._status("VmHWM:")


class CudaMeter:
    def reset(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def current(self) -> int:
        return torch.cuda.memory_allocated()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated()


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_freed(libc) -> None:
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)


def measure_phases(fn, inputs: Inputs, meter, release=lambda: None) -> dict:
    """Peak bytes of each mode (see the module docstring for what each phase counts)."""
    release()
    meter.reset()
    base0 = meter.current()
    outs = fn(inputs.tensors)
    fwd_peak = meter.peak()
    base1 = meter.current()
    meter.reset()
    if inputs.grads:  # a forward-only op (generation) has no backward phase
        torch.autograd.backward(outs, inputs.grads)
    bwd_peak = meter.peak()
    del outs
    inputs.zero_grad()
    release()
    return {"forward": fwd_peak - base0, "backward": bwd_peak - base1,
            "forward+backward": max(fwd_peak, bwd_peak) - base0}


def _memory_child(op_module: str, case: Case, names: list, conn) -> None:
    """Runs in a spawned process: {provider: {mode: peak bytes} or error string}."""
    from .harness import _fwd_bwd, _short, ready_providers

    result = {}
    try:
        libc = _libc()
        if libc is not None:
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so big blocks are munmapped on free
        meter = CpuMeter()
        opmod = importlib.import_module(op_module)
        inputs = opmod.make_inputs(case)
        providers, _ = ready_providers(opmod, case)
        for p in providers:
            if p.name not in names:
                continue
            try:
                _fwd_bwd(p.fn, inputs)  # loads code pages, compiles; then freed before measuring
                inputs.zero_grad()
                result[p.name] = measure_phases(p.fn, inputs, meter, lambda: _release_freed(libc))
            except Exception as exc:  # noqa: BLE001 - reported in the row
                inputs.zero_grad()
                result[p.name] = _short(exc)
    except Exception as exc:  # noqa: BLE001
        result = {"__error__": _short(exc) + "\n" + traceback.format_exc(limit=3)}
    conn.send(result)
    conn.close()


def measure_memory_cpu(opmod, case: Case, names: list) -> dict:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child, args=(opmod.__name__, case, names, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(MEMORY_CHILD_TIMEOUT_S):
            return {"__error__": f"memory child gave no answer in {MEMORY_CHILD_TIMEOUT_S} s"}
        return recv.recv()
    except EOFError:
        return {"__error__": "memory child died without an answer"}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def saved_bytes(fn, inputs: Inputs) -> int:
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(inputs.tensors)
    del out
    return sum(storages.values())
