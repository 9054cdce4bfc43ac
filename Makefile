# Everything a newcomer or CI runs. Python tools live in one venv outside the
# clone ($(VENV)), created on first use and reused afterwards, because torch is
# a multi-GB install.
VENV ?= $(HOME)/.cache/radixseg/venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: install demo test test-python test-rust test-aarch64 lint loom ci bench bench-venv fuzz-check fuzz-smoke

# Create the venv and install what is missing; a no-op when all is present.
# SGLang (the peer the SGLang adapter test and the benchmarks compare with) goes
# in without its GPU serving stack: --no-deps plus what its cache modules import.
$(VENV)/.radixseg-deps: pyproject.toml benchmarks/requirements-bench.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch, numpy, hypothesis, pytest, maturin, mypy, ruff" 2>/dev/null \
	  || $(PY) -m pip install -q "torch>=2.4" "numpy>=1.24" "hypothesis>=6.100" "pytest>=8" \
	       "maturin>=1.7,<2" "mypy>=1.10" "ruff>=0.5"
	$(PY) -c "import importlib.util as u, orjson, pybase64, msgspec, zmq; assert u.find_spec('sglang')" 2>/dev/null \
	  || ($(PY) -m pip install -q --no-deps "sglang==0.5.23" \
	      && $(PY) -m pip install -q -r benchmarks/requirements-bench.txt)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q "matplotlib>=3.7"
	$(PY) -c "import transformers" 2>/dev/null || $(PY) -m pip install -q "transformers==5.24.0"
	touch $@

# A second venv for one benchmark peer: SGLang's Rust tree core (the tree behind
# its default UnifiedRadixCache) loads only with torch 2.11-2.14 and Python 3.11,
# so benchmarks/_sglang_rust.py runs it from here (bench_radix.py calls it through
# a subprocess). Pins: benchmarks/requirements-bench-venv.txt. A no-op when present.
BENCH_VENV ?= $(HOME)/.cache/radixseg/bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_PYTHON ?= python3.11

$(BENCH_VENV)/.radixseg-bench-deps: benchmarks/requirements-bench-venv.txt benchmarks/requirements-bench.txt
	test -x $(BENCH_PY) || $(BENCH_PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -c "import torch, numpy, tvm_ffi, orjson, pybase64, msgspec, zmq; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
	  || $(BENCH_PY) -m pip install -q -r benchmarks/requirements-bench-venv.txt
	$(BENCH_PY) -c "import importlib.util as u; assert u.find_spec('sglang')" 2>/dev/null \
	  || $(BENCH_PY) -m pip install -q --no-deps "sglang==0.5.23"
	$(BENCH_PY) benchmarks/_sglang_rust.py --probe
	touch $@

bench-venv: $(BENCH_VENV)/.radixseg-bench-deps

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
	ruff check python tests benchmarks scripts
	ruff format --check python tests benchmarks scripts
	mypy
	$(PY) -m mypy.stubtest radixseg._core

loom:
	bash scripts/loom.sh

# The Rust core cross-built for AArch64 (the NEON decode path), its unit tests
# run under qemu-user; installs the target, cross linker and qemu if missing.
test-aarch64:
	bash scripts/test-aarch64.sh

# The fuzz crate is its own workspace (fuzz/Cargo.toml, target in fuzz/target).
# fuzz-check builds, formats and lints it and replays its committed seeds plus
# a batch of random inputs without instrumentation (stable, no cargo-fuzz).
fuzz-check:
	cargo check --manifest-path fuzz/Cargo.toml --all-targets
	cargo fmt --manifest-path fuzz/Cargo.toml --check
	cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
	cargo test --release --manifest-path fuzz/Cargo.toml

# A short coverage-guided run of each target (libFuzzer, stable; see
# scripts/fuzz.sh and RELIABILITY.md). FUZZ_SMOKE_MINUTES per target.
FUZZ_SMOKE_MINUTES ?= 0.5
fuzz-smoke:
	bash scripts/fuzz.sh allocator $(FUZZ_SMOKE_MINUTES)
	bash scripts/fuzz.sh tree $(FUZZ_SMOKE_MINUTES)

ci: test lint loom fuzz-check fuzz-smoke
