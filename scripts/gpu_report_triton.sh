#!/usr/bin/env bash
# The GPU static report as another Triton release compiles it: `bash scripts/gpu_report_triton.sh
# [VERSION] [gpu_report options]` (default 3.6.0, the release on the H200 machine the kernels are tuned
# for; the report in benchmarks/results is the installed release's). Register allocation differs between
# releases (a tile clean with one can spill with the other), so the tables are checked with both; the few
# entries that differ by release are chosen at import from triton.__version__. Installs the release once
# into .triton-VERSION (ignored by git, no dependencies) and puts it ahead of the installed one; prints
# the table and the failures, writes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-3.6.0}
shift || true
PYTHON=${PYTHON:-.venv/bin/python}
DIR=.triton-$VERSION
if [ ! -d "$DIR/triton" ]; then
  "$PYTHON" -m pip install -q --no-deps --target "$DIR" "triton==$VERSION"
fi
PYTHONPATH="$PWD/$DIR:$PWD/python${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m fusedlm.gpu_report --no-write "$@"
