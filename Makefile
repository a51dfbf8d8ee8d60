# Developer entry points. `make test` is what CI runs (through .ci/run).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all install test lint typecheck pytest unit demo bench clean

all: test

# A clear message instead of a pip resolver error when the interpreter is too old or missing.
$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
		echo "error: '$(PYTHON)' not found. fleet needs Python >= 3.11: install it, then run" \
		     "'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { \
		echo "error: fleet needs Python >= 3.11, but $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
		     "Install Python 3.11 or newer, then run 'make PYTHON=python3.11 demo' (or 'test')."; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
		echo "error: $(PYTHON) cannot create virtual environments (no venv/ensurepip);" \
		     "on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy orchestrator device_sim

# The whole suite; e.g. make pytest PYTEST_ARGS='-k "postgres or external"'
pytest: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# Fast subset: no real servers, nothing slow.
unit: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m 'not integration and not slow' $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/fleet up --simulate 100 --demo

bench: $(STAMP)
	@set -e; for f in benchmarks/[a-z]*.py; do echo "== $$f"; $(BIN)/python "$$f"; done

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
