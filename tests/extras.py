"""Tests that need an optional extra skip, naming the install, where it is missing."""

import importlib.util
import os
from pathlib import Path

import pytest

# The module each optional extra of pyproject.toml brings, and the extra's name.
EXTRA_OF = {"math_verify": "math", "peft": "lora", "datasets": "data", "gguf": "models", "av": "video", "ray": "ray",
            "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def reason(module: str) -> str:
    extra = EXTRA_OF[module]
    return f"needs copd[{extra}] ({module} is not installed): pip install -c constraints.txt -e '.[{extra}]'"


def needs(module: str) -> pytest.MarkDecorator:
    """Mark a test (or a pytest.param) that needs the extra bringing `module`."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=reason(module))


def require(module: str):
    """Import `module` for a test module or a test, or skip it, naming the extra."""
    return pytest.importorskip(module, reason=reason(module))


# The interpreter of vLLM's own environment (`make vllm` builds .venv-vllm); COPD_VLLM_PYTHON names another.
VLLM_PYTHON = os.environ.get("COPD_VLLM_PYTHON") or str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python")


def require_vllm() -> str:
    """The interpreter of an environment with vLLM, or skip the test, saying how to build one."""
    if not Path(VLLM_PYTHON).is_file():
        pytest.skip(f"needs vLLM's environment ({VLLM_PYTHON} is missing): make vllm")
    return VLLM_PYTHON
