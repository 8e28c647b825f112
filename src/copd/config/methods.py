"""The paper's comparison as data: each method is a config transform plus the models it yields.

Every method trains from the same base config (capabilities, base model, schedule), so
the only differences are the ones the method is about. Methods that come out of the same
training run (experts and their merge; CoPD with and without merging) share that run.

Compute matching (docs/method.md §8: "total steps of CoPD = sum of the single-domain experts'
steps"): every trained branch gets cycles x (S_RL + S_OPD) updates, mixed RLVR gets K
times as many on its single policy, and the distillation phase of static OPD / MOPD has
cycles x S_OPD steps. Rollout tokens differ by method (OPD samples extra rollouts); they
are counted from metrics.jsonl and shown beside the scores.

Each method also carries its row label, its place in the table and its orderings group:
`copd compare` (copd.driver.compare) and its report (copd.reporting.compare_report) read
them from here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from copd.config.schema import BranchConfig, Config


@dataclass(frozen=True)
class Method:
    """One row (or one row per branch) of the comparison, and how its models are trained.

    `label` names the row (a row per branch adds the branch after it), `rank` places the rows
    in compare.md's table, `group` is the name the orderings (ORDERINGS) compare it under.
    """

    run: str  # name of the training run; methods with the same run share it
    transform: Callable[[Config], Config]
    label: str
    rank: int
    rows: Callable[[str, Config], dict[str, str]]  # (label, transformed config) -> {row label: eval.json model label}
    group: str | None = None

    def outputs(self, config: Config) -> dict[str, str]:
        """Row label -> eval.json model label, for the config this method trained."""
        return self.rows(self.label, config)


def _copy(config: Config, **sections) -> Config:
    """The config with whole sections replaced, validated again (a transform cannot make an invalid config)."""
    return Config.model_validate({**config.to_yaml_dict(), **sections})


def expert_branches(config: Config) -> list[BranchConfig]:
    """The branches that train with RLVR; the others (static OPD, MOPD students) only distil from them."""
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
    caps = sorted({c for b in expert_branches(config) for c in b.capabilities})
    k = len(expert_branches(config))
    schedule = {**config.schedule.model_dump(), "plan": "experts", "cycles": config.schedule.cycles * k}
    # One policy has no edges; a mesh of one branch is valid whatever the CoPD topology was (a hub names a branch gone here).
    return _copy(config, branches=[{"name": "mixed", "capabilities": caps}], schedule=schedule, merge={**config.merge.model_dump(), "branches": None},
                 topology={"kind": "mesh", "hub": None}, resources={**config.resources.model_dump(), "branches": {}})


def _static_opd(config: Config) -> Config:
    """Experts, then each expert (a copy of it) distilled from every other expert on that expert's data."""
    experts = expert_branches(config)
    students = [
        {"name": f"{s.name}_from_{t.name}", "capabilities": s.capabilities, "beta": s.beta, "distill_from": [t.name], "fork_of": s.name}
        for s in experts for t in experts if s.name != t.name
    ]
    branches = [b.model_dump() for b in experts] + students
    merge = {**config.merge.model_dump(), "branches": [b.name for b in experts]}
    return _copy(config, branches=branches, schedule={**config.schedule.model_dump(), "plan": "static_opd"}, merge=merge)


def _mopd(config: Config) -> Config:
    """Experts, then a student from the base distils from every expert, each on its own data."""
    experts = expert_branches(config)
    caps = sorted({c for b in experts for c in b.capabilities})
    student = {"name": "student", "capabilities": caps, "beta": experts[0].beta, "distill_from": [b.name for b in experts]}
    merge = {**config.merge.model_dump(), "branches": [b.name for b in experts]}
    schedule = {**config.schedule.model_dump(), "plan": "mopd"}
    return _copy(config, branches=[b.model_dump() for b in experts] + [student], schedule=schedule, merge=merge)


def _model(model: str) -> Callable[[str, Config], dict[str, str]]:
    """One row: the run's model `model` (merged, or branch:NAME)."""
    return lambda label, config: {label: model}


def _per_expert(sep: str) -> Callable[[str, Config], dict[str, str]]:
    """A row per expert branch, labelled LABEL<sep>BRANCH."""
    return lambda label, config: {f"{label}{sep}{b.name}": f"branch:{b.name}" for b in expert_branches(config)}


def _per_student(label: str, config: Config) -> dict[str, str]:
    """A row per forked student: LABEL EXPERT<-TEACHER."""
    return {f"{label} {b.fork_of}<-{b.distill_from[0]}": f"branch:{b.name}" for b in config.branches if b.fork_of}


# The base model's row: every run evaluates it; it ranks first.
BASE_ROW = "base"

METHODS: dict[str, Method] = {
    "copd": Method("copd", _copd, "CoPD", 8, _model("merged"), group="CoPD"),
    "copd_nomerge": Method("copd", _copd, "CoPD no merge", 5, _per_expert(": ")),
    "copd_oneway": Method("copd_oneway", _copd_oneway, "CoPD one-way", 6, _model("merged"), group="CoPD one-way"),
    "copd_overlap": Method("copd_overlap", _copd_overlap, "CoPD overlap trigger", 7, _model("merged"), group="CoPD overlap trigger"),
    "experts": Method("experts", _experts_run, "expert", 1, _per_expert(" ")),
    # Ranked with the experts it merges, so the table lists them together.
    "experts_merge": Method("experts", _experts_run, "experts merged", 1, _model("merged"), group="experts merged"),
    "mixed": Method("mixed", _mixed, "mixed RLVR", 2, _model("branch:mixed"), group="mixed RLVR"),
    "static_opd": Method("static_opd", _static_opd, "static OPD", 3, _per_student, group="static OPD / MOPD"),
    "mopd": Method("mopd", _mopd, "MOPD", 4, _model("branch:student"), group="static OPD / MOPD"),
}

# The run that trains the experts alone, and the runs that then distil from its experts
# (copd compare trains it first and points their schedule.experts_from at it).
EXPERTS_RUN = "experts"
DISTILLING_RUNS = ("static_opd", "mopd")

# The paper's claims, as (higher group, lower group) on mean overall accuracy; "base" is the base row.
ORDERINGS: list[tuple[str, str]] = [
    ("CoPD", "static OPD / MOPD"), ("static OPD / MOPD", "mixed RLVR"), ("mixed RLVR", "base"),
    ("CoPD", "mixed RLVR"), ("CoPD", "experts merged"), ("CoPD", "CoPD one-way"), ("CoPD", "base"),
    ("CoPD overlap trigger", "CoPD"),
]


def rank_of(row: dict) -> int:
    """Where a compare.json row goes in the table: its method's rank; the base row (no method) first."""
    if "method" not in row:
        return 0
    method = METHODS.get(row["method"])
    return method.rank if method else max(m.rank for m in METHODS.values()) + 1


def group_of(label: str, row: dict) -> str | None:
    """The orderings group of a compare.json row (the base row is "base")."""
    method = METHODS.get(row.get("method", ""))
    return method.group if method else BASE_ROW if label == BASE_ROW else None
