#!/usr/bin/env bash
# `make cuda-check`: hold the CUDA code to account on a machine without a GPU.
#
#  (a) every csrc/cuda/*.cu through nvcc for sm_80 and sm_90a, warnings as errors, with ptxas's
#      resource report: a table of registers, spills, stack and shared memory per kernel and
#      arch; any spill fails. Then the torch-free libraries through CMakeLists.txt.
#  (b) the whole extension built against the CUDA build of torch (its own venv, .venv-cuda,
#      installed once), from a copy of the source tree (an in-place build would replace the CPU
#      build's fusedlm/_C*.so); then, without a GPU, every fusedlm op with a CPU kernel must have
#      a CUDA kernel too.
#
# Environment: CUDA_HOME (default /usr/local/cuda), CUDA_TORCH_SPEC (default torch==2.14.1),
# CUDA_VENV (default .venv-cuda), MAX_JOBS (default 2), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=$CUDA_HOME/bin/nvcc
CUDA_VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
CUDA_TORCH_SPEC=${CUDA_TORCH_SPEC:-torch==2.14.1}
export MAX_JOBS=${MAX_JOBS:-2}
PYTHON=${PYTHON:-python3}
ARCHS=(80 90a)
# The macros torch's CUDAExtension passes, so that what compiles here compiles there.
TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "cuda-check: FAILED: $*" >&2; exit 1; }
[ -x "$NVCC" ] || fail "no nvcc at $NVCC (set CUDA_HOME)"

# ---- (a) nvcc + ptxas report ------------------------------------------------------------------
echo "== (a) nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'): csrc/cuda/*.cu for sm_80 and sm_90a, warnings as errors"
t_a=$SECONDS
shopt -s nullglob
CU_FILES=(csrc/cuda/*.cu)
[ ${#CU_FILES[@]} -gt 0 ] || fail "no csrc/cuda/*.cu files"
pids=()
for f in "${CU_FILES[@]}"; do
  for arch in "${ARCHS[@]}"; do
    log="$WORK/$(basename "$f" .cu).sm_$arch.log"
    # One job per file and arch (2 cores: two at a time keeps memory modest).
    ( "$NVCC" -std=c++17 -O3 --expt-relaxed-constexpr -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
        -Icsrc "${TORCH_NVCC_DEFINES[@]}" -gencode="arch=compute_$arch,code=sm_$arch" --resource-usage \
        -c "$f" -o "$WORK/$(basename "$f" .cu).sm_$arch.o" > "$log" 2>&1 || { echo "COMPILE_FAILED" >> "$log"; } ) &
    pids+=($!)
    if [ ${#pids[@]} -ge "$MAX_JOBS" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
done
wait
status=0
for log in "$WORK"/*.log; do
  if grep -q COMPILE_FAILED "$log"; then
    echo "--- $(basename "$log" .log): nvcc failed"; grep -v "^ptxas info\|bytes stack frame\|^COMPILE_FAILED" "$log" || true
    status=1
  fi
done
[ $status -eq 0 ] || fail "(a) nvcc errors above"

"$PYTHON" - "$WORK" <<'PY' || fail "(a) spills (see the table)"
"""Parse ptxas --resource-usage logs into a table; exit 1 if any kernel spills."""
import glob, os, re, shutil, subprocess, sys

rows = []
for log in sorted(glob.glob(os.path.join(sys.argv[1], "*.log"))):
    src = os.path.basename(log).split(".sm_")[0] + ".cu"
    cur = None
    for line in open(log):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = {"src": src, "mangled": m.group(1), "arch": m.group(2), "stack": 0, "st": 0, "ld": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["st"], cur["ld"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
            rows.append(cur)
            cur = None

filt = shutil.which("cu++filt") or shutil.which("c++filt")
names = [r["mangled"] for r in rows]
if filt and names:
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) == len(names):
        names = out
for r, name in zip(rows, names):
    name = name.replace("(anonymous namespace)::", "").replace("fusedlm::cuda::", "")
    name = re.sub(r"^void ", "", name)
    r["name"] = re.sub(r"\(.*\)$", "", name).replace("__nv_bfloat16", "bf16").replace("__half", "fp16")

if not rows:
    print("no kernels found in the ptxas output")
    sys.exit(1)
rows.sort(key=lambda r: (r["src"], r["name"], r["arch"]))
w = max(len(r["name"]) for r in rows)
print(f"{'file':<20} {'kernel':<{w}} {'arch':<7} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5} {'smem':>6}")
for r in rows:
    print(f"{r['src']:<20} {r['name']:<{w}} {r['arch']:<7} {r['regs']:>4} {r['st']:>8} {r['ld']:>8} {r['stack']:>5} {r['smem']:>6}")
spills = [r for r in rows if r["st"] or r["ld"]]
for r in spills:
    print(f"SPILL: {r['name']} on {r['arch']} ({r['src']}): {r['st']} bytes stored, {r['ld']} bytes loaded")
print(f"{len(rows)} kernels, {len({r['arch'] for r in rows})} archs, max {max(r['regs'] for r in rows)} registers, "
      f"{len(spills)} with spills")
sys.exit(1 if spills else 0)
PY

# The torch-free static libraries through CMake (what a native build or CI uses).
if command -v cmake > /dev/null; then
  cmake -S . -B "$WORK/cmake" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$NVCC" > "$WORK/cmake.log" 2>&1 \
    || { cat "$WORK/cmake.log"; fail "(a) cmake configure"; }
  cmake --build "$WORK/cmake" -j "$MAX_JOBS" >> "$WORK/cmake.log" 2>&1 || { cat "$WORK/cmake.log"; fail "(a) cmake build"; }
  echo "cmake: built $(cd "$WORK/cmake" && find . -name 'lib*.a' -printf '%f ' | sort)"
else
  echo "cmake: not installed, skipped (the nvcc check above covers the CUDA sources)"
fi
echo "(a) took $((SECONDS - t_a)) s"

# ---- (b) the extension against the CUDA build of torch ----------------------------------------
echo "== (b) fusedlm._C against $CUDA_TORCH_SPEC (CUDA), no GPU needed"
t_b=$SECONDS
VPY=$CUDA_VENV/bin/python
if [ ! -f "$CUDA_VENV/.ready" ]; then
  echo "creating $CUDA_VENV and installing $CUDA_TORCH_SPEC (about 5 GB, once)"
  [ -x "$VPY" ] || "$PYTHON" -m venv "$CUDA_VENV"
  "$VPY" -m pip install -q "$CUDA_TORCH_SPEC" ninja setuptools wheel numpy 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch in $CUDA_VENV is not a CUDA build')"
  touch "$CUDA_VENV/.ready"
fi
"$VPY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# A copy of the tracked and untracked (not ignored) source tree.
SRC=$WORK/src
mkdir -p "$SRC"
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' p; do [ -e "$p" ] && printf '%s\0' "$p"; done \
  | tar -c --null -T - | tar -x -C "$SRC"
t_build=$SECONDS
(cd "$SRC" && FUSEDLM_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0a" \
  "$VPY" -m pip install -v --no-build-isolation --no-deps . > "$WORK/build.log" 2>&1) \
  || { tail -60 "$WORK/build.log"; fail "(b) building the extension"; }
grep -o "fusedlm: building.*" "$WORK/build.log" | sort -u || true
echo "extension build: $((SECONDS - t_build)) s"

(cd "$WORK" && "$VPY" - <<'PY') || fail "(b) CUDA kernels missing"
import torch

import fusedlm
from fusedlm import dispatch

assert dispatch._C is not None, f"fusedlm._C did not load: {dispatch._C_ERROR}"
print("imported", fusedlm.__file__)
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedlm::"))
cpu_ops = [n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
if not cpu_ops:
    raise SystemExit("no fusedlm op has a CPU kernel: the extension registered nothing")
missing = []
for name in cpu_ops:
    has = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    print(f"  {name:<40} CPU yes  CUDA {'yes' if has else 'MISSING'}")
    if not has:
        missing.append(name)
if missing:
    raise SystemExit("ops with a CPU kernel but no CUDA kernel: " + ", ".join(missing))
print(f"{len(cpu_ops)} ops with CPU kernels, all with CUDA kernels")
PY
"$VPY" -m pip uninstall -q -y fusedlm > /dev/null 2>&1 || true  # the venv keeps torch only
echo "(b) took $((SECONDS - t_b)) s"
echo "cuda-check: OK"
