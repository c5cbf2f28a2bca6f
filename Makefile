# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtualenv in $(VENV) and install the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned to the CPU wheel this machine carries; the package itself accepts 2.11-2.14.
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/train_llama.py

# Lint first (seconds), then the default test suite (slow end-to-end runs are deselected).
test: $(STAMP)
	$(PY) -m ruff check lowrank_compile tests examples benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -n auto -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check lowrank_compile tests examples benchmarks
	$(PY) -m ruff format --check lowrank_compile
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
