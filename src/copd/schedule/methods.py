"""The paper's comparison as data: each method is a config transform plus the models it yields.

Every method trains from the same base config (capabilities, base model, schedule), so
the only differences are the ones the method is about. Methods that come out of the same
training run (experts and their merge; CoPD with and without merging) share that run.

Compute matching (METHOD.md: "total steps of CoPD = sum of the single-domain experts'
steps"): every trained branch gets cycles x (S_RL + S_OPD) updates, mixed RLVR gets K
times as many on its single policy, and the distillation phase of static OPD / MOPD has
cycles x S_OPD steps. Rollout tokens differ by method (OPD samples extra rollouts); they
are counted from metrics.jsonl and shown beside the scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from copd.config.schema import BranchConfig, Config


@dataclass(frozen=True)
class Method:
    run: str  # name of the training run; methods with the same run share it
    transform: Callable[[Config], Config]
    outputs: Callable[[Config], dict[str, str]]  # row label -> eval.json model label


def _copy(config: Config, **sections) -> Config:
    raw = config.to_yaml_dict()
    for key, value in sections.items():
        raw[key] = value
    return type(config).model_validate(raw)


def _experts(config: Config) -> list[BranchConfig]:
    return [b for b in config.branches if not b.distill_from]


def _copd(config: Config) -> Config:
    return _copy(config, schedule={**config.schedule.model_dump(), "plan": "copd"})


def _copd_oneway(config: Config) -> Config:
    return _copy(_copd(config), topology={"kind": "oneway", "hub": None})


def _copd_overlap(config: Config) -> Config:
    """CoPD whose Phase I ends once branch overlap drops below schedule.overlap_threshold."""
    return _copy(config, schedule={**config.schedule.model_dump(), "plan": "copd", "trigger": "overlap"})


def _experts_run(config: Config) -> Config:
    """Independent experts; their overlap is probed along the way (it does not change training)."""
    return _copy(config, schedule={**config.schedule.model_dump(), "plan": "experts", "probe": True})


def _mixed(config: Config) -> Config:
    """One policy on the union of the data, balanced per batch, with K times the updates."""
    caps = sorted({c for b in _experts(config) for c in b.capabilities})
    k = len(_experts(config))
    schedule = {**config.schedule.model_dump(), "plan": "experts", "cycles": config.schedule.cycles * k}
    # One policy has no edges; a mesh of one branch is valid whatever the CoPD topology was (a hub names a branch gone here).
    return _copy(config, branches=[{"name": "mixed", "capabilities": caps}], schedule=schedule, merge={**config.merge.model_dump(), "branches": None},
                 topology={"kind": "mesh", "hub": None})


def _static_opd(config: Config) -> Config:
    """Experts, then each expert (a copy of it) distilled from every other expert on that expert's data."""
    experts = _experts(config)
    students = [
        {"name": f"{s.name}_from_{t.name}", "capabilities": s.capabilities, "beta": s.beta, "distill_from": [t.name], "fork_of": s.name}
        for s in experts for t in experts if s.name != t.name
    ]
    branches = [b.model_dump() for b in experts] + students
    merge = {**config.merge.model_dump(), "branches": [b.name for b in experts]}
    return _copy(config, branches=branches, schedule={**config.schedule.model_dump(), "plan": "static_opd"}, merge=merge)


def _mopd(config: Config) -> Config:
    """Experts, then a student from the base distils from every expert, each on its own data."""
    experts = _experts(config)
    caps = sorted({c for b in experts for c in b.capabilities})
    student = {"name": "student", "capabilities": caps, "beta": experts[0].beta, "distill_from": [b.name for b in experts]}
    merge = {**config.merge.model_dump(), "branches": [b.name for b in experts]}
    return _copy(config, branches=[b.model_dump() for b in experts] + [student], schedule={**config.schedule.model_dump(), "plan": "mopd"}, merge=merge)


def _branch_rows(prefix: str) -> Callable[[Config], dict[str, str]]:
    return lambda config: {f"{prefix} {b.name}": f"branch:{b.name}" for b in _experts(config)}


METHODS: dict[str, Method] = {
    "copd": Method("copd", _copd, lambda c: {"CoPD": "merged"}),
    "copd_nomerge": Method("copd", _copd, _branch_rows("CoPD no merge:")),
    "copd_oneway": Method("copd_oneway", _copd_oneway, lambda c: {"CoPD one-way": "merged"}),
    "copd_overlap": Method("copd_overlap", _copd_overlap, lambda c: {"CoPD overlap trigger": "merged"}),
    "experts": Method("experts", _experts_run, _branch_rows("expert")),
    "experts_merge": Method("experts", _experts_run, lambda c: {"experts merged": "merged"}),
    "mixed": Method("mixed", _mixed, lambda c: {"mixed RLVR": "branch:mixed"}),
    "static_opd": Method("static_opd", _static_opd, lambda c: {
        f"static OPD {b.fork_of}<-{b.distill_from[0]}": f"branch:{b.name}" for b in c.branches if b.fork_of}),
    "mopd": Method("mopd", _mopd, lambda c: {"MOPD": "branch:student"}),
}
