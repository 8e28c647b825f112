"""The GPU example configs (Qwen3-VL-4B, the paper's settings) validate, and their code path runs on a tiny Qwen3-VL.

Only the scale changes: the model, batch sizes, lengths and devices are overridden; the
branches, capabilities, topology, LoRA, vision settings and (for the three-branch run) the
Ray backend are the configs' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from copd.config.loader import load_config
from copd.driver.pipeline import run_training
from tests.extras import needs, require

GPU = Path(__file__).resolve().parents[2] / "examples" / "gpu"
TINY = ["model.path=null", "model.dtype=float32", "model.compute_dtype=float32",
        "model.tiny={architecture: qwen3_vl, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, "
        "vision_hidden_size: 16}", "warmup.enabled=false", "lora.r=4", "lora.alpha=8",
        "rl.prompts_per_step=2", "rl.rollouts_per_prompt=2", "opd.prompts_per_step=2", "opd.rollouts_per_prompt=2",
        "sampling.max_new_tokens=4", "schedule.cycles=1", "schedule.rl_steps=1", "schedule.opd_steps=1",
        "eval.samples=2", "eval.batch_size=2", "run.device=cpu", "resources.cpus_per_branch=0.5",
        "resources.gpus_per_branch=0", "resources.branches={}"]


@pytest.mark.parametrize("name", ["qwen3_vl_two_branches.yaml", "qwen3_vl_three_branches.yaml"])
def test_the_paper_settings_validate(name):
    config = load_config(GPU / name)
    assert config.model.path == "/models/Qwen3-VL-4B-Instruct" and config.model.compute_dtype == "bfloat16"
    assert (config.optim.lr, config.rl.prompts_per_step, config.rl.rollouts_per_prompt) == (1e-6, 256, 8)
    assert (config.rl.eps_low, config.rl.eps_high, config.sampling.temperature) == (0.2, 0.28, 1.0)
    assert config.schedule.rl_steps / config.schedule.opd_steps == 1.5
    assert config.run.backend == "ray" and config.lora.enabled
    # A pass holds one row (up to 8,192 video tokens + 16,384 new ones), under checkpointing.
    assert config.model.gradient_checkpointing and config.model.micro_batch_tokens >= 8192 + config.sampling.max_new_tokens


def _run_tiny(tmp_path, name, backend):
    overrides = [*TINY, f"run.backend={backend}", f"run.out={tmp_path / 'run'}", f"model.cache_dir={tmp_path / 'cache'}"]
    run_dir = run_training(load_config(GPU / name, overrides), base_dir=GPU)
    return json.loads((run_dir / "eval.json").read_text())["models"]


@needs("peft")
def test_the_two_branch_run_on_a_tiny_qwen3_vl(tmp_path):
    scores = _run_tiny(tmp_path, "qwen3_vl_two_branches.yaml", "local")
    assert set(scores) == {"base", "branch:text", "branch:vision", "merged"}
    assert set(scores["merged"]["greedy"]) == {"text_math", "shapes", "motion"}


def test_the_three_branch_run_on_a_tiny_qwen3_vl_on_ray(tmp_path):
    require("ray")
    scores = _run_tiny(tmp_path, "qwen3_vl_three_branches.yaml", "ray")
    assert set(scores) == {"base", "branch:text", "branch:image", "branch:video", "merged"}
