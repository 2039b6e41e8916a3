# The two commands a newcomer needs (README.md):
#   make demo   set up .venv and run the demo pipeline on the embedded digits data
#   make test   set up .venv and run the whole test suite (what CI runs)
# Optional:
#   make docs   install the docs extra (mkdocs, mkdocs-material) and build docs/ with --strict into site/
#
# The CPU build of torch is pinned so that no CUDA download happens.  Where pip does not already find
# the CPU wheel (this project's machines do), pass its index, e.g.
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeguard-installed
DOCS_STAMP := $(VENV)/.edgeguard-docs-installed

.PHONY: setup demo test test-fast bench lint docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/edgeguard pipeline --config configs/demo.yaml --out runs/demo --json runs/demo/result.json

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/bench_runtimes.py

lint: setup
	$(VENV)/bin/ruff check edgeguard tests benchmarks

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: setup $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf runs .pytest_cache site
