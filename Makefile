# Two commands for a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU build that pip finds on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# A second environment with torchvision, where vision-language models use their checkpoint's
# own processor; here torchvision means torch 2.14.1, a 5.5 GB CUDA build, so it stays out of
# the default install and only `make test-torchvision` builds it.
TV_VENV := .venv-torchvision
TV_TORCH ?= torch==2.14.1 torchvision==0.29.1
# What runs there: the processor parity tests and the vision-language policy, pipeline and diagnose.
TV_TESTS := tests/multimodal tests/backends/test_vl.py tests/e2e/test_vision_language.py tests/evaluation/test_diagnose.py

$(BIN)/copd: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,math,lora,data,models,video,ray]"
	touch $@

setup: $(BIN)/copd

$(TV_VENV)/bin/copd: pyproject.toml
	$(PY) -m venv $(TV_VENV)
	$(TV_VENV)/bin/pip install -q --upgrade pip
	$(TV_VENV)/bin/pip install -q $(TV_TORCH)
	$(TV_VENV)/bin/pip install -q -e ".[dev,lora,video]"
	touch $@

demo: setup
	$(BIN)/copd demo

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-torchvision: $(TV_VENV)/bin/copd
	$(TV_VENV)/bin/python -m pytest -m "not slow" $(TV_TESTS)

bench: setup
	$(BIN)/python benchmarks/speed.py

.PHONY: setup demo test test-torchvision bench
