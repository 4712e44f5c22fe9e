# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# The venv is created once and reinstalled only when pyproject.toml changes.

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
# This exact pin takes the CPU build that lies on this machine's disk; a looser
# pin would let pip pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint bench-collectives clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PIN)
	$(VENV)/bin/python -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/thrifty demo

# The checks that need no run come first: lint, format, then the layer contracts of
# pyproject.toml ([tool.importlinter]). pytest exits 5 when it collects no tests; we let
# that fail the build.
test: lint
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench-collectives: $(STAMP)
	$(VENV)/bin/thrifty bench collectives

clean-venv:
	rm -rf $(VENV)
