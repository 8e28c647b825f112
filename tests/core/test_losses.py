"""Hand-computed checks for copd.core.losses."""

import math

import pytest
import torch

from copd.core.losses import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    approx_kl,
    clipped_pg_loss,
    masked_mean,
    reverse_kl_per_token,
)


def test_clipped_pg_loss_values_flags_and_gradients():
    # eps_low 0.2, eps_high 0.28 -> clip range [0.8, 1.28]. old logprobs 0, so rho = exp(logp).
    # pos rho  A   rho*A  clip*A  active   loss   d loss / d logp
    # 0   1.5  +1  1.5    1.28    clipped  -1.28  0
    # 1   0.5  -1  -0.5   -0.8    clipped  0.8    0
    # 2   1.5  -1  -1.5   -1.28   rho*A    1.5    -A*rho = 1.5
    # 3   0.5  +1  0.5    0.8     rho*A    -0.5   -0.5
    # 4   1.0  +2  2.0    2.0     rho*A    -2.0   -2.0
    # 5   1.1  +1  1.1    1.1     rho*A    -1.1   -1.1
    rho = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0, 1.1]])
    logp = rho.log().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0, 1.0]])
    loss, clipped = clipped_pg_loss(logp, torch.zeros_like(logp), adv, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.8, 1.5, -0.5, -2.0, -1.1]]))
    assert clipped.tolist() == [[True, True, False, False, False, False]]
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 1.5, -0.5, -2.0, -1.1]]))


def test_clipped_pg_loss_ratio_one_keeps_gradient():
    # One update per batch: logp == old in value, rho = 1, grad = -A (not halved by a tie).
    logp = torch.tensor([[-0.7, -1.2]], requires_grad=True)
    loss, clipped = clipped_pg_loss(logp, logp.detach(), torch.tensor([[0.5, -3.0]]), 0.2, 0.2)
    loss.sum().backward()
    assert not clipped.any()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 3.0]]))


def _ragged():
    # Row 0: 4 tokens [1,2,3,4]; row 1: 2 tokens [5,6]; row 2: none. 100 = padding garbage.
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0], [100.0] * 4])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    return loss, mask


def test_aggregation_modes_on_ragged_mask():
    loss, mask = _ragged()
    # token_mean: (10 + 11) / 6 tokens = 3.5
    assert aggregate_loss(loss, mask, "token_mean").item() == pytest.approx(3.5)
    # seq_mean: row means 2.5 and 5.5; empty row 2 excluded -> 4.0
    assert aggregate_loss(loss, mask, "seq_mean").item() == pytest.approx(4.0)
    # seq_sum_norm: 21 / (B*T = 3*4) = 1.75
    assert aggregate_loss(loss, mask, "seq_sum_norm").item() == pytest.approx(1.75)


def test_aggregation_gradients_and_nan_padding():
    loss, mask = _ragged()
    loss[2, 0] = float("nan")  # garbage at a padded position must not leak
    loss.requires_grad_(True)
    aggregate_loss(loss, mask, "seq_mean").backward()
    # seq_mean weights: row 0 tokens 1/4 / 2 rows = 0.125; row 1 tokens 1/2 / 2 = 0.25.
    expected = torch.tensor([[0.125] * 4, [0.25, 0.25, 0, 0], [0.0] * 4])
    torch.testing.assert_close(loss.grad, expected)


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
def test_aggregation_empty_mask_is_zero_with_grad(mode):
    loss = torch.ones(2, 3, requires_grad=True)
    out = aggregate_loss(loss, torch.zeros(2, 3), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(2, 3))


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "sum")


def test_reverse_kl_hand_value_and_gradient():
    # p_s = [0.5,0.5], p_t = [0.8,0.2]: KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2)
    # = 0.5 ln(1.5625) = ln 1.25 = 0.223144.
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    log_t = torch.tensor([[[0.8, 0.2]]]).log()
    kl = reverse_kl_per_token(logits.log_softmax(-1), log_t)
    assert kl.shape == (1, 1)
    assert kl.item() == pytest.approx(math.log(1.25), abs=1e-6)
    kl.sum().backward()
    # dKL/dz_0 = p_s0 * (ln(p_s0/p_t0) - KL) = 0.5 * (ln 0.625 - ln 1.25) = 0.5 ln 0.5 = -0.34657
    half_ln2 = 0.5 * math.log(2)
    torch.testing.assert_close(logits.grad, torch.tensor([[[-half_ln2, half_ln2]]]))


def test_reverse_kl_zero_student_prob_is_finite():
    # p_s = [1, 0]: only v=0 counts -> KL = ln(1/0.5) = ln 2, and the gradient has no NaN.
    log_s = torch.tensor([[[0.0, float("-inf")]]], requires_grad=True)
    kl = reverse_kl_per_token(log_s, torch.tensor([[[0.5, 0.5]]]).log())
    assert kl.item() == pytest.approx(math.log(2))
    kl.sum().backward()
    assert torch.isfinite(log_s.grad).all()


def test_approx_kl_k3():
    # log rho = [ln 2, 0, ln 0.5 (masked)]: k3(ln 2) = (2-1) - ln 2 = 0.306853, k3(0) = 0.
    # mean over 2 masked tokens = 0.153426.
    logp = torch.tensor([[math.log(2), 0.0, math.log(0.5)]])
    out = approx_kl(logp, torch.zeros(1, 3), torch.tensor([[1, 1, 0]]))
    assert out.item() == pytest.approx((1 - math.log(2)) / 2, abs=1e-6)


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    assert masked_mean(x, torch.tensor([[1, 0], [1, 1]])).item() == pytest.approx(14 / 3)
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0
