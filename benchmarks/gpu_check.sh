#!/usr/bin/env bash
# GPU check for a machine with a CUDA GPU and no network, in about 8 minutes:
#   1. build the extension with the machine's torch and triton (pip install --no-build-isolation --no-deps -e .)
#   2. the GPU tests: pytest -m "gpu or triton" over tests/, then tests/test_layer_norm.py in full
#      (Triton on the GPU, not the interpreter)
#   3. the GPU benchmarks: fusedlm bench --device cuda (layer_norm at 8192x768 and 32768x4096, fp32 and bf16)
# Usage: benchmarks/gpu_check.sh OUTDIR
# OUTDIR receives one log per stage, bench/ (the JSON, PNG and markdown results) and summary.txt;
# the summary is printed last. Reads the GPU (nvidia-smi queries only) and never changes its settings.
# Environment: PYTHON (default python), GPU_CHECK_BUDGET_S (default 470: every stage's time box is cut
# to what is left of it), MAX_JOBS (default: the CPU count).
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT/bench" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
T0=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
unset TRITON_INTERPRET
STAGES=()
FAILED=0  # the exit status: 1 when a stage after env failed, timed out or had no time left

# stage NAME LIMIT_S CMD...: runs CMD with its output in OUT/NAME.log, time-boxed by LIMIT_S and the budget.
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    echo "gpu_check: $name skipped, the ${BUDGET} s budget is spent" | tee "$OUT/$name.log"
    STAGES+=("$name|skipped|0|no time left"); FAILED=1; return 1
  fi
  echo "gpu_check: $name (time box ${limit} s), log $OUT/$name.log"
  local start rc note
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  # pytest's closing line, e.g. "12 passed, 3 skipped in 4.20s"
  note=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$OUT/$name.log" | tail -n 1 | tr -d '=')
  (( rc == 124 || rc == 137 )) && note="timed out after ${limit} s; $note"
  STAGES+=("$name|$rc|$(( $(date +%s) - start ))|$note")
  [[ $name != env && $rc != 0 ]] && FAILED=1
  tail -n 3 "$OUT/$name.log"
  return $rc
}

stage env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  | sed "s/^/gpu: /"; echo "cpus: $(nproc)"; "$0" -c "import sys, torch, importlib.metadata as m
print(\"versions: python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"triton\", m.version(\"triton\"))"' "$PY"

if stage build 300 bash -c "set -o pipefail; time $PY -m pip install -v --no-build-isolation --no-deps -e . && \
    $PY -c 'import fusedlm, fusedlm.dispatch as d; assert d._C is not None, d._C_ERROR; print(\"backends\", fusedlm.available_backends())'"; then
  stage tests_gpu 150 "$PY" -m pytest -q -ra tests -m "gpu or triton"
  stage test_layer_norm 100 "$PY" -m pytest -q -ra tests/test_layer_norm.py
  stage bench 300 "$PY" -m fusedlm bench --device cuda --out "$OUT/bench"
else
  echo "gpu_check: the build failed; tests and benchmarks skipped (see $OUT/build.log)"
fi

{
  echo
  echo "=== gpu_check summary ($(( $(date +%s) - T0 )) s) ==="
  grep -E '^(gpu|cpus|versions): ' "$OUT/env.log" 2>/dev/null
  grep -E '^real' "$OUT/build.log" 2>/dev/null | sed 's/^real/build time/'
  printf '%-16s %-8s %-6s %s\n' stage rc seconds result
  for s in "${STAGES[@]}"; do IFS='|' read -r n rc sec note <<< "$s"; printf '%-16s %-8s %-6s %s\n' "$n" "$rc" "$sec" "$note"; done
  "$PY" - "$OUT/bench/layer_norm.cuda.json" <<'EOF' 2>/dev/null || echo "no benchmark results"
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"benchmark ({'complete' if doc['complete'] else 'INCOMPLETE'}) on {doc['machine']['device_name']}: "
      "fusedlm vs baseline (median ms, x = baseline/this, GB/s)")
rows = [r for r in doc["rows"] if r["provider"].startswith("fusedlm[") and r["mode"] != "backward"]
for r in rows:
    shape = "x".join(map(str, r["shape"]))
    if r["median_ms"] is None:
        print(f"  {r['variant']:<10} {shape:<10} {r['dtype']:<9} {r['provider']:<16} {r['mode']:<17} FAILED {r['error'][:60]}")
        continue
    print(f"  {r['variant']:<10} {shape:<10} {r['dtype']:<9} {r['provider']:<16} {r['mode']:<17} "
          f"{r['median_ms']:8.3f} ms {r['ratio'] or 0:5.2f}x {r['gbps'] or 0:7.0f} GB/s {('(!) ' + r['error'][:50]) if r['error'] else ''}")
EOF
} | tee "$OUT/summary.txt"
exit $FAILED
