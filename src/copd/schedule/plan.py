"""Algorithm 1 (and baselines) as data: a list of phases the driver runs in order.

A phase says how many steps to run, which branches do RLVR, and which OPD edges are
active. The driver knows nothing about CoPD itself; a baseline is another plan builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from copd.schedule.topology import Edge


@dataclass(frozen=True)
class Phase:
    name: str  # "explore" (Phase I) or "consolidate" (Phase II)
    cycle: int  # 1-based; a checkpoint is written when a cycle's last phase ends
    steps: int
    rl_branches: tuple[str, ...]
    edges: tuple[Edge, ...] = ()

    @property
    def label(self) -> str:
        return f"cycle {self.cycle} {self.name}"


def copd_plan(branches: list[str], edges: list[Edge], cycles: int, rl_steps: int, opd_steps: int) -> list[Phase]:
    """Algorithm 1: per cycle, S_RL steps of RLVR, then S_OPD steps of RLVR + OPD on every edge."""
    phases = []
    for n in range(1, cycles + 1):
        if rl_steps:
            phases.append(Phase("explore", n, rl_steps, tuple(branches)))
        if opd_steps:
            phases.append(Phase("consolidate", n, opd_steps, tuple(branches), tuple(edges)))
    return phases


def experts_plan(branches: list[str], edges: list[Edge], cycles: int, rl_steps: int, opd_steps: int) -> list[Phase]:
    """Independent RLVR experts with the same number of updates as CoPD (no distillation)."""
    return [Phase("explore", n, rl_steps + opd_steps, tuple(branches)) for n in range(1, cycles + 1)]


PLANS: dict[str, Callable[..., list[Phase]]] = {"copd": copd_plan, "experts": experts_plan}


def build_plan(name: str, branches: list[str], edges: list[Edge], cycles: int, rl_steps: int, opd_steps: int) -> list[Phase]:
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; valid: {sorted(PLANS)}")
    return PLANS[name](branches, edges, cycles, rl_steps, opd_steps)
