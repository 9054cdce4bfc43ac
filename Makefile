# Everything a newcomer or CI runs. Python tools live in one venv outside the
# clone ($(VENV)), created on first use and reused afterwards, because torch is
# a multi-GB install.
VENV ?= $(HOME)/.cache/radixseg/venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: install demo test test-python test-rust lint loom ci bench fuzz-check

# Create the venv and install what is missing; a no-op when all is present.
$(VENV)/.radixseg-deps: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch, numpy, hypothesis, pytest, maturin, mypy, ruff" 2>/dev/null \
	  || $(PY) -m pip install -q "torch>=2.4" "numpy>=1.24" "hypothesis>=6.100" "pytest>=8" \
	       "maturin>=1.7,<2" "mypy>=1.10" "ruff>=0.5"
	touch $@

install: $(VENV)/.radixseg-deps
	maturin develop --release --quiet

demo: install
	radixseg demo

test: install test-python test-rust

test-python:
	$(PY) -m pytest $(PYTEST_ARGS)

test-rust:
	cargo test --workspace

lint: install
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	ruff check python tests benchmarks
	ruff format --check python tests benchmarks
	mypy
	$(PY) -m mypy.stubtest radixseg._core

loom:
	bash scripts/loom.sh

ci: test lint loom
