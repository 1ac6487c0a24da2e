# Two commands for a fresh machine with Python 3.11+:  make serve  |  make test
PYTHON ?= python3
VENV ?= .venv
# The torch build to install when the venv has none; override e.g. TORCH='torch==2.5.1'.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: serve test lint bench clean

serve: $(VENV)/.installed-serve  ## run the service on the shipped models (127.0.0.1:8000)
	$(BIN)/vae-serve

test: $(VENV)/.installed-test  ## lint, type-check and run the whole test suite
	bash scripts/test-tools.sh
	$(BIN)/ruff check service train tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-bench  ## measure the ceiling and the service (see bench/README.md)
	$(BIN)/python -m bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and on its own: a pinned local build where there is one, never a surprise download.
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	touch $@

$(VENV)/.installed-serve: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -e ".[bench,train]"
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
