"""Scores of policies on capabilities' test splits: greedy accuracy and sampled pass rate."""

from __future__ import annotations

from copd.backends.roles import Policy, Prompt, SamplingParams
from copd.capabilities import Capability, Sample
from copd.evaluation.records import EvalSettings, score_model


def pass_rates(
    policy: Policy,
    capabilities: list[Capability],
    samples: dict[str, list[Sample]],
    params: SamplingParams,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, float]:
    """Mean verifier reward per capability, one completion per sample."""
    rates = {}
    for cap in capabilities:
        items = samples[cap.name]
        total = 0.0
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rollouts = policy.generate([Prompt.of(s) for s in chunk], 1, params, seed + start)
            total += sum(cap.score(text, s) for text, s in zip(rollouts.completions, chunk))
        rates[cap.name] = total / max(len(items), 1)
    return rates


def evaluate_policy(policy: Policy, capabilities: list[Capability], n: int, params: SamplingParams, batch_size: int = 128, seed: int = 0) -> dict:
    """{"greedy": accuracy per capability, "sampled": pass rate at the rollout temperature} on the first `n` test
    prompts, one sampled completion each (copd.evaluation.records.score_model with n = 1)."""
    settings = EvalSettings(params.max_new_tokens, params.temperature, params.top_p, 1, batch_size, seed)
    # The label names a progress bar (there is none); the records are dropped, so nothing is read from them.
    found, _ = score_model(policy, "", capabilities, n, settings, read=False)
    return {"greedy": found["greedy"], "sampled": found["sampled"]}
