# `make test` and `make bench` set up everything from a fresh machine: a virtual environment, the
# dependencies, the native build (CPU kernels always, CUDA kernels when nvcc is found), then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
BENCH_ARGS ?=
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.prefkern-built
SOURCES := $(shell find csrc kernels pyengine -type f -not -path '*/__pycache__/*' 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: test bench env build wheel clean

env: $(DEPS)

$(DEPS):
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install --quiet "$(TRITON_SPEC)"
	$(PIP) install --quiet "scikit-build-core>=0.10" "nanobind>=2.4" numpy pytest hypothesis matplotlib transformers
	# optional peer for the Liger-compatibility tests and the benchmark baseline (its deps are torch + triton)
	$(PIP) install --quiet --no-deps "liger-kernel==0.8.5"
	# optional peers for the TRL integration tests (prefkern.integrations.trl, compat.liger.patch_trl)
	$(PIP) install --quiet "trl==1.16.0" "accelerate==1.15.0" "datasets==5.2.0" "peft==0.21.2"
	touch $@

build: $(BUILT)

$(BUILT): $(DEPS) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps .
	$(PY) -m prefkern info
	touch $@

test: build
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

wheel: $(DEPS)
	$(PIP) wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist $(VENV)
