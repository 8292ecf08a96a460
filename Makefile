# Each target bootstraps .venv on first use: torch==2.13.0 first, from PyTorch's CPU wheel index as well as PyPI
# (PyPI's Linux torch is the multi-GB CUDA build; the index's 2.13.0+cpu ranks above it; an unreachable index is
# retried once, then PyPI's build is taken). Only torch is looked up there; its dependencies come from PyPI.
# On a GPU machine: make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or your CUDA's).
PYTHON ?= python3
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 2

.PHONY: venv demo test test-fast bench lint clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps --retries 1 --timeout 30 torch==2.13.0 --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q torch==2.13.0  # its dependencies, from PyPI
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
