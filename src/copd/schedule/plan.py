"""Algorithm 1 (and baselines) as data: a list of phases the driver runs in order.

A phase says how many steps to run, which branches do RLVR, and which OPD edges are
active. The driver knows nothing about CoPD itself; a baseline is another plan builder.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from copd.schedule.topology import Edge


@dataclass(frozen=True)
class Phase:
    name: str  # "explore" (Phase I) or "consolidate" (Phase II)
    cycle: int  # 1-based; a checkpoint is written when a cycle's last phase ends
    steps: int
    rl_branches: tuple[str, ...]
    edges: tuple[Edge, ...] = ()
    forks: tuple[tuple[str, str], ...] = ()  # (branch, source): copy source's weights into branch at phase start
    # Adaptive rhythm: end this phase early once the overlap measured on probe_edges drops below
    # stop_below; a phase with absorbs_carry then runs the steps the earlier phase did not use.
    stop_below: float | None = None
    probe_edges: tuple[Edge, ...] = ()
    absorbs_carry: bool = False

    @property
    def label(self) -> str:
        return f"cycle {self.cycle} {self.name}"


@dataclass(frozen=True)
class Students:
    """Students: branches that only distil once the experts have trained (static OPD, MOPD); every other branch is an expert."""

    distill_from: dict[str, tuple[str, ...]] = field(default_factory=dict)  # student -> its teachers
    fork_of: dict[str, str] = field(default_factory=dict)  # student -> branch copied when distillation starts

    def experts(self, branches: list[str]) -> tuple[str, ...]:
        return tuple(b for b in branches if b not in self.distill_from)


def copd_plan(branches: list[str], edges: list[Edge], cycles: int, rl_steps: int, opd_steps: int, students: Students | None = None) -> list[Phase]:
    """Algorithm 1: per cycle, S_RL steps of RLVR, then S_OPD steps of RLVR + OPD on every edge."""
    phases = []
    for n in range(1, cycles + 1):
        if rl_steps:
            phases.append(Phase("explore", n, rl_steps, tuple(branches)))
        if opd_steps:
            phases.append(Phase("consolidate", n, opd_steps, tuple(branches), tuple(edges)))
    return phases


def experts_plan(branches: list[str], edges: list[Edge], cycles: int, rl_steps: int, opd_steps: int, students: Students | None = None) -> list[Phase]:
    """Independent RLVR experts with the same number of updates as CoPD (no distillation)."""
    experts = (students or Students()).experts(branches)
    return [Phase("explore", n, rl_steps + opd_steps, experts) for n in range(1, cycles + 1)]


def experts_then_distill_plan(branches: list[str], edges: list[Edge], cycles: int, rl_steps: int, opd_steps: int,
                              students: Students | None = None) -> list[Phase]:
    """Static OPD and MOPD: train experts to the end, then distil students from the frozen experts.

    Students that fork an expert (static OPD) start as a copy of it; others (MOPD) start
    from the base. The distillation phase has as many steps as CoPD's OPD steps in total.
    """
    students = students or Students()
    if not students.distill_from:
        raise ValueError("this plan needs at least one branch with `distill_from`")
    distill_edges = tuple(Edge(s, t) for s, teachers in students.distill_from.items() for t in teachers)
    phases = experts_plan(branches, edges, cycles, rl_steps, opd_steps, students)
    forks = tuple(students.fork_of.items())
    return [*phases, Phase("distill", cycles + 1, cycles * opd_steps, (), distill_edges, forks)]


PLANS: dict[str, Callable[..., list[Phase]]] = {
    "copd": copd_plan,
    "experts": experts_plan,
    "static_opd": experts_then_distill_plan,
    "mopd": experts_then_distill_plan,
}
# Plans whose OPD edges come from the `topology` section (the others name teachers per branch).
TOPOLOGY_PLANS = {"copd"}


def build_plan(name: str, branches: list[str], edges: list[Edge], cycles: int, rl_steps: int, opd_steps: int,
               students: Students | None = None) -> list[Phase]:
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; valid: {sorted(PLANS)}")
    return PLANS[name](branches, edges, cycles, rl_steps, opd_steps, students)


def with_overlap_trigger(phases: list[Phase], threshold: float) -> list[Phase]:
    """Start each cycle's consolidation when branches drift apart instead of after a fixed S_RL.

    An explore phase followed by a consolidate phase of the same cycle probes the overlap on
    that phase's edges after every step and stops once it falls below `threshold`; the
    consolidate phase then runs the unused steps, so the number of updates is unchanged.
    """
    out = list(phases)
    for i, (explore, nxt) in enumerate(itertools.pairwise(phases)):
        if explore.name == "explore" and nxt.name == "consolidate" and nxt.cycle == explore.cycle:
            out[i] = replace(explore, stop_below=threshold, probe_edges=nxt.edges)
            out[i + 1] = replace(nxt, absorbs_carry=True)
    return out


def with_probes(phases: list[Phase], edges: list[Edge]) -> list[Phase]:
    """Measure branch overlap after every explore step (e.g. between independent experts)."""
    return [replace(p, probe_edges=p.probe_edges or tuple(edges)) if p.name == "explore" else p for p in phases]
