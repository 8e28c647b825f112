"""Who teaches whom: directed edges (student <- teacher) between branches (docs/method.md §5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Edge:
    student: str
    teacher: str

    @property
    def label(self) -> str:
        return f"{self.student}<-{self.teacher}"


def pair(names: list[str], hub: str | None = None) -> list[Edge]:
    """K = 2: each branch is the other's teacher."""
    if len(names) != 2:
        raise ValueError(f"topology 'pair' needs exactly 2 branches, got {len(names)}; use 'hub' or 'mesh'")
    a, b = names
    return [Edge(a, b), Edge(b, a)]


def oneway(names: list[str], hub: str | None = None) -> list[Edge]:
    """Ablation: only the first branch learns from the second."""
    if len(names) != 2:
        raise ValueError(f"topology 'oneway' needs exactly 2 branches, got {len(names)}")
    return [Edge(names[0], names[1])]


def hub_and_spoke(names: list[str], hub: str | None = None) -> list[Edge]:
    """The hub exchanges with every spoke in both directions; spokes never teach each other."""
    if hub not in names:
        raise ValueError(f"topology 'hub' needs a hub among {names}, got {hub!r}")
    spokes = [n for n in names if n != hub]
    return [e for s in spokes for e in (Edge(s, hub), Edge(hub, s))]


def full_mesh(names: list[str], hub: str | None = None) -> list[Edge]:
    """Every ordered pair of distinct branches."""
    return [Edge(s, t) for s in names for t in names if s != t]


TOPOLOGIES: dict[str, Callable[[list[str], str | None], list[Edge]]] = {
    "pair": pair,
    "oneway": oneway,
    "hub": hub_and_spoke,
    "mesh": full_mesh,
}


def build_edges(kind: str, names: list[str], hub: str | None = None) -> list[Edge]:
    if kind not in TOPOLOGIES:
        raise ValueError(f"unknown topology {kind!r}; valid: {sorted(TOPOLOGIES)}")
    return TOPOLOGIES[kind](names, hub)
