#!/usr/bin/env bash
# GPU check for a machine with a CUDA GPU and no network, in about 9 minutes:
#   1. build the extension with the machine's torch and triton (pip install --no-build-isolation --no-deps -e .)
#   2. the GPU tests, one pytest per op file group (and one for the whole model) IN PARALLEL (Triton compiles on the CPU cores, the GPU
#      work is small): the tests marked "gpu" or "triton", which run the CUDA C++ and the Triton
#      kernels on the GPU (not the interpreter), plus any GPU-only test files
#   3. the GPU benchmarks, one op after another (alone on the GPU): fusedlm bench --device cuda --ops OP
#   4. diagnostics: the Triton attention backward's tiles timed against each other
#      (python -m fusedlm.benchmarks.attention_tiles), the host time per call on tiny inputs
#      (python -m fusedlm.benchmarks.overhead), then the kernel-time breakdown of the ops that miss
#      their targets (python -m fusedlm.benchmarks.profile); none counts towards the exit status
# Usage: benchmarks/gpu_check.sh OUTDIR
# OUTDIR receives one log per stage, bench/ (the JSON and markdown results) and summary.txt; the summary
# is printed last. Reads the GPU (nvidia-smi queries only) and never changes its settings.
# Environment: PYTHON (default python), GPU_CHECK_BUDGET_S (default 540: every stage's time box is cut
# to what is left of it), MAX_JOBS (default: the CPU count), GPU_CHECK_OPS (the benchmarked ops, in order),
# GPU_CHECK_PROFILE_OPS (the profiled ops), GPU_CHECK_SKIP (providers left out of the benchmarks, default
# "compile,SDPA[math]": their compile time or slowness does not fit the time box; `fusedlm bench --device
# cuda` alone runs them).
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT/bench" "$OUT/stages" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
T0=$(date +%s)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

# stage NAME LIMIT_S CMD...: runs CMD with its output in OUT/NAME.log, time-boxed by LIMIT_S and what is
# left of the budget; writes its summary row to OUT/stages/NAME (so that stages may run in the background).
stage() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  (( limit > left )) && limit=$left
  if (( limit < 10 )); then
    echo "gpu_check: $name skipped, the ${BUDGET} s budget is spent" | tee "$OUT/$name.log"
    echo "$name|skipped|0|no time left" > "$OUT/stages/$name"; return 1
  fi
  echo "gpu_check: $name (time box ${limit} s), log $OUT/$name.log"
  local start rc note
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  # pytest's closing line, e.g. "12 passed, 3 skipped in 4.20s"
  note=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$OUT/$name.log" | tail -n 1 | tr -d '=')
  (( rc == 124 || rc == 137 )) && note="timed out after ${limit} s; $note"
  echo "$name|$rc|$(( $(date +%s) - start ))|$note" > "$OUT/stages/$name"
  return $rc
}

stage env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
  | sed "s/^/gpu: /"; echo "cpus: $(nproc)"; "$0" -c "import sys, torch, importlib.metadata as m
print(\"versions: python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"triton\", m.version(\"triton\"))"' "$PY"

# pytest over the given files (those that exist): the tests marked "gpu" (CUDA C++ kernels, GPU-only
# files) or "triton" (on a GPU, compiled, not interpreted). -p no:cacheprovider: keep the tree clean.
# The first argument is a worker count: above 1, and with pytest-xdist installed, the files run in that many
# processes (-n), since the Triton compiles, not the GPU, take the time (the layernorm_mlp stage ran past
# 150 s in one process on 2026-11-30).
gpu_tests() {
  local workers=$1 files=() par=() f
  shift
  for f in "$@"; do [[ -f $f ]] && files+=("$f"); done
  (( ${#files[@]} )) || { echo "no test files among: $*"; return 0; }
  (( workers > 1 )) && "$PY" -c "import xdist" 2>/dev/null && par=(-n "$workers")
  "$PY" -m pytest -q -ra -p no:cacheprovider "${par[@]}" -m "gpu or triton" "${files[@]}"
}
export -f gpu_tests; export PY

if stage build 240 bash -c "set -o pipefail; time $PY -m pip install -v --no-build-isolation --no-deps -e . && \
    $PY -c 'import fusedlm, fusedlm.dispatch as d; assert d._C is not None, d._C_ERROR; print(\"backends\", fusedlm.available_backends())'"; then
  # workers per stage: about the CPU count in all (16 on the H200 machine)
  stage t_attention 200 bash -c 'gpu_tests 4 tests/test_attention.py tests/test_attention_cuda.py' &
  stage t_layernorm_mlp 200 bash -c 'gpu_tests 6 tests/test_layernorm_mlp.py tests/test_layernorm_mlp_triton.py' &
  stage t_softmax_output 150 bash -c 'gpu_tests 2 tests/test_softmax_output.py tests/test_lm_head.py' &
  stage t_layer_norm 150 bash -c 'gpu_tests 2 tests/test_layer_norm.py' &
  stage t_model 150 bash -c 'gpu_tests 1 tests/test_model.py' &
  wait
  export FUSEDLM_LOG_TUNING=1  # the Triton attention forward prints the tile its tuner keeps per shape class
  for op in ${GPU_CHECK_OPS:-attention layernorm_mlp softmax_output lm_head layer_norm gpt}; do
    "$PY" -c "import sys; from fusedlm.benchmarks import OPS; sys.exit(sys.argv[1] not in OPS)" "$op" || continue
    case $op in attention) box=70;; layernorm_mlp|gpt) box=60;; softmax_output) box=80;; *) box=40;; esac
    stage "bench_$op" "$box" "$PY" -m fusedlm bench --device cuda --ops "$op" --dtypes bfloat16 --repeats 30 --no-plots \
      --skip "${GPU_CHECK_SKIP-compile,SDPA[math]}" --out "$OUT/bench"
  done
  # the attention backward's static tiles against their neighbours (kernels/attention.py _GPU_FAMILY)
  stage tiles 60 "$PY" -m fusedlm.benchmarks.attention_tiles
  # host time per call on tiny inputs (seconds): what mid-sized GPU calls pay besides their kernels
  stage overhead 60 "$PY" -m fusedlm.benchmarks.overhead --device cuda --reps 200
  # where the time goes in the ops that miss their GPU targets (kernel times under torch.profiler)
  stage profile 45 "$PY" -m fusedlm.benchmarks.profile --device cuda --dtypes bfloat16 --top 6 \
    --ops "${GPU_CHECK_PROFILE_OPS:-layernorm_mlp,softmax_output,attention}"
else
  echo "gpu_check: the build failed; tests and benchmarks skipped (see $OUT/build.log)"
fi

{
  echo
  echo "=== gpu_check summary ($(( $(date +%s) - T0 )) s) ==="
  grep -E '^(gpu|cpus|versions): ' "$OUT/env.log" 2>/dev/null
  grep -E '^real' "$OUT/build.log" 2>/dev/null | sed 's/^real/build time/'
  printf '%-20s %-8s %-6s %s\n' stage rc seconds result
  for f in env build t_attention t_layernorm_mlp t_softmax_output t_layer_norm t_model $(cd "$OUT/stages" && ls bench_* 2>/dev/null) tiles overhead profile; do
    [[ -f $OUT/stages/$f ]] || continue
    IFS='|' read -r n rc sec note < "$OUT/stages/$f"
    printf '%-20s %-8s %-6s %s\n' "$n" "$rc" "$sec" "$note"
  done
  for f in "$OUT"/t_*.log; do grep -E '^(FAILED|ERROR) ' "$f" | head -n 8 | cut -c1-200; done
  grep -h '^fusedlm attention forward' "$OUT"/bench_attention.log 2>/dev/null | head -n 16 | cut -c1-220
  [[ -f $OUT/tiles.log ]] && grep -E '^(attention backward|kernel|dkdv|dq) ' "$OUT/tiles.log" | cut -c1-160
  [[ -f $OUT/overhead.log ]] && grep -E '^\| [a-z_]+ \(' "$OUT/overhead.log" | cut -c1-130
  [[ -f $OUT/profile.log ]] && grep -vE '^\s*$|USDT|^(WARNING|STAGE)' "$OUT/profile.log" | head -n 90 | cut -c1-130
  "$PY" - "$OUT/bench" <<'EOF' 2>/dev/null || echo "no benchmark results"
import json, pathlib, sys
# forward+backward (or forward for forward-only ops): every fusedlm provider and the baseline, per case
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.cuda.json")):
    doc = json.load(open(path))
    print(f"{path.stem} ({'complete' if doc['complete'] else 'INCOMPLETE'}): median ms, x = baseline/this, peak MB")
    modes = {r["mode"] for r in doc["rows"]}
    mode = "forward+backward" if "forward+backward" in modes else "forward"
    for r in doc["rows"]:
        if r["mode"] != mode or not (r["provider"].startswith("fusedlm[") or r["provider"] == r.get("baseline")):
            continue
        shape = "x".join(map(str, r["shape"]))
        ms = "FAILED " + (r.get("error") or "")[:50] if r["median_ms"] is None else f"{r['median_ms']:9.3f} ms"
        peak = r.get("peak_bytes")
        print(f"  {r['variant'][:12]:<12} {shape:<22} {r['dtype']:<9} {r['provider'][:24]:<24} {mode[:8]} {ms} "
              f"{(r.get('ratio') or 0):5.2f}x {'' if peak is None else f'{peak / 2**20:8.0f} MB'}")
EOF
} | tee "$OUT/summary.txt"
# exit 1 when a stage after env failed, timed out or had no time left (tiles, overhead and profile are
# diagnostics)
for f in "$OUT"/stages/*; do
  IFS='|' read -r n rc _ < "$f"
  [[ $n != env && $n != tiles && $n != overhead && $n != profile && $rc != 0 ]] && exit 1
done
exit 0
