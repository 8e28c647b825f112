"""Where a run stands: the driver's counters, saved whole in every checkpoint's state.json and read back on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RunState:
    next_phase: int = 0  # index into the plan of the phase to run next
    global_step: int = 0
    # OPD steps so far: top-k diagnostics are due on OPD steps 1, 1 + every, ... (opd.diagnostics_every)
    opd_steps: int = 0
    nan_in_row: dict[str, int] = field(default_factory=dict)  # per branch: non-finite losses in a row
    nan_skipped: dict[str, int] = field(default_factory=dict)  # per branch: updates skipped for them
    carry: int = 0  # steps an overlap trigger (schedule.trigger) cut from a phase, run by the next one
    # Written with a checkpoint: the cycle it ends, metrics.jsonl's length then, the prompt samplers.
    cycle: int = 0
    metrics_lines: int = 0
    rl_samplers: dict[str, dict] = field(default_factory=dict)
    opd_samplers: dict[str, dict] = field(default_factory=dict)

    # A checkpoint without these cannot resume (state.json is checked before anything loads).
    REQUIRED = ("cycle", "metrics_lines", "rl_samplers", "opd_samplers")

    @classmethod
    def start(cls, branches: list[str]) -> RunState:
        return cls(nan_in_row=dict.fromkeys(branches, 0), nan_skipped=dict.fromkeys(branches, 0))

    def take_carry(self) -> int:
        carry, self.carry = self.carry, 0
        return carry

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict) -> RunState:
        """A saved state; keys a run of an older version did not write take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})
