"""The data side of one step: draw prompts, sample rollouts, verify, compute advantages.

Each branch's RL data and each edge's teacher prompts have their own seeded samplers,
and every generation seed is derived from (run seed, who, step), so a step's data never
depends on the order in which branches are visited, and a resumed run replays exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from copd.backends.roles import OPDPart, Prompt, RLPart, Rollouts, Sampler, SamplingParams, Scorer, ScoreRequest
from copd.capabilities import Capability, Sample
from copd.core.advantages import group_advantages, zero_signal_groups


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from any labels (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class MixtureSampler:
    """Draws prompts balanced over several capabilities (one capability is the usual case)."""

    def __init__(self, capabilities: list[Capability], seed: int):
        self.capabilities = capabilities
        self.samplers = [c.train_sampler(derived_seed(seed, c.name)) for c in capabilities]
        self.turn = 0

    def draw(self, n: int) -> list[tuple[Capability, Sample]]:
        """n samples, round-robin over capabilities so every batch is balanced."""
        counts = [0] * len(self.capabilities)
        for i in range(n):
            counts[(self.turn + i) % len(counts)] += 1
        self.turn = (self.turn + n) % len(counts)
        drawn = []
        for cap, sampler, count in zip(self.capabilities, self.samplers, counts):
            drawn.extend((cap, s) for s in sampler.draw(count))
        return drawn

    def state_dict(self) -> dict:
        return {"turn": self.turn, "samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        self.turn = state["turn"]
        for sampler, s in zip(self.samplers, state["samplers"]):
            sampler.load_state_dict(s)


@dataclass
class RLBatch:
    part: RLPart | None  # None when every group was filtered out
    rewards: list[float]
    filtered_groups: int
    by_capability: dict[str, float]


@dataclass
class StartedRL:
    """An RL batch under way: the drawn prompts and their rollouts (with a remote branch, rollouts that stay
    with it, their texts fetched when the verifier reads them)."""

    drawn: list[tuple[Capability, Sample]]
    rollouts: Rollouts


def start_rl(policy: Sampler, sampler: MixtureSampler, prompts: int, group_size: int, params: SamplingParams, seed: int) -> StartedRL:
    """x ~ D_k and the request for G rollouts of each (docs/method.md §3)."""
    drawn = sampler.draw(prompts)
    return StartedRL(drawn, policy.generate([Prompt.of(s) for _, s in drawn], group_size, params, seed))


def finish_rl(started: StartedRL, group_size: int, advantage: str = "grpo", filter_zero_signal: bool = False) -> RLBatch:
    """Verifier rewards of the completions, group advantages (docs/method.md §3), and the RL part."""
    drawn, rollouts = started.drawn, started.rollouts
    rewards = [cap.score(rollouts.completions[i], s) for i, (cap, s) in enumerate(_repeat(drawn, group_size))]
    rewards_N_G = torch.tensor(rewards, dtype=torch.float32).view(len(drawn), group_size)
    adv_N_G = group_advantages(rewards_N_G, advantage)
    keep_N = ~zero_signal_groups(rewards_N_G) if filter_zero_signal else torch.ones(len(drawn), dtype=torch.bool)
    per_cap = _mean_by_capability(drawn, rewards_N_G)
    filtered = int((~keep_N).sum())
    if not bool(keep_N.any()):
        return RLBatch(None, rewards, filtered, per_cap)
    rows = keep_N.repeat_interleave(group_size).nonzero().squeeze(-1)
    # One advantage per rollout, shared by its tokens; the learner applies rows and mask, so
    # only the completions' texts are needed here.
    return RLBatch(RLPart(rollouts, adv_N_G.reshape(-1)[rows], None if filtered == 0 else rows), rewards, filtered, per_cap)


def collect_opd_part(student: Sampler, teacher: Scorer, teacher_sampler: MixtureSampler, prompts: int, samples: int,
                     params: SamplingParams, seed: int, beta: float, edge: str, support: bool, topk: int | None) -> OPDPart:
    """One edge's OPD part: the student samples on the teacher's prompts, the teacher scores them.

    With `support`, the student records its top-`topk` ids while sampling and the teacher
    sends log-probs on its own top-`topk` plus those ids; otherwise only the sampled tokens'
    log-probs (docs/method.md §4).
    """
    rollouts = collect_opd_rollouts(student, teacher_sampler, prompts, samples, params.recording(topk) if support else params, seed)
    return OPDPart(rollouts, teacher.score(rollouts, ScoreRequest.support(topk) if support else None), beta, edge)


def collect_opd_rollouts(
    student: Sampler, teacher_sampler: MixtureSampler, prompts: int, samples: int, params: SamplingParams, seed: int
) -> Rollouts:
    """x' ~ D_teacher; the STUDENT samples (on-policy states for the teacher to score)."""
    drawn = teacher_sampler.draw(prompts)
    return student.generate([Prompt.of(s) for _, s in drawn], samples, params, seed)


def _repeat(drawn: list, n: int) -> list:
    return [item for item in drawn for _ in range(n)]


def _mean_by_capability(drawn: list[tuple[Capability, Sample]], rewards_N_G: torch.Tensor) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for (cap, _), row in zip(drawn, rewards_N_G):
        sums.setdefault(cap.name, []).append(float(row.mean()))
    return {name: sum(v) / len(v) for name, v in sums.items()}
