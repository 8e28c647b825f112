"""The engine/learner gap and its corrections, against hand-computed numbers."""

import math

import pytest
import torch

from copd.core.correction import ROLLOUT_CORRECTIONS, correction_weight, engine_mismatch

LEARNER = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)]])
ENGINE = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.9)]])  # ratios 2.5, 0.4, 1.0
MASK = torch.tensor([[1.0, 1.0, 0.0]])


@pytest.mark.parametrize(("name", "expected"), [("tis", [2.0, 0.4, 1.0]), ("mask", [0.0, 0.0, 1.0]), ("none", [1.0, 1.0, 1.0])])
def test_each_correction_weighs_tokens_by_the_importance_ratio(name, expected):
    weight = correction_weight(name, LEARNER, ENGINE, cap=2.0)
    assert weight.tolist()[0] == pytest.approx(expected)


def test_a_ratio_inside_the_band_is_kept_by_masking():
    assert correction_weight("mask", LEARNER, ENGINE, cap=3.0).tolist()[0] == pytest.approx([1.0, 1.0, 1.0])


def test_weights_carry_no_gradient():
    learner = LEARNER.clone().requires_grad_()
    assert not correction_weight("tis", learner, ENGINE, 2.0).requires_grad


def test_mismatch_is_measured_on_completion_tokens_only():
    weight = correction_weight("tis", LEARNER, ENGINE, 2.0)
    found = engine_mismatch(LEARNER, ENGINE, MASK, weight)
    gap = math.log(2.5)  # |log 0.5 - log 0.2| = |log 0.2 - log 0.5|
    assert found["engine_logprob_gap"] == pytest.approx(gap)
    k3 = ((2.5 - 1 - math.log(2.5)) + (0.4 - 1 - math.log(0.4))) / 2
    assert found["engine_kl"] == pytest.approx(k3)
    assert found["engine_weight_mean"] == pytest.approx((2.0 + 0.4) / 2)


def test_identical_log_probs_give_no_gap_and_unit_weights():
    for name in ROLLOUT_CORRECTIONS:
        weight = correction_weight(name, LEARNER, LEARNER, 2.0)
        found = engine_mismatch(LEARNER, LEARNER, MASK, weight)
        assert found == {"engine_logprob_gap": 0.0, "engine_kl": 0.0, "engine_weight_mean": 1.0}
