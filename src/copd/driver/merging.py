"""Merge a run's branches into one model folder (Algorithm 1, final: theta* = sum_k w_k theta_k)."""

from __future__ import annotations

from pathlib import Path

from copd.config.schema import Config
from copd.core.merge import MERGE_METHODS, merge_state_dicts
from copd.errors import CopdError
from copd.models.sources import load_pretrained
from copd.backends.local.factory import make_policy
from copd.backends.local.hf import HFPolicy

def merge_branches(run_dir: Path, config: Config, method: str | None = None, out: Path | None = None) -> HFPolicy:
    """Merge RUN/branches/* (with RUN/base as the task-vector origin) into RUN/final or `out`."""
    method = method or config.merge.method
    if method not in MERGE_METHODS:
        raise CopdError(f"merge: unknown method {method!r}; valid: {', '.join(MERGE_METHODS)}")
    spec = MERGE_METHODS[method]
    names = config.merge.branches or [b.name for b in config.branches]
    by_name = {b.name: b for b in config.branches}
    branches = [by_name[n] for n in names]  # in the order of the folders merged
    folders = [run_dir / "branches" / n for n in names]
    missing = [str(f) for f in folders if not (f / "config.json").is_file()]
    if missing:
        raise CopdError(f"cannot merge: branch folder missing: {missing[0]} (has training finished?)")
    states = [load_pretrained(folder, config.model.dtype)[0].state_dict() for folder in folders]
    base_model, tokenizer = load_pretrained(run_dir / "base", config.model.dtype)
    # A method's options (scale, density) come from the config's merge section.
    options = {k: getattr(config.merge, k) for k in spec.defaults}
    weights = [b.weight for b in branches] if spec.weights != "forbidden" else None
    if weights is not None and sum(weights) <= 0:
        raise CopdError(f"merge: method {method!r} weighs branches by `weight`, which sum to 0 for {names}")
    if weights is not None and spec.weights == "optional":
        weights = [w / sum(weights) for w in weights]  # normalised, so scale 1 with equal weights is the mean
    try:
        merged = merge_state_dicts(states, method, weights=weights, base=base_model.state_dict(), **options)
    except ValueError as err:
        raise CopdError(f"merge: {err}") from None
    base_model.load_state_dict(merged)
    policy = make_policy("merged", base_model, tokenizer, **config.model.policy_options())
    policy.save_pretrained(out or run_dir / "final")
    return policy
