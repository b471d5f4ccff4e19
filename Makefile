# Both targets install what they need into .venv from nothing but Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=python3" >&2; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on this machine's disk, not a multi-GB CUDA download
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# xgrammar without its GPU-only triton requirement (its CPU needs are in pyproject's dependencies)
	$(BIN)/python -m pip install --quiet --no-deps 'xgrammar==0.2.8'
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
