# Both targets install what they need into .venv from nothing but Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The exact versions the tests run against. pyproject.toml gives ranges (what `pip install .` accepts);
# tests/test_packaging.py checks that they admit these. Changing one here reinstalls on the next make.
TORCH_VERSION := 2.13.0
TRANSFORMERS_VERSION := 5.17.0
PEFT_VERSION := 0.21.2
XGRAMMAR_VERSION := 0.2.8
# the merge parity tests (tests/test_merge.py) compare `slm merge` with mergekit's results; it pulls no torch
MERGEKIT_VERSION := 0.1.5
# `slm data clean`'s near-dup removal (the `clean` extra) and its tests; pulls no torch
DATASKETCH_VERSION := 2.0.0

.PHONY: run test install lint bench clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on this machine's disk, not a multi-GB CUDA download
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]' torch==$(TORCH_VERSION) transformers==$(TRANSFORMERS_VERSION) peft==$(PEFT_VERSION) mergekit==$(MERGEKIT_VERSION) datasketch==$(DATASKETCH_VERSION)
	# xgrammar (the `constrained` extra) without its GPU-only triton requirement: of its other needs slmkit's
	# dependencies hold all but apache-tvm-ffi
	$(BIN)/python -m pip install --quiet 'apache-tvm-ffi>=0.1.11'
	$(BIN)/python -m pip install --quiet --no-deps xgrammar==$(XGRAMMAR_VERSION)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/slm quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generate_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
