"""Where a run's branches live (run.backend): the one place that chooses.

A backend is built from the base model before the run folder is written, so that a mistake
found while building (a bad lora.target_modules, say) costs nothing; its `base_policy` is the
base as a policy (saved, evaluated, the token budget checked on it). `open` yields every
branch's roles (sampler, scorer, learner) for the trainer and releases them on the way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from copd.backends.engine.setup import close_engines, local_engines
from copd.backends.local.branches import build_branches
from copd.backends.local.factory import make_policy
from copd.backends.roles import BranchRoles
from copd.config.schema import Config


class LocalBranches:
    """Every branch in this process (the reference), sampling through its learner or, with sampling.engine vllm, its own engine."""

    def __init__(self, config: Config, model, tokenizer, device: str):
        self.config = config
        self.policies, self.base_policy = build_branches(config, model, tokenizer, device)

    @staticmethod
    def check(config: Config) -> None:
        """Nothing to check before the base is built."""

    @contextlib.contextmanager
    def open(self, run_dir: Path) -> Iterator[dict[str, BranchRoles]]:
        if self.config.sampling.engine == "hf":
            branches = {name: BranchRoles.of(policy) for name, policy in self.policies.items()}
        else:
            branches = local_engines(self.config, run_dir, self.policies)
        try:
            yield branches
        finally:
            close_engines(branches)


class RayBranches:
    """One Ray actor per branch (or per rank, resources.ranks_per_branch), each building its branch from the saved base folder."""

    def __init__(self, config: Config, model, tokenizer, device: str):
        self.config, self.device = config, device
        self.base_policy = make_policy("base", model, tokenizer, device=device, **config.model.policy_options())

    @staticmethod
    def check(config: Config) -> None:
        """Ray is installed and the cluster has room for every rank."""
        from copd.backends.ray_group import check_placement

        check_placement(config)

    @contextlib.contextmanager
    def open(self, run_dir: Path) -> Iterator[dict[str, BranchRoles]]:
        from copd.backends.ray_backend import ray_branches, release

        branches, group = ray_branches(self.config, run_dir / "base", self.device)
        try:
            yield branches
        finally:
            release(branches, group)


BRANCH_BACKENDS = {"local": LocalBranches, "ray": RayBranches}
