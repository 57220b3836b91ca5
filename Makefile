# fusedlm: `make test` and `make bench` bootstrap everything from a fresh clone
# (a venv, torch, the build), then run. `make cuda-check` and `make gpu-report` hold the GPU
# code to account without a GPU.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2
DEV_PKGS := "triton>=3.2" ninja numpy pytest pytest-benchmark hypothesis transformers matplotlib tqdm setuptools wheel
SOURCES := setup.py $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: test bench bench-full build cuda-check gpu-report gpu-report-triton36 clean

# The venv: keeps an importable torch (a system one is reused through system site-packages),
# otherwise installs $(TORCH_SPEC), the CPU build here.
$(VENV)/.ready: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "fusedlm: reusing the importable torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(VPY) -m pip install -q $(TORCH_SPEC); \
	fi
	$(VPY) -m pip install -q $(DEV_PKGS)
	touch $@

$(VENV)/.built: $(VENV)/.ready $(SOURCES)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(VPY) -c "import fusedlm, fusedlm.dispatch as d; assert d._C is not None, d._C_ERROR; print('fusedlm: built;', fusedlm.available_backends())"
	touch $@

build: $(VENV)/.built

# Tests: the C++ CPU kernels, and the Triton kernels in the interpreter (pytest exit 5, no tests, fails too).
test: $(VENV)/.built
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -ra tests

bench: $(VENV)/.built
	$(VPY) -m fusedlm bench

bench-full: $(VENV)/.built
	$(VPY) -m fusedlm bench --full

cuda-check:
	bash scripts/cuda_check.sh

gpu-report: $(VENV)/.built
	$(VPY) -m fusedlm.gpu_report

# the same report as Triton 3.6 (the H200 machine's release) compiles it; prints only
gpu-report-triton36: $(VENV)/.built
	PYTHON=$(VPY) bash scripts/gpu_report_triton.sh 3.6.0

clean:
	rm -rf build *.egg-info python/fusedlm/*.so $(VENV)/.built
