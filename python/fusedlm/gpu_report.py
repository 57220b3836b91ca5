"""GPU static report: compile every Triton and CUDA kernel for sm_90a (H200) and sm_80 (A100)
on a machine without a GPU, and hold each cubin's resources to account.

    python -m fusedlm.gpu_report          (make gpu-report; .ci/run calls it)

What it reads
- Triton: every module of `fusedlm.kernels` (the repo's kernels/) that defines @triton.jit code
  exposes `static_report_specs()`, a list of dicts, one per configuration the launcher or the
  autotuner can pick: {"kernel", "fn", "signature", "constexprs", "num_warps", "num_stages",
  "dtype", "config"}, plus optional "uses_tensor_cores": True (the kernel multiplies 16-bit
  matrices) and "pruned": "why" (the autotune list leaves this configuration out; it is compiled
  and shown as evidence, but not checked).
- CUDA: every csrc/cuda/*.cu, built by nvcc to one cubin per arch. A kernel that multiplies 16-bit
  matrices is marked in its source by a comment line `// gpu_report: uses_tensor_cores NAME[, NAME]`
  (NAME: the kernel's unqualified name; it must show each arch's own tensor-core op, below), or
  `// gpu_report: uses_tensor_cores(OP) NAME` for a kernel written for one instruction on every arch:
  OP = HMMA for mma.sync, which sm_90a also runs as HMMA (HGMMA comes only from wgmma). The block
  size is not in a cubin: it comes from `__launch_bounds__` (EIATTR_MAX_THREADS); without one the
  occupancy is not computed (n/a).

What it measures, from `cuobjdump` on each cubin: registers per thread, stack (spill) bytes per
thread, shared memory per block (static + Triton's dynamic), tensor-core instructions in the SASS,
and the theoretical occupancy (resident warps per SM) from registers, shared memory and block size.

What it checks (exit 1 naming the kernel, configuration, arch and number): every kernel compiles
for both archs (a spec with an "archs" list, a configuration only those GPUs launch: for those);
stack bytes are 0; shared memory fits the per-block limit (227 KiB sm_90, 163 KiB sm_80); a kernel marked as multiplying 16-bit matrices shows HGMMA on sm_90a and HMMA on sm_80
(or its marker's OP on both).
It proves what the compiler emits; it is not a timing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Arch:
    """Per-SM limits of the GPU each arch stands for (CUDA occupancy calculator model)."""

    name: str
    capability: int
    smem_per_sm: int  # bytes, at the largest shared-memory carve-out
    smem_per_block: int  # opt-in maximum a block may use (excludes the 1 KiB the system reserves)
    tensor_core_op: str  # the SASS opcode a 16-bit matrix multiply must show
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32


ARCHS = (
    Arch("sm_90a", 90, 228 * 1024, 227 * 1024, "HGMMA"),  # H200 / H100
    Arch("sm_80", 80, 164 * 1024, 163 * 1024, "HMMA"),  # A100
)
RESERVED_SMEM = 1024  # per block, for system use on sm_80 and later
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_ALLOC_UNIT = 128
SUB_PARTITIONS = 4  # each SM splits its register file between 4 schedulers
TENSOR_CORE_OPS = ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA", "DMMA")
CUDA_DTYPES = {"float": "fp32", "__half": "fp16", "half": "fp16", "__nv_bfloat16": "bf16", "double": "fp64"}
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]  # as setup.py builds them
MARKER = re.compile(r"//\s*gpu_report:\s*uses_tensor_cores(?:\((\w+)\))?[ \t]+(\w+(?:[ \t]*,[ \t]*\w+)*)")


@dataclass
class Record:
    kernel: str
    backend: str
    arch: str
    config: str
    dtype: str
    registers: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_core: dict = field(default_factory=dict)
    occupancy_warps: int | None = None
    threads: int | None = None  # block size the occupancy assumes
    uses_tensor_cores: bool = False
    tensor_core_op: str | None = None  # the op a marked kernel must show on every arch; None: the arch's
    pruned: str | None = None
    error: str | None = None

    def where(self) -> str:
        return f"{self.kernel} [{self.config}] {self.dtype} {self.arch}"


def _cuda_home() -> Path:
    return Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")


def find_cuobjdump() -> str | None:
    """Triton's wheel ships one beside its ptxas; else the CUDA toolkit's."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    local = _cuda_home() / "bin" / "cuobjdump"
    return str(local) if local.is_file() else shutil.which("cuobjdump")


def find_nvcc() -> str | None:
    local = _cuda_home() / "bin" / "nvcc"
    return str(local) if local.is_file() else shutil.which("nvcc")


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = _run([tool] + names).splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


@dataclass
class KernelStats:
    registers: int = 0
    stack_bytes: int = 0
    static_shared: int = 0  # user static shared memory, the reserved 1 KiB taken out
    threads: int | None = None  # from .maxntid / __launch_bounds__ / reqntid
    tensor_core: dict = field(default_factory=dict)
    sass_arch: str | None = None  # the cubin's .target


def analyse_cubin(cuobjdump: str, path: str, disassemble: bool = True) -> dict[str, KernelStats]:
    """Per kernel (mangled name): resources from -res-usage, block size and arch from -elf, and
    tensor-core opcodes from -sass (the slow part, about 0.5 s: skipped when disassemble=False)."""
    stats: dict[str, KernelStats] = {}
    name = None
    for line in _run([cuobjdump, "--dump-resource-usage", path]).splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            reg, stack, shared, local = map(int, m.groups())
            # STACK is the per-thread frame (spills live there); LOCAL is other local memory.
            stats[name] = KernelStats(registers=reg, stack_bytes=stack + local, static_shared=shared)

    elf = _run([cuobjdump, "--dump-elf", path])
    # On sm_90 the toolkit folds the 1 KiB that the system reserves per block into SHARED of
    # every kernel that touches shared memory (the .nv.reservedSmem symbol); take it out so
    # that shared_bytes is what counts against the per-block limit on either arch.
    if "reservedSmem" in elf:
        for s in stats.values():
            if s.static_shared >= RESERVED_SMEM:
                s.static_shared -= RESERVED_SMEM
    target = re.search(r"^\.target\s+(sm_\w+)", elf, re.M)
    for s in stats.values():
        s.sass_arch = target.group(1) if target else None
    section, attr = None, None
    for line in elf.splitlines():
        text = line.strip()
        if text.startswith(".nv.info."):
            section, attr = text[len(".nv.info."):], None
        elif text.startswith("Attribute:"):
            attr = text.split()[-1]
        elif text.startswith("Value:") and attr in ("EIATTR_MAX_THREADS", "EIATTR_REQNTID"):
            dims = [int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", text)[:3]]
            if section in stats and dims:
                stats[section].threads = dims[0] * dims[1] * dims[2] if len(dims) == 3 else dims[0]
            attr = None

    name = None
    for line in _run([cuobjdump, "--dump-sass", path]).splitlines() if disassemble else []:
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and name in stats and m.group(1) in TENSOR_CORE_OPS:
            counts = stats[name].tensor_core
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return stats


def occupancy_warps(arch: Arch, threads: int | None, registers: int, shared_bytes: int) -> int | None:
    """Resident warps per SM: blocks limited by registers, shared memory, warps and the block cap.

    registers: per warp ceil(regs * 32 / 256) * 256, and each of the 4 sub-partitions holds
    regs_per_sm / 4 of them; shared: ceil(bytes / 128) * 128 + 1 KiB reserved per block.
    """
    if threads is None or threads <= 0:
        return None
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = (arch.regs_per_sm // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS
    smem = -(-shared_bytes // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT + RESERVED_SMEM
    blocks = min(warps_by_regs // warps, arch.smem_per_sm // smem, arch.max_warps // warps, arch.max_blocks)
    return blocks * warps


def _fill(record: Record, arch: Arch, s: KernelStats, dynamic_shared: int = 0) -> Record:
    record.registers, record.stack_bytes = s.registers, s.stack_bytes
    record.shared_bytes = s.static_shared + dynamic_shared
    record.tensor_core = dict(sorted(s.tensor_core.items()))
    record.threads = record.threads or s.threads
    record.occupancy_warps = occupancy_warps(arch, record.threads, s.registers, record.shared_bytes)
    if s.sass_arch and s.sass_arch != arch.name:
        record.error = f"cubin is {s.sass_arch}, expected {arch.name}"
    return record


def _ast_source(fn, signature: dict, constexprs: dict, attrs=None):
    """The ASTSource of one spec. `attrs` (Triton >= 3.3's divisibility hints, e.g. {(3,): [["tt.divisibility", 16]]})
    let the compiler vectorise as it would for aligned arguments; Triton 3.2 takes none, so the spec
    then compiles as its unaligned case."""
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig.setdefault(name, "constexpr")
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:  # Triton >= 3.3
        return ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=attrs)
    return ASTSource(fn=fn, signature=sig, constants=dict(constexprs))  # Triton 3.2


def _config_text(config) -> str:
    if isinstance(config, dict):
        return ", ".join(f"{k}={v}" for k, v in config.items())
    return str(config)


def triton_record(spec: dict, arch: Arch, cuobjdump: str, tmpdir: str) -> Record:
    """Compile one spec for one arch and read its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget

    record = Record(
        kernel=spec["kernel"], backend="triton", arch=arch.name, config=_config_text(spec["config"]),
        dtype=str(spec["dtype"]), threads=spec["num_warps"] * 32,
        uses_tensor_cores=bool(spec.get("uses_tensor_cores", False)), pruned=spec.get("pruned"),
    )
    try:
        src = _ast_source(spec["fn"], spec["signature"], spec.get("constexprs", {}), spec.get("attrs"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton 3.9's note on TRITON_DEFAULT_FP_FUSION
            compiled = triton.compile(src, target=GPUTarget("cuda", arch.capability, 32),
                                      options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    except Exception as exc:  # a compiler error is a finding, reported per configuration
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        record.error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]
        return record
    meta = compiled.metadata
    dynamic = meta["shared"] if isinstance(meta, dict) else meta.shared
    name = meta["name"] if isinstance(meta, dict) else meta.name
    fd, path = tempfile.mkstemp(prefix=f"{name}_{arch.name}_", suffix=".cubin", dir=tmpdir)
    with os.fdopen(fd, "wb") as f:
        f.write(compiled.asm["cubin"])
    # Tensor-core SASS comes only from PTX mma / wmma / wgmma: without one there is nothing to count.
    disassemble = record.uses_tensor_cores or "mma." in compiled.asm.get("ptx", "mma.")
    stats = analyse_cubin(cuobjdump, path, disassemble)
    if name not in stats:
        record.error = f"kernel {name} not found in its cubin"
        return record
    return _fill(record, arch, stats[name], dynamic)


_POOL_SPECS: list[dict] = []  # what forked workers compile, by index (fork shares it, nothing pickled)


def _pool_record(task: tuple[int, int, str, str]) -> Record:
    index, arch_index, cuobjdump, tmpdir = task
    return triton_record(_POOL_SPECS[index], ARCHS[arch_index], cuobjdump, tmpdir)


def fork_pool(jobs: int, tasks: int):
    """A process pool for Triton compiles (about 1 s each), or None to compile serially.

    Create it before starting any thread: it forks its workers here, and they see _POOL_SPECS.
    """
    if jobs > 1 and tasks > 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork").Pool(min(jobs, tasks))
    return None


def triton_records(specs: list[dict], archs, cuobjdump: str, tmpdir: str, pool=None) -> list[Record]:
    # A spec with "archs" (arch names) is a configuration only those GPUs launch (e.g. an sm_90 table).
    tasks = [(i, ARCHS.index(arch), cuobjdump, tmpdir) for i in range(len(specs)) for arch in archs
             if arch.name in specs[i].get("archs", (arch.name,))]
    if pool is None:
        return [_pool_record(task) for task in tasks]
    return pool.map(_pool_record, tasks, chunksize=1)


def _spec_modules(files: list[Path] | None) -> list[tuple[str, object]]:
    """(label, module) for every module of fusedlm.kernels, or for the given .py files."""
    if files:
        modules = []
        for path in files:
            spec = importlib.util.spec_from_file_location(f"_gpu_report_specs_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules.append((path.name, module))
        return modules
    import fusedlm.kernels as package

    return [(f"kernels/{info.name}.py", importlib.import_module(f"{package.__name__}.{info.name}"))
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name)]


def triton_specs(files: list[Path] | None = None) -> tuple[list[dict], list[str]]:
    """All specs; a module with @triton.jit code and no static_report_specs() is a failure."""
    from triton.runtime.jit import JITFunction

    specs, failures = [], []
    for label, module in _spec_modules(files):
        provider = getattr(module, "static_report_specs", None)
        if provider is None:
            if any(isinstance(v, JITFunction) for v in vars(module).values()):
                failures.append(f"{label}: has Triton kernels but no static_report_specs()")
            continue
        for i, spec in enumerate(provider()):
            missing = {"kernel", "fn", "signature", "num_warps", "num_stages", "dtype", "config"} - set(spec)
            if missing:
                failures.append(f"{label}: spec {i} lacks {sorted(missing)}")
            else:
                specs.append(spec)
    return specs, failures


def _split_cuda_name(demangled: str) -> tuple[str, str, str]:
    """'void ns::k<float, 256>(float const*, int)' -> ('k', '<float, 256>', 'fp32')."""
    text = demangled.replace("(anonymous namespace)::", "")
    text = text[5:] if text.startswith("void ") else text
    depth, head = 0, text
    for i, ch in enumerate(text):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            head = text[:i]
            break
    lt = head.find("<")
    qualified, targs = (head[:lt], head[lt:]) if lt >= 0 else (head, "")
    dtype = next((CUDA_DTYPES[t] for t in re.findall(r"\w+", targs) if t in CUDA_DTYPES), "-")
    return qualified.split("::")[-1], targs or "-", dtype


def nvcc_cubin(nvcc: str, root: Path, source: Path, arch: Arch, out: str) -> str | None:
    """Build one cubin; returns None, or the error text."""
    num = arch.name[3:]
    cmd = [nvcc, *NVCC_FLAGS, "-I", str(root / "csrc"), f"-gencode=arch=compute_{num},code={arch.name}",
           "-cubin", "-o", out, str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines()[-3:]
    return " | ".join(lines[:3])[:300]


def start_cuda_builds(pool, nvcc: str, root: Path, sources: list[Path], archs, tmpdir: str) -> list:
    """Submit one nvcc build per (source, arch); returns the jobs cuda_records reads."""
    return [(src, arch, path, pool.submit(nvcc_cubin, nvcc, root, src, arch, path))
            for src in sources for arch in archs
            for path in [os.path.join(tmpdir, f"{src.stem}_{arch.name}.cubin")]]


def cuda_records(root: Path, jobs: list, cuobjdump: str) -> list[Record]:
    """jobs: (source, arch, cubin path, future of nvcc_cubin) in a fixed order."""
    records = []
    for source, arch, path, future in jobs:
        rel = source.relative_to(root).as_posix()
        marked = {n.strip(): m.group(1) for m in MARKER.finditer(source.read_text())
                  for n in m.group(2).split(",") if n.strip()}
        error = future.result()
        if error:
            records.append(Record(kernel=rel, backend="cuda", arch=arch.name, config="-", dtype="-", error=error))
            continue
        stats = analyse_cubin(cuobjdump, path)
        names = demangle(sorted(stats))
        seen = set()
        for mangled in sorted(stats, key=lambda n: names[n]):
            kernel, targs, dtype = _split_cuda_name(names[mangled])
            seen.add(kernel)
            record = Record(kernel=kernel, backend="cuda", arch=arch.name, config=targs, dtype=dtype,
                            uses_tensor_cores=kernel in marked, tensor_core_op=marked.get(kernel))
            records.append(_fill(record, arch, stats[mangled]))
        for kernel in sorted(set(marked) - seen):
            records.append(Record(kernel=kernel, backend="cuda", arch=arch.name, config="-", dtype="-",
                                  uses_tensor_cores=True,
                                  error=f"{rel} marks uses_tensor_cores {kernel} but its cubin has no such kernel"))
    return records


def check(records: list[Record]) -> list[str]:
    """One message per violation; pruned configurations are shown, not checked."""
    limits = {a.name: a for a in ARCHS}
    failures = []
    for r in records:
        if r.pruned:
            continue
        where = r.where()
        if r.error:
            failures.append(f"{where}: does not compile: {r.error}")
            continue
        if r.stack_bytes:
            failures.append(f"{where}: stack {r.stack_bytes} bytes per thread (local memory: a spill or a stack "
                            f"array, at {r.registers} registers); must be 0, or prune this configuration")
        arch = limits[r.arch]
        if r.shared_bytes > arch.smem_per_block:
            failures.append(f"{where}: shared memory {r.shared_bytes} bytes per block > {arch.smem_per_block} limit")
        want = r.tensor_core_op or arch.tensor_core_op
        if r.uses_tensor_cores and not r.tensor_core.get(want):
            failures.append(f"{where}: multiplies 16-bit matrices but its SASS has 0 {want} "
                            f"(tensor-core instructions: {r.tensor_core or 'none'})")
    return failures


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def markdown(records: list[Record], failures: list[str], toolchain: str) -> str:
    lines = [
        "# GPU static report",
        "",
        "Generated by `make gpu-report` (`python -m fusedlm.gpu_report`) without a GPU: each kernel compiled",
        "for sm_90a (occupancy on an H200) and sm_80 (an A100), read back with `cuobjdump`. It shows what",
        "the compiler emits (registers, spills, shared memory, tensor-core instructions); it is not a timing.",
        f"Toolchain: {toolchain}.",
        "",
        "| kernel | backend | arch | dtype | config | regs | stack B | smem KiB | tensor cores | threads | warps/SM | note |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in records:
        tc = ", ".join(f"{k} {v}" for k, v in r.tensor_core.items()) or "-"
        occ = "n/a" if r.occupancy_warps is None else f"{r.occupancy_warps}/64"
        note = r.error or (f"pruned: {r.pruned}" if r.pruned else "")
        lines.append(f"| {r.kernel} | {r.backend} | {r.arch} | {r.dtype} | {r.config.replace('|', '/')} | "
                     f"{'-' if r.registers is None else r.registers} | {'-' if r.stack_bytes is None else r.stack_bytes} | "
                     f"{_kib(r.shared_bytes)} | {tc} | {r.threads or 'n/a'} | {occ} | {note.replace('|', '/')} |")
    lines += ["", summary(records, failures), ""] + [f"- FAIL {m}" for m in failures] + [""] * bool(failures)
    if any(r.occupancy_warps is None and r.backend == "cuda" and not r.error for r in records):
        lines += ["warps/SM n/a: a CUDA kernel without `__launch_bounds__` does not record its block size.", ""]
    return "\n".join(lines)


def summary(records: list[Record], failures: list[str]) -> str:
    kernels = sorted({(r.backend, r.kernel) for r in records})
    parts = [f"{len(records)} records, {len(kernels)} kernels "
             f"({sum(b == 'triton' for b, _ in kernels)} Triton, {sum(b == 'cuda' for b, _ in kernels)} CUDA)"]
    for arch in ARCHS:
        rs = [r for r in records if r.arch == arch.name and r.registers is not None and not r.pruned]
        if rs:
            worst = max(rs, key=lambda r: r.registers)
            parts.append(f"worst registers {arch.name}: {worst.registers} ({worst.kernel} [{worst.config}] {worst.dtype})")
    pruned = sorted({f"{r.kernel} [{r.config}] {r.dtype}" for r in records if r.pruned})
    parts.append(f"pruned: {'; '.join(pruned) if pruned else 'none'}")
    parts.append("checks: passed" if not failures else f"checks: {len(failures)} FAILED")
    return "Summary: " + "; ".join(parts) + "."


def _toolchain(nvcc: str | None) -> str:
    import triton

    text = f"Triton {triton.__version__}"
    if nvcc:
        m = re.search(r"release ([\d.]+)", _run([nvcc, "--version"]))
        text += f", nvcc {m.group(1) if m else '?'}"
    return text


def _default_root() -> Path:
    import fusedlm.kernels as package

    for entry in package.__path__:
        if (Path(entry).parent / "csrc").is_dir():
            return Path(entry).parent
    return Path.cwd()


def build_report(root: Path, spec_files=None, cuda=True, archs=ARCHS, jobs=None) -> tuple[list[Record], list[str], str]:
    cuobjdump, nvcc = find_cuobjdump(), find_nvcc()
    if cuobjdump is None:
        return [], ["gpu_report: cuobjdump not found (Triton's wheel or $CUDA_HOME/bin carries it)"], ""
    sources = sorted((root / "csrc" / "cuda").glob("*.cu")) if cuda else []
    failures = []
    if sources and nvcc is None:
        failures.append(f"gpu_report: nvcc not found (set CUDA_HOME); cannot compile {len(sources)} csrc/cuda sources")
    specs, spec_failures = triton_specs(spec_files)
    failures += spec_failures
    jobs = jobs or os.cpu_count() or 1
    _POOL_SPECS[:] = specs
    procs = fork_pool(jobs, len(specs) * len(archs))
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_report_") as tmp, \
                concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as threads:
            # nvcc runs in threads (started after the fork) while Triton compiles.
            builds = start_cuda_builds(threads, nvcc, root, sources if nvcc else [], archs, tmp)
            records = triton_records(specs, archs, cuobjdump, tmp, procs)
            records += cuda_records(root, builds, cuobjdump)
    finally:
        _POOL_SPECS.clear()
        if procs is not None:
            procs.terminate()
    order = {a.name: i for i, a in enumerate(ARCHS)}
    records.sort(key=lambda r: (r.backend != "triton", r.kernel, r.dtype, r.config, order.get(r.arch, 9)))
    return records, failures + check(records), _toolchain(nvcc)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlm.gpu_report", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="repository root (holds csrc/ and benchmarks/)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: ROOT/benchmarks/results")
    parser.add_argument("--no-write", action="store_true", help="print only; write no files")
    parser.add_argument("--specs", type=Path, action="append", default=None, metavar="FILE.py",
                        help="take static_report_specs() from these files instead of fusedlm.kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip csrc/cuda")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = (args.root or (Path.cwd() if args.specs else _default_root())).resolve()
    records, failures, toolchain = build_report(root, args.specs, cuda=not args.no_cuda, jobs=args.jobs)
    text = markdown(records, failures, toolchain)
    print(text)
    if not args.no_write:
        out = args.out_dir or root / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_static.md").write_text(text)
        (out / "gpu_static.json").write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
        print(f"gpu_report: wrote {out / 'gpu_static.md'} and gpu_static.json")
    for message in failures:
        print(f"gpu_report: FAIL {message}", file=sys.stderr)
    print(f"gpu_report: {len(records)} records in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    # @triton.jit gives interpreter objects under TRITON_INTERPRET=1, which cannot be compiled
    # for a GPU: run again without it.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = dict(os.environ, TRITON_INTERPRET="0")
        os.execve(sys.executable, [sys.executable, "-m", "fusedlm.gpu_report", *sys.argv[1:]], env)
    sys.exit(main())
