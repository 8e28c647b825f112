"""What one step cost: seconds per branch, the driver's wait at the step's barriers, bytes sampled.

Kept apart from the trainer so that its step reads as the stages of Algorithm 1, with the
timing around them rather than inside them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from copd.backends.roles import Pending


class StepClock:
    """Seconds of one step: per branch (the driver's time in that branch's calls), in all, and at the barriers."""

    def __init__(self, branches: list[str]):
        self.seconds = dict.fromkeys(branches, 0.0)
        self.waited = 0.0  # the driver standing at the step's barriers, waiting for remote branches
        self.begin = time.perf_counter()

    @contextlib.contextmanager
    def charge(self, branch: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[branch] += time.perf_counter() - t0

    @contextlib.contextmanager
    def barrier(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.waited += time.perf_counter() - t0

    def step_times(self) -> dict[str, float]:
        return {"step_seconds": round(time.perf_counter() - self.begin, 4), "barrier_seconds": round(self.waited, 4)}


def branch_costs(timer: dict, started: dict, opd_parts: dict, results: dict) -> tuple[dict, dict]:
    """(seconds, bytes of sampled rollouts) per branch in one step.

    In one process a branch's seconds are the driver's time in its calls (`timer`). With
    remote branches the calls return at once, so they are the actor's own: its sampling,
    its scoring as a teacher and its update.
    """
    samples = [(b, s.rollouts) for b, s in started.items()] + [(s, p.rollouts) for s, parts in opd_parts.items() for p in parts]
    sampled = dict.fromkeys(timer, 0)
    for b, rollouts in samples:
        sampled[b] += rollouts.nbytes
    if not any(isinstance(r, Pending) for _, r in samples):
        return timer, sampled
    seconds = dict.fromkeys(timer, 0.0)
    for b, rollouts in samples:
        seconds[b] += rollouts.seconds
    for parts in opd_parts.values():
        for part in parts:
            teacher = part.edge.split("<-")[1]
            seconds[teacher] = seconds.get(teacher, 0.0) + part.teacher.seconds
    for b, result in results.items():
        seconds[b] += result.metrics.get("actor_update_seconds", 0.0) if result is not None else 0.0
    return {b: seconds[b] for b in timer}, sampled
