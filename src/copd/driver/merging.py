"""Merge a run's branches into one model folder (Algorithm 1, final: theta* = sum_k w_k theta_k)."""

from __future__ import annotations

from pathlib import Path

from copd.config.schema import Config
from copd.core.merge import merge_state_dicts
from copd.errors import CopdError
from copd.models.sources import load_pretrained
from copd.backends.local.factory import make_policy
from copd.backends.local.hf import HFPolicy

# Methods whose options come from the config's merge section.
_OPTIONS = {"task_arithmetic": ("scale",), "ties": ("scale", "density")}


def merge_branches(run_dir: Path, config: Config, method: str | None = None, out: Path | None = None) -> HFPolicy:
    """Merge RUN/branches/* (with RUN/base as the task-vector origin) into RUN/final or `out`."""
    method = method or config.merge.method
    names = config.merge.branches or [b.name for b in config.branches]
    branches = [b for b in config.branches if b.name in names]
    folders = [run_dir / "branches" / n for n in names]
    missing = [str(f) for f in folders if not (f / "config.json").is_file()]
    if missing:
        raise CopdError(f"cannot merge: branch folder missing: {missing[0]} (has training finished?)")
    states = [load_pretrained(folder, config.model.dtype)[0].state_dict() for folder in folders]
    base_model, tokenizer = load_pretrained(run_dir / "base", config.model.dtype)
    options = {k: getattr(config.merge, k) for k in _OPTIONS.get(method, ())}
    weights = [b.weight for b in branches] if method in ("weighted", "task_arithmetic") else None
    if method == "task_arithmetic":
        weights = [w / sum(weights) for w in weights]  # normalised, so scale 1 with equal weights is the mean
    try:
        merged = merge_state_dicts(states, method, weights=weights, base=base_model.state_dict(), **options)
    except ValueError as err:
        raise CopdError(f"merge: {err}") from None
    base_model.load_state_dict(merged)
    policy = make_policy("merged", base_model, tokenizer, **config.model.policy_options())
    policy.save_pretrained(out or run_dir / "final")
    return policy
