# cbstore: the two commands a new user runs, plus the benchmark.
#   make demo   create .venv, install, run synth -> build -> encode -> fuse -> comparison table
#   make test   create .venv, install, run the test suite
#   make bench  performance benchmarks (by hand; not part of make test)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: demo test bench clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project metadata changes (idempotent).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m cli.demo --out $(DEMO)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean-demo:
	rm -rf $(DEMO)
