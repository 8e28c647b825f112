"""Sparse teacher scores: support KL against hand-computed numbers and the full-vocabulary oracle."""

import math

import pytest
import torch

from copd.core.losses import reverse_kl_per_token
from copd.core.opd import (
    OPD_ESTIMATORS,
    OPDInputs,
    first_occurrence,
    ids_overlap,
    opd_estimate,
    support_diagnostics,
    support_kl,
    support_symmetric_kl,
)
from copd.core.overlap import symmetric_kl, topk_overlap


def logp(*probs):
    return torch.tensor(probs, dtype=torch.float64).log().view(1, 1, -1)


def test_first_occurrence_marks_repeated_ids():
    ids = torch.tensor([[[3, 1, 3, 2, 1]]])
    assert first_occurrence(ids).tolist() == [[[True, True, False, True, False]]]


def test_support_kl_by_hand():
    p, q = [0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]
    on = lambda dist, ids: logp(*[dist[i] for i in ids])  # noqa: E731
    ids = [0, 1]
    keep = torch.ones(1, 1, 2, dtype=torch.bool)
    # Coarsened to {0, 1, rest}: rest masses 0.2 and 0.5.
    expected = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    assert support_kl(on(p, ids), on(q, ids), keep).item() == pytest.approx(expected)
    full = reverse_kl_per_token(logp(*p), logp(*q)).item()
    assert expected < full  # coarsening loses the difference inside the tail
    # A repeated id is counted once.
    repeated = [0, 1, 0]
    keep = first_occurrence(torch.tensor([[repeated]]))
    assert support_kl(on(p, repeated), on(q, repeated), keep).item() == pytest.approx(expected)


def test_support_kl_is_exact_on_the_whole_vocabulary():
    p, q = [0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.2, 0.3]
    keep = torch.ones(1, 1, 4, dtype=torch.bool)
    assert support_kl(logp(*p), logp(*q), keep).item() == pytest.approx(reverse_kl_per_token(logp(*p), logp(*q)).item())


def test_support_kl_equals_the_full_value_when_the_ratio_is_flat_in_the_tail():
    p, q = [0.6, 0.2, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]  # p / q = 1/3 on both tail ids
    keep = torch.ones(1, 1, 2, dtype=torch.bool)
    assert support_kl(logp(*p[:2]), logp(*q[:2]), keep).item() == pytest.approx(reverse_kl_per_token(logp(*p), logp(*q)).item())


def random_pair(vocab=50, B=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(B, T, vocab, generator=g)).log_softmax(-1)
    t = (s + torch.randn(B, T, vocab, generator=g)).log_softmax(-1)
    return s, t


def support(s, t, k):
    ids = torch.cat([t.topk(k, -1).indices, s.topk(k, -1).indices], -1)
    return ids, s.gather(-1, ids), t.gather(-1, ids), first_occurrence(ids)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_symmetric_kl_on_the_top_k_support_is_a_lower_bound_of_the_oracle(k):
    s, t = random_pair()
    mask = torch.ones(s.shape[:2])
    mask[0, -2:] = 0
    _ids, s_S, t_S, keep = support(s, t, k)
    sparse = support_symmetric_kl(s_S, t_S, keep, mask).item()
    full = symmetric_kl(s, t, mask).item()
    assert 0 < sparse <= full + 1e-6


def test_symmetric_kl_on_the_support_approaches_the_oracle_as_k_grows():
    s, t = random_pair()
    mask = torch.ones(s.shape[:2])
    full = symmetric_kl(s, t, mask).item()
    gaps = [full - support_symmetric_kl(*support(s, t, k)[1:], mask).item() for k in (2, 8, 25, 50)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] == pytest.approx(0, abs=1e-5)
    print("support k -> gap to the full symmetric KL:", dict(zip((2, 8, 25, 50), gaps)))


def test_overlap_from_id_lists_equals_the_oracle():
    s, t = random_pair()
    mask = torch.ones(s.shape[:2])
    for k in (1, 3, 8):
        sparse = ids_overlap(s.topk(k, -1).indices, t.topk(k, -1).indices, mask).item()
        assert sparse == pytest.approx(topk_overlap(s, t, mask, k).item())
    by_hand = ids_overlap(torch.tensor([[[0, 1]]]), torch.tensor([[[1, 2]]]), torch.ones(1, 1))
    assert by_hand.item() == 0.5


def test_support_diagnostics_reads_the_teacher_top_k_from_the_head_of_its_support():
    s, t = random_pair()
    mask = torch.ones(s.shape[:2])
    ids, s_S, t_S, _ = support(s, t, 4)
    found = support_diagnostics(s.topk(2, -1).indices, ids[..., :2], s_S, t_S, ids, mask)
    assert found["overlap_topk"] == pytest.approx(topk_overlap(s, t, mask, 2).item())
    assert found["sym_kl"] == pytest.approx(support_symmetric_kl(s_S, t_S, first_occurrence(ids), mask).item())


def inputs(s, t, ids, mask, beta=0.5):
    tokens = ids[..., 0]
    s_tok, t_tok = s.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), t.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return OPDInputs(s_tok, s_tok.detach(), t_tok, mask, beta, 0.2, 0.28, s.gather(-1, ids), t.gather(-1, ids), first_occurrence(ids))


def test_sampled_estimator_is_beta_times_delta_and_needs_no_support():
    s, t = random_pair()
    mask = torch.ones(s.shape[:2])
    x = inputs(s, t, s.topk(2, -1).indices, mask)
    x.student_support_B_T_S = x.teacher_support_B_T_S = x.keep_B_T_S = None
    loss, _clipped, adv = opd_estimate("sampled", x)
    torch.testing.assert_close(adv, 0.5 * (x.teacher_logprobs_B_T - x.student_logprobs_B_T))
    torch.testing.assert_close(loss, -adv)  # rho = 1 on the first pass
    assert not OPD_ESTIMATORS["sampled"].needs_support and OPD_ESTIMATORS["exact_kl"].needs_support
    with pytest.raises(ValueError, match="needs the teacher's log-probs"):
        opd_estimate("exact_kl", x)
    with pytest.raises(ValueError, match="unknown OPD estimator 'sampeld'"):
        opd_estimate("sampeld", x)


def test_exact_kl_on_the_whole_vocabulary_has_the_oracle_gradient():
    s, t = random_pair(vocab=12)
    mask = torch.ones(s.shape[:2])
    every = torch.arange(12).expand(*s.shape[:2], 12)
    logits = s.clone().requires_grad_(True)
    student = logits.log_softmax(-1)
    x = inputs(student, t, every, mask, beta=1.0)
    loss, _, _ = opd_estimate("exact_kl", x)
    (grad,) = torch.autograd.grad(loss.mean(), logits)
    (oracle,) = torch.autograd.grad(reverse_kl_per_token(logits.log_softmax(-1), t).mean(), logits)
    torch.testing.assert_close(grad, oracle, atol=1e-6, rtol=1e-4)


def test_baseline_estimator_subtracts_the_support_kl():
    s, t = random_pair()
    mask = torch.ones(s.shape[:2])
    x = inputs(s, t, torch.cat([t.topk(4, -1).indices, s.topk(4, -1).indices], -1), mask)
    _, _, adv = opd_estimate("baseline", x)
    delta = x.teacher_logprobs_B_T - x.student_logprobs_B_T
    expected = 0.5 * (delta + support_kl(x.student_support_B_T_S, x.teacher_support_B_T_S, x.keep_B_T_S))
    torch.testing.assert_close(adv, expected)


def whole_vocabulary(log_s, log_t, sampled, mask, beta):
    """OPDInputs with the support = every id (so the support KL is the exact one)."""
    ids = torch.arange(log_s.shape[-1]).expand(*log_s.shape[:2], -1)
    s_tok = log_s.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    t_tok = log_t.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    return OPDInputs(s_tok, s_tok, t_tok, mask, beta, 0.2, 0.28, log_s, log_t, first_occurrence(ids))


def test_baseline_estimator_by_hand():
    # p_s = [0.5, 0.5], p_t = [0.8, 0.2]: b = -KL(s||t) = 0.5 ln(0.8/0.5) + 0.5 ln(0.2/0.5) = ln 0.8.
    # Token 0: delta = ln 1.6, A = beta (ln 1.6 - ln 0.8) = beta ln 2; token 1: delta = ln 0.4, A = -beta ln 2.
    # E_{y~p_s}[A] = 0: the baseline centres the advantage.
    log_s = torch.tensor([0.5, 0.5]).log().expand(1, 3, 2)
    log_t = torch.tensor([0.8, 0.2]).log().expand(1, 3, 2)
    x = whole_vocabulary(log_s, log_t, torch.tensor([[0, 1, 0]]), torch.tensor([[1, 1, 0]]), 2.0)
    _, _, adv = opd_estimate("baseline", x)
    ln2 = math.log(2.0)
    torch.testing.assert_close(adv, torch.tensor([[2 * ln2, -2 * ln2, 0.0]]))


def test_baseline_with_a_zero_student_probability_is_finite():
    # p_s = [1, 0], p_t = [0.5, 0.5]: b = ln 0.5; token 0: delta = ln 0.5, so A = 0.
    log_s = torch.tensor([[[0.0, float("-inf")]]])
    log_t = torch.tensor([[[0.5, 0.5]]]).log()
    x = whole_vocabulary(log_s, log_t, torch.tensor([[0]]), torch.ones(1, 1), 1.0)
    _, _, adv = opd_estimate("baseline", x)
    torch.testing.assert_close(adv, torch.zeros(1, 1))


def test_first_occurrence_is_linear_in_memory_on_a_whole_vocabulary():
    # A support as large as a real vocabulary must not build an S x S table.
    ids = torch.randint(0, 151_936, (1, 2, 151_936 + 16))
    keep = first_occurrence(ids)
    for row in range(2):
        seen, expected = set(), []
        for v in ids[0, row, :2000].tolist():
            expected.append(v not in seen)
            seen.add(v)
        assert keep[0, row, :2000].tolist() == expected
