"""schedule.experts_from: static OPD and MOPD distil from experts another run already trained.

The experts phase of those plans is, step for step, the `experts` plan: same branches, same
seeds, same data order (every sampler and every step's noise is keyed by branch and step).
A distillation run can therefore start from the experts a finished experts run left in
RUN/branches/NAME, at the global step where its own experts phase would have ended, and
give the numbers it would have given had it trained them itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from copd.config.methods import expert_branches
from copd.config.schema import Config
from copd.errors import CopdError
from copd.models.sources import load_pretrained


def experts_of(config: Config) -> list[str]:
    return [b.name for b in expert_branches(config)]


def expert_folder(config: Config, name: str) -> Path:
    return Path(config.schedule.experts_from).expanduser() / "branches" / name


def _weights_file(config: Config, name: str) -> Path:
    folder = expert_folder(config, name)
    return folder / "adapter" / "adapter_model.safetensors" if config.lora.enabled else folder / "config.json"


def check_experts_from(config: Config) -> None:
    """Every expert's trained folder is there, before the run folder is written."""
    if config.schedule.experts_from is None:
        return
    for name in experts_of(config):
        needed = _weights_file(config, name)
        if not needed.is_file():
            raise CopdError(f"schedule.experts_from: {needed} is missing; it must be a finished run of the experts "
                            f"{experts_of(config)} (plan experts, same seed and settings)")


def expert_weights(config: Config, name: str) -> dict[str, torch.Tensor]:
    """The weights a learner of this config takes (set_weights) for expert `name`: its adapter with LoRA, else the model."""
    if config.lora.enabled:
        return load_file(str(_weights_file(config, name)))
    model, _ = load_pretrained(expert_folder(config, name), config.model.dtype)
    return model.state_dict()
