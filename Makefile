# Two commands for a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU build that pip finds on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/copd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,math,lora,data,models,video,ray]"
	touch $@

setup: $(BIN)/copd

demo: setup
	$(BIN)/copd demo

test: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python benchmarks/speed.py

.PHONY: setup demo test bench
