"""Merge a run's branches into one model folder (Algorithm 1, final: theta* = sum_k w_k theta_k).

The branches are read one tensor at a time, and each merged tensor is written in place into
the base model, which becomes the output: peak memory is one model plus about one tensor per
branch, whatever the number of branches. LoRA branches are read through their small adapters
(base + delta, rebuilt exactly as their folders were saved), so their full files are not read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from copd.backends.local.factory import make_policy
from copd.backends.local.hf import HFPolicy
from copd.config.schema import Config
from copd.core.merge import MERGE_METHODS, Merger
from copd.driver.lazy_weights import BranchWeights, LoraAdapter, model_keys_by_saved_name
from copd.errors import CopdError
from copd.models.sources import load_pretrained


def merge_branches(run_dir: Path, config: Config, method: str | None = None, out: Path | None = None) -> HFPolicy:
    """Merge RUN/branches/* (with RUN/base as the task-vector origin) into RUN/final or `out`."""
    method = method or config.merge.method
    names = config.merge.branches or [b.name for b in config.branches]
    merger = make_merger(config, method, names)
    folders = [run_dir / "branches" / n for n in names]
    missing = [str(f) for f in folders if not (f / "config.json").is_file()]
    if missing:
        raise CopdError(f"cannot merge: branch folder missing: {missing[0]} (has training finished?)")
    base_model, tokenizer = load_pretrained(run_dir / "base", config.model.dtype)
    merge_folders_into(base_model, run_dir / "base", folders, merger, config.model.dtype, use_adapters=config.lora.enabled)
    policy = make_policy("merged", base_model, tokenizer, **config.model.policy_options())
    policy.save_pretrained(out or run_dir / "final")
    return policy


def make_merger(config: Config, method: str, names: list[str]) -> Merger:
    """The method with the config's weights and options for these branches, or a CopdError."""
    if method not in MERGE_METHODS:
        raise CopdError(f"merge: unknown method {method!r}; valid: {', '.join(MERGE_METHODS)}")
    spec = MERGE_METHODS[method]
    by_name = {b.name: b for b in config.branches}
    # A method's options (scale, density) come from the config's merge section.
    options = {k: getattr(config.merge, k) for k in spec.defaults}
    weights = [by_name[n].weight for n in names] if spec.weights != "forbidden" else None
    if weights is not None and sum(weights) <= 0:
        raise CopdError(f"merge: method {method!r} weighs branches by `weight`, which sum to 0 for {names}")
    if weights is not None and spec.weights == "optional":
        weights = [w / sum(weights) for w in weights]  # normalised, so scale 1 with equal weights is the mean
    try:
        return Merger.create(method, len(names), weights, has_base=True, **options)
    except ValueError as err:
        raise CopdError(f"merge: {err}") from None


def merge_folders_into(model: torch.nn.Module, base_folder: Path, folders: list[Path], merger: Merger, dtype: str,
                       use_adapters: bool = False) -> None:
    """Overwrite `model` (loaded from base_folder in `dtype`) with the merge of the saved folders.

    Every tensor ends up bit for bit as if each folder were loaded with load_pretrained(folder,
    dtype) and the state dicts merged with merge_state_dicts against the model's own. (With
    `use_adapters`, LoRA deltas are recomputed here on the CPU: branches saved from another
    device, whose matmuls round differently, can differ from their folders in the last bit.)
    """
    base = BranchWeights(base_folder)
    branches = [BranchWeights(folder) for folder in folders]
    check_same_tensors(base, branches)
    targets = _targets(model, base)
    if targets is None:
        # transformers converts this architecture's weights when loading (experts fused into
        # one tensor, say), so a saved tensor is no one model tensor: merge loaded models.
        _merge_loaded(model, folders, merger, dtype)
        return
    adapters = _usable_adapters(folders, targets, base, branches) if use_adapters else None
    merged = set()
    with torch.no_grad():
        for name, (target, keys) in targets.items():
            if keys[0] in merged:
                continue  # a tied tensor saved under both its names: merged already
            # merge_tensor reads the base value (the task-vector origin) in full before the copy overwrites it.
            values = _adapter_values(adapters, base, name, target, keys) if adapters else _full_values(branches, name, target)
            target.copy_(merger.merge_tensor(values, target))
            merged.add(keys[0])


def check_same_tensors(base: BranchWeights, branches: list[BranchWeights]) -> None:
    """Every branch folder holds the base folder's tensor names and shapes (read from the headers alone)."""
    base_keys = set(base.keys())
    for branch in branches:
        branch_keys = set(branch.keys())
        if branch_keys - base_keys:
            extra = sorted(branch_keys - base_keys)[0]
            raise CopdError(f"cannot merge: {branch.folder} has a tensor {extra!r} that {base.folder} lacks")
        for key in base.keys():
            if key not in branch_keys:
                raise CopdError(f"cannot merge: {branch.folder} lacks the tensor {key!r} of {base.folder}")
            if branch.shape(key) != base.shape(key):
                raise CopdError(f"cannot merge: tensor {key!r} has shape {list(branch.shape(key))} in {branch.folder} "
                                f"but {list(base.shape(key))} in {base.folder}")


def _targets(model: torch.nn.Module, base: BranchWeights) -> dict[str, tuple[torch.Tensor, list[str]]] | None:
    """{saved name: (the model's tensor, its state-dict keys)} for every tensor of the base folder,
    or None when some saved tensor is not one model tensor of the same shape."""
    keys_by_name = model_keys_by_saved_name(model)
    if keys_by_name is None:
        return None
    state = model.state_dict()
    targets = {}
    for name in base.keys():
        keys = keys_by_name.get(name)
        if keys is None or tuple(state[keys[0]].shape) != base.shape(name):
            return None
        targets[name] = (state[keys[0]], keys)
    return targets


def _full_values(branches: list[BranchWeights], name: str, target: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each branch's saved tensor, cast to the model's dtype as from_pretrained casts it, one at a time."""
    for branch in branches:
        yield branch.tensor(name).to(target.dtype)


def _usable_adapters(folders: list[Path], targets: dict, base: BranchWeights,
                     branches: list[BranchWeights]) -> list[LoraAdapter] | None:
    """Each branch's LoRA adapter, or None when the branches must be read whole instead: a
    folder without its adapter, an adapter LoraAdapter does not reproduce exactly (DoRA,
    rsLoRA, ...), or one whose weight is tied or not saved as it was trained."""
    adapters = [LoraAdapter.read(folder) for folder in folders]
    if any(adapter is None for adapter in adapters):
        return None
    # A tied weight has two names, and which one a folder keeps decides where its delta went.
    name_of = {keys[0]: name for name, (_, keys) in targets.items() if len(keys) == 1}
    for adapter in adapters:
        for key in adapter.targets():
            name = name_of.get(key)
            if name is None or not _saved_as_trained(adapter, key, name, base, branches):
                return None
    return adapters


def _saved_as_trained(adapter: LoraAdapter, key: str, name: str, base: BranchWeights, branches: list[BranchWeights]) -> bool:
    """The adapted weight has the delta's shape and every folder saved it in the base's floating dtype,
    as LoraPolicy.save_pretrained does."""
    dtype = base.dtype(name)
    same_dtype = all(branch.dtype(name) == dtype for branch in branches)
    return adapter.delta_shape(key) == base.shape(name) and dtype is not None and dtype.is_floating_point and same_dtype


def _adapter_values(adapters: list[LoraAdapter], base: BranchWeights, name: str, target: torch.Tensor,
                    keys: list[str]) -> Iterator[torch.Tensor]:
    """Each LoRA branch's weight as LoraPolicy.save_pretrained saved it (SharedBase.merged_state_dict:
    base + delta in float32, cast to the base's dtype), then cast to the model's dtype as from_pretrained casts it."""
    key = keys[0]
    if not any(key in adapter.targets() for adapter in adapters):
        yield from itertools.repeat(target, len(adapters))  # every branch saved the base's own tensor
        return
    saved_dtype = base.dtype(name)
    # The base as it was saved: loading in another dtype may have rounded the model's copy.
    saved_base = target if target.dtype == saved_dtype else base.tensor(name)
    for adapter in adapters:
        if key not in adapter.targets():
            yield target
            continue
        yield (saved_base.float() + adapter.delta(key).float()).to(saved_dtype).to(target.dtype)


def _merge_loaded(model: torch.nn.Module, folders: list[Path], merger: Merger, dtype: str) -> None:
    """The merge with every branch loaded whole (memory grows with the number of branches)."""
    states = [load_pretrained(folder, dtype)[0].state_dict() for folder in folders]
    try:
        merged = merger.merge_state_dicts(states, model.state_dict())
    except ValueError as err:
        raise CopdError(f"merge: {err}") from None
    model.load_state_dict(merged)
