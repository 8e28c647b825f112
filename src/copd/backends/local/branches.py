"""The K branch policies of a run, built from the base model in one of two modes.

full: every branch is an independent copy of the base, all weights trained (the default,
      right for small models).
lora: one frozen base shared by every branch, one PEFT adapter each (`lora.enabled`).

Each mode also gives a read-only policy for the base itself, used to evaluate pi_0.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch

from copd.backends.local.factory import make_lora_policy, make_policy
from copd.backends.local.lora import SharedBase, adapter_name
from copd.backends.roles import Learner, Policy
from copd.config.schema import Config

logger = logging.getLogger("copd")

Branches = tuple[dict[str, Policy], Policy]


def build_branches(config: Config, model, tokenizer, device: str) -> Branches:
    """(branch policies by name, base policy), every branch starting at theta_0 = the base."""
    mode = "lora" if config.lora.enabled else "full"
    torch.manual_seed(config.run.seed)  # LoRA A matrices are random; make them reproducible
    return BRANCH_MODES[mode](config, model, tokenizer, device)


def describe_branches(learners: dict[str, Learner]) -> str:
    """One line for the run log: how many weights each branch trains, out of the model's."""
    counts = [learner.parameter_counts() for learner in learners.values()]
    each = ", ".join(f"{n:,}" for n in sorted({trained for trained, _ in counts}))
    return f"{len(learners)} branches, {each} trained parameters each, of {counts[0][1]:,} in the model"


def _full_branches(config: Config, model, tokenizer, device: str) -> Branches:
    optim, prompting = config.optim, config.model.policy_options()
    if config.model.dtype != "float32":
        logger.warning(
            "model.dtype=%s with full fine-tuning: AdamW updates smaller than the weights' rounding step are lost; "
            "model.compute_dtype=%s with float32 weights, or lora.enabled=true, keeps them", config.model.dtype, config.model.dtype
        )
    policies = {
        b.name: make_policy(b.name, copy.deepcopy(model), tokenizer, optim.lr, optim.weight_decay, device, **prompting)
        for b in config.branches
    }
    return policies, make_policy("base", model, tokenizer, device=device, **prompting)


def _lora_branches(config: Config, model, tokenizer, device: str) -> Branches:
    optim, prompting, lora = config.optim, config.model.policy_options(), config.lora
    names = [b.name for b in config.branches]
    shared = SharedBase(model.to(device), names, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    policies = {
        name: make_lora_policy(name, shared, tokenizer, adapter_name(name), optim.lr, optim.weight_decay, device, **prompting)
        for name in names
    }
    return policies, make_lora_policy("base", shared, tokenizer, None, device=device, **prompting)


BRANCH_MODES: dict[str, Callable[[Config, object, object, str], Branches]] = {
    "full": _full_branches,
    "lora": _lora_branches,
}
