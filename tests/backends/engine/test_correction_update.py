"""An update on rollouts a rollout engine sampled: the engine/learner gap is recorded and corrected per token."""

import dataclasses

import pytest
import torch

from copd.backends.roles import LossSpec, RLPart, SamplingParams
from tests.backends.local.test_hf import PROMPTS, tiny_policy


def engine_rollouts(policy, shift: float):
    """The policy's own rollouts, as if an engine had sampled them with log-probs `shift` off the learner's."""
    rollouts = policy.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4), seed=3)
    own = policy.score(rollouts).token_logprobs_B_T
    return dataclasses.replace(rollouts, sampler_logprobs_B_T=(own + shift) * rollouts.completion_mask_B_T)


def update(rollouts, correction="tis", seed=0):
    policy = tiny_policy(seed=seed)
    advantages = torch.tensor([1.0, -1.0] * 3)
    spec = LossSpec(correction=correction, step_kl=False)
    return policy.update([RLPart(rollouts, advantages)], [], spec)


def test_an_engine_that_agrees_with_the_learner_leaves_the_update_as_it_is():
    policy = tiny_policy()
    agreeing = engine_rollouts(policy, 0.0)
    plain = dataclasses.replace(agreeing, sampler_logprobs_B_T=None)
    corrected, reference = update(agreeing), update(plain)
    assert corrected.metrics["engine_logprob_gap"] < 1e-5
    assert corrected.metrics["engine_kl"] < 1e-6
    assert corrected.metrics["loss"] == pytest.approx(reference.metrics["loss"], rel=1e-5)
    assert "engine_logprob_gap" not in reference.metrics  # the learner sampled: nothing to compare


@pytest.mark.parametrize(("correction", "factor"), [("tis", 2.0), ("mask", 0.0), ("none", 1.0)])
def test_a_distant_engine_is_corrected_per_token(correction, factor):
    # The engine put every sampled token at e^-1 of the learner's probability: ratio e > cap 2.
    policy = tiny_policy()
    distant = engine_rollouts(policy, -1.0)
    reference = update(dataclasses.replace(distant, sampler_logprobs_B_T=None))
    corrected = update(distant, correction)
    assert corrected.metrics["engine_logprob_gap"] == pytest.approx(1.0, abs=1e-4)
    assert corrected.metrics["engine_weight_mean"] == pytest.approx(factor, abs=1e-4)
    assert corrected.metrics["pg_loss"] == pytest.approx(factor * reference.metrics["pg_loss"], abs=1e-6)
