"""pass@k and mean@n against hand-computed values."""

import pytest

from copd.core.passk import pass_at_k, reported_ks, sample_scores


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 0, 1, 0.0),
    (4, 1, 1, 0.25),            # 1 - C(3,1)/C(4,1) = 1 - 3/4
    (4, 1, 2, 0.5),             # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),           # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (4, 3, 2, 1.0),             # n - c = 1 < k: every pair holds a correct sample
    (10, 3, 5, 1 - 21 / 252),   # 1 - C(7,5)/C(10,5)
    (4, 4, 4, 1.0),
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 0), (4, 1, 5), (4, 5, 1)])
def test_impossible_arguments_are_errors(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_reported_ks_are_powers_of_two_and_n():
    assert reported_ks(1) == [1]
    assert reported_ks(4) == [1, 2, 4]
    assert reported_ks(6) == [1, 2, 4, 6]


def test_sample_scores_average_over_prompts():
    # Prompt 1: 1 of 4 right; prompt 2: 2 of 4 right, and one partial reward of 0.5 that is not "correct".
    rewards = [[1, 0, 0, 0], [1, 1, 0.5, 0]]
    scores = sample_scores(rewards)
    assert scores["mean@4"] == pytest.approx((1 + 2.5) / 8)
    assert scores["pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert scores["pass@2"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert scores["pass@4"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same number"):
        sample_scores([[1, 0], [1]])
