"""Hand-computed checks for copd.core.advantages."""

import math

import pytest
import torch

from copd.core.advantages import (
    GROUP_ADVANTAGES,
    group_advantages,
    opd_sampled_advantage,
    zero_signal_groups,
)


def test_grpo_one_success_of_four():
    # r = [1,0,0,0]: mean 0.25, deviations [0.75,-0.25,-0.25,-0.25],
    # unbiased var = (0.5625 + 3*0.0625) / 3 = 0.25 -> std 0.5 -> A = [1.5,-0.5,-0.5,-0.5].
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards, "grpo", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]))
    # Default eps 1e-6: 0.75 / 0.500001 = 1.499997 (not exactly 1.5).
    adv_eps = group_advantages(rewards)
    assert adv_eps[0, 0].item() == pytest.approx(0.75 / 0.500001, rel=1e-6)
    assert adv_eps[0, 0].item() < 1.5
    # eps = 0.5 makes the denominator 1.0, so A equals the plain deviations.
    adv_big = group_advantages(rewards, eps=0.5)
    torch.testing.assert_close(adv_big, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_grpo_uniform_group_is_zero_and_rows_independent():
    # Row 0 all equal -> deviations 0, std 0 -> 0 / eps = 0. Row 1 = [0,1]:
    # mean 0.5, unbiased std sqrt(0.5) -> A = +-0.5/0.70711 = +-0.70711.
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    adv = group_advantages(rewards, eps=1e-12)  # eps only guards the 0/0 of row 0
    s = 0.5 / math.sqrt(0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0], [-s, s]]))


def test_dr_grpo_no_std_division():
    # Dr.GRPO: r - mean = [0.75,-0.25,-0.25,-0.25]; eps is irrelevant.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards, "dr_grpo", eps=123.0)
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_integer_rewards_and_single_rollout():
    # Int pass/fail rewards are promoted to float; [2,0] -> mean 1, std sqrt(2) -> +-0.70711.
    adv = group_advantages(torch.tensor([[2, 0]]), eps=0.0)
    s = 1.0 / math.sqrt(2.0)
    torch.testing.assert_close(adv, torch.tensor([[s, -s]]))
    # G = 1: unbiased std is undefined; no group signal -> zeros, never NaN.
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))


def test_unknown_kind_lists_valid_names():
    with pytest.raises(ValueError) as err:
        group_advantages(torch.zeros(1, 2), kind="ppo")
    for name in GROUP_ADVANTAGES:
        assert name in str(err.value)


def test_zero_signal_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert zero_signal_groups(rewards).tolist() == [True, False, True]


def test_opd_sampled_advantage_float_beta_and_mask():
    # delta = t - s = [1, 0, -2]; beta 0.5 -> [0.5, 0, -1], last position masked -> 0.
    teacher = torch.tensor([[-1.0, -2.0, -3.0]])
    student = torch.tensor([[-2.0, -2.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    adv = opd_sampled_advantage(teacher, student, mask, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 0.0]]))
    assert not adv.requires_grad  # advantages are constants in the policy gradient


def test_opd_sampled_advantage_per_row_beta():
    # Row 0 delta [1, -1] * 1.0; row 1 delta [2, 4] * 0.1 -> [0.2, 0.4].
    teacher = torch.tensor([[0.0, -1.0], [-1.0, 0.0]])
    student = torch.tensor([[-1.0, 0.0], [-3.0, -4.0]])
    mask = torch.ones(2, 2)
    adv = opd_sampled_advantage(teacher, student, mask, torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0], [0.2, 0.4]]))
