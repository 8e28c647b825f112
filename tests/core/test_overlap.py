"""Hand-computed checks for copd.core.overlap."""

import math

import pytest
import torch

from copd.core.overlap import mean_delta, symmetric_kl, topk_overlap


def _two_positions():
    # Position 0: student ranks ids 0 > 1 > 2, teacher ranks 1 > 2 > 0.
    # Position 1: student ranks 3 > 4 > 2, teacher ranks 4 > 3 > 2.
    s = torch.tensor([[[5.0, 4.0, 1.0, 0.0, -1.0], [0.0, -1.0, 1.0, 5.0, 4.0]]]).log_softmax(-1)
    t = torch.tensor([[[1.0, 5.0, 4.0, 0.0, -1.0], [0.0, -1.0, 1.0, 4.0, 5.0]]]).log_softmax(-1)
    return s, t


def test_topk_overlap_counts_by_hand():
    s, t = _two_positions()
    mask = torch.ones(1, 2)
    # k=2: pos0 {0,1} & {1,2} = {1} -> 1/2; pos1 {3,4} & {4,3} -> 2/2. Mean 0.75.
    assert topk_overlap(s, t, mask, 2).item() == pytest.approx(0.75)
    # k=1: pos0 0 vs 1, pos1 3 vs 4 -> 0.
    assert topk_overlap(s, t, mask, 1).item() == pytest.approx(0.0)
    # k=3: pos0 {0,1,2} = {1,2,0}; pos1 {3,4,2} = {4,3,2} -> 1.
    assert topk_overlap(s, t, mask, 3).item() == pytest.approx(1.0)
    # Masking position 1 leaves only pos0 at k=2 -> 0.5.
    assert topk_overlap(s, t, torch.tensor([[1, 0]]), 2).item() == pytest.approx(0.5)


def test_topk_overlap_bad_k():
    s, t = _two_positions()
    with pytest.raises(ValueError, match="k"):
        topk_overlap(s, t, torch.ones(1, 2), 6)


def test_symmetric_kl_bernoulli():
    # p_s = [0.5,0.5], p_t = [0.8,0.2].
    # KL(s||t) = ln 1.25 = 0.223144
    # KL(t||s) = 0.8 ln 1.6 + 0.2 ln 0.4 = 0.376003 - 0.183258 = 0.192745
    # sum = 0.415888. Position 1 has identical distributions -> 0.
    s = torch.tensor([[[0.5, 0.5], [0.3, 0.7]]]).log()
    t = torch.tensor([[[0.8, 0.2], [0.3, 0.7]]]).log()
    hand = math.log(1.25) + 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    assert hand == pytest.approx(0.415888, abs=1e-6)
    assert symmetric_kl(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(hand, abs=1e-6)
    assert symmetric_kl(s, t, torch.ones(1, 2)).item() == pytest.approx(hand / 2, abs=1e-6)
    # Symmetric by construction.
    assert symmetric_kl(t, s, torch.ones(1, 2)).item() == pytest.approx(hand / 2, abs=1e-6)


def test_mean_delta():
    # deltas t - s = [[1, 0], [-2, (masked)]] -> mean (1 + 0 - 2) / 3 = -1/3.
    t = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    s = torch.tensor([[-2.0, -2.0], [-1.0, -1.0]])
    out = mean_delta(t, s, torch.tensor([[1, 1], [1, 0]]))
    assert out.item() == pytest.approx(-1 / 3)
