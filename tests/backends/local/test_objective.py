"""The loss glue of copd.backends.local.objective (parts to one loss, metrics into a Tally), against hand-computed numbers."""

import math

import pytest
import torch

from copd.backends.local.objective import Tally, edge_diagnostics, opd_inputs, opd_loss, rl_loss
from copd.backends.roles import LossSpec, OPDPart, RLPart, Rollouts, Scores
from copd.core.losses import loss_normaliser

# Two rollouts of 3 completion slots: row 0 has 3 tokens, row 1 has 2 and one padded slot.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
SPEC = LossSpec()  # token_mean, clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]


def rollouts() -> Rollouts:
    ids = torch.tensor([[9, 1, 2, 3], [9, 4, 5, 0]])  # a one-token prompt, then the completion slots
    return Rollouts(ids, torch.ones_like(ids), 1, MASK.clone(), ["abc", "de"])


def rl_part(advantages=(2.0, -1.0)) -> RLPart:
    return RLPart(rollouts(), torch.tensor(advantages)).resolved()


def test_at_ratio_one_the_rl_loss_is_minus_the_mean_advantage_over_real_tokens():
    # A = +2 on row 0's 3 tokens, -1 on row 1's 2 tokens; the padded slot counts for nothing.
    # token loss = -A: (-2 - 2 - 2 + 1 + 1) / 5 tokens = -0.8; d loss / d logp = -A / 5.
    old = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -4.0]])
    logp = old.clone().requires_grad_(True)
    tally = Tally()
    loss = rl_loss(logp, old, rl_part(), SPEC, tally=tally)
    assert loss.item() == pytest.approx(-0.8)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.4, -0.4, -0.4], [0.2, 0.2, 0.0]]))
    assert tally.result() == pytest.approx({"pg_loss": -0.8, "clip_frac": 0.0})


def ratios_with_two_clipped():
    # rho per token (old log-probs 0, so logp = log rho); the padded slot's 5.0 is garbage.
    # token  A   rho  rho*A  clip(rho)*A        smaller -> loss
    # (0,0)  +2  1.5  3.0    1.28 * 2 = 2.56    clipped    -2.56
    # (0,1)  +2  1.0  2.0    2.0                rho*A      -2.0
    # (0,2)  +2  1.0  2.0    2.0                rho*A      -2.0
    # (1,0)  -1  0.5  -0.5   0.8 * -1 = -0.8    clipped    0.8
    # (1,1)  -1  1.0  -1.0   -1.0               rho*A      1.0
    logp = torch.tensor([[1.5, 1.0, 1.0], [0.5, 1.0, 5.0]]).log().requires_grad_(True)
    return logp, torch.zeros(2, 3)


def test_the_clip_binds_outside_the_range_and_the_tally_counts_the_clipped_tokens():
    logp, old = ratios_with_two_clipped()
    tally = Tally()
    loss = rl_loss(logp, old, rl_part(), SPEC, tally=tally)
    # (-2.56 - 2 - 2 + 0.8 + 1) / 5 = -4.76 / 5 = -0.952
    assert loss.item() == pytest.approx(-0.952)
    # 2 of the 5 tokens clipped; a clipped token has no gradient, the others -A / 5.
    assert tally.result() == pytest.approx({"pg_loss": -0.952, "clip_frac": 0.4})
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.4, -0.4], [0.0, 0.2, 0.0]]))


def test_micro_batches_with_the_parts_normaliser_add_up_to_the_whole_loss():
    logp, old = ratios_with_two_clipped()
    part = rl_part()
    normaliser = loss_normaliser(MASK, "token_mean")  # the part's 5 tokens
    assert normaliser.item() == 5
    tally, own = Tally(), []
    for rows, width in ((torch.tensor([0]), 3), (torch.tensor([1]), 2)):  # row 1 trimmed to its 2 tokens
        micro = part.micro(rows, width)
        cut_logp, cut_old = logp[rows, :width], old[rows, :width]
        rl_loss(cut_logp, cut_old, micro, SPEC, normaliser, tally)
        own.append(rl_loss(cut_logp, cut_old, micro, SPEC).item())
    # With the normaliser: -6.56 / 5 + 1.8 / 5 = -1.312 + 0.36 = -0.952, the one-shot loss.
    # clip_frac: 1 of 3 tokens, then 1 of 2, weighted by tokens: (1 + 1) / 5 = 0.4.
    assert tally.result() == pytest.approx({"pg_loss": -0.952, "clip_frac": 0.4})
    # Each by its own count instead: -6.56 / 3 = -2.18667 and 1.8 / 2 = 0.9, summing to another number.
    assert own == pytest.approx([-6.56 / 3, 0.9])
    assert sum(own) == pytest.approx(-1.28667, abs=1e-5)


def test_a_token_weight_multiplies_each_token_loss():
    # Ratio 1, token losses [[-2, -2, -2], [1, 1, pad]] times the weights:
    # (-1 - 2 - 4 + 1 + 3) / 5 = -3 / 5 = -0.6 (the padded slot's weight 7 counts for nothing).
    old = torch.zeros(2, 3)
    weight = torch.tensor([[0.5, 1.0, 2.0], [1.0, 3.0, 7.0]])
    assert rl_loss(old.clone(), old, rl_part(), SPEC, weight_B_T=weight).item() == pytest.approx(-0.6)


def opd_part(scores: Scores) -> OPDPart:
    return OPDPart(rollouts(), scores, beta=0.5, edge="b->a")


# The student's log-probs of the sampled tokens when it sampled them (old), and the teacher's; 9.0 is padding garbage.
STUDENT = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
TEACHER = torch.tensor([[-0.5, -3.0, -0.5], [-0.5, -1.2, 9.0]])


def test_the_sampled_estimator_with_token_scores_only():
    # delta = teacher - old (the student when it sampled) = [[0.5, -1.0, 0.0], [1.0, -1.0, pad]]
    # A = beta * delta = 0.5 * delta = [[0.25, -0.5, 0.0], [0.5, -0.5, 0]]
    # The student has moved since: logp = old + 0.1, rho = e^0.1 = 1.105 inside [0.8, 1.28], so token loss = -rho * A:
    # e^0.1 * (-0.25 + 0.5 - 0 - 0.5 + 0.5) / 5 = e^0.1 * 0.05
    logp = (STUDENT + 0.1).requires_grad_(True)
    tally, edge = Tally(), Tally()
    loss = opd_loss(logp, None, None, STUDENT, opd_part(Scores(TEACHER)), SPEC, tally=tally, edge=edge)
    assert loss.item() == pytest.approx(math.exp(0.1) * 0.05)
    loss.backward()  # -rho * A / 5 at each real token
    torch.testing.assert_close(logp.grad, math.exp(0.1) * torch.tensor([[-0.05, 0.1, 0.0], [-0.1, 0.1, 0.0]]))
    assert tally.result() == pytest.approx({"opd_clip_frac": 0.0})
    # delta_mean = (0.5 - 1 + 0 + 1 - 1) / 5 = -0.1; opd_adv_mean = beta * that = -0.05.
    # No support sent: no overlap or symmetric KL, only the mean delta.
    assert edge.result() == pytest.approx({"delta_mean": -0.1, "opd_adv_mean": -0.05, "opd_loss": math.exp(0.1) * 0.05,
                                           "tokens": 5.0})


# A sent support: the teacher's top-2 ids first, then the student's top-2 (the ids it asked for).
# position  teacher top-2  student top-2  shared / 2
# (0,0)     1 2            1 2            1
# (0,1)     1 2            2 3            0.5
# (0,2)     1 2            3 4            0
# (1,0)     5 6            6 5            1
# (1,1)     5 6            7 8            0
# (1,2)     1 2            1 2            (padding: 1, not counted)
TEACHER_TOP = torch.tensor([[[1, 2], [1, 2], [1, 2]], [[5, 6], [5, 6], [1, 2]]])
STUDENT_TOP = torch.tensor([[[1, 2], [2, 3], [3, 4]], [[6, 5], [7, 8], [1, 2]]])
# On the teacher's top-2 the teacher has (0.5, 0.25) and the student (0.25, 0.5); on an id of the
# student's only, both have 0.1 (a repeated id's entry is dropped, so its value is never read).
TEACHER_SUPPORT = torch.tensor([0.5, 0.25, 0.1, 0.1]).log().expand(2, 3, 4)
STUDENT_SUPPORT = torch.tensor([0.25, 0.5, 0.1, 0.1]).log().expand(2, 3, 4)


def scores_with_support() -> Scores:
    ids = torch.cat([TEACHER_TOP, STUDENT_TOP], dim=-1).int()
    return Scores(TEACHER, ids, TEACHER_SUPPORT, topk=2)


def test_a_sent_support_gives_the_top_k_overlap_and_the_symmetric_kl_on_it():
    part, spec = opd_part(scores_with_support()), LossSpec(overlap_k=2)
    found = edge_diagnostics(opd_inputs(STUDENT, STUDENT_SUPPORT, STUDENT, part, spec), STUDENT_TOP, part.teacher, 2)
    # overlap: (1 + 0.5 + 0 + 1 + 0) / 5 real tokens = 0.5 (0.583 if the padding counted).
    # KL on S and rest at every position: the 0.1 ids and the rests (equal on both sides) add 0, so
    # KL(t || s) = 0.5 ln 2 + 0.25 ln 0.5 = 0.25 ln 2, KL(s || t) = 0.25 ln 0.5 + 0.5 ln 2 = 0.25 ln 2.
    assert found == pytest.approx({"delta_mean": -0.1, "overlap_topk": 0.5, "sym_kl": 0.5 * math.log(2)})
    # Asked for more than the teacher's top-2: the mean delta only.
    assert edge_diagnostics(opd_inputs(STUDENT, STUDENT_SUPPORT, STUDENT, part, spec), STUDENT_TOP, part.teacher, 4) == \
        pytest.approx({"delta_mean": -0.1})


def test_exact_kl_trains_on_the_support_and_the_edge_gets_its_diagnostics():
    # loss_t = beta KL_S(s || t) = 0.5 * 0.25 ln 2 = 0.125 ln 2 at every token, so its token mean too;
    # the advantage is minus that.
    edge = Tally()
    support = STUDENT_SUPPORT.clone().requires_grad_(True)
    spec = LossSpec(opd_estimator="exact_kl", overlap_k=2)
    loss = opd_loss(STUDENT, support, STUDENT_TOP, STUDENT, opd_part(scores_with_support()), spec, edge=edge)
    kl = 0.125 * math.log(2)
    assert loss.item() == pytest.approx(kl)
    assert edge.result() == pytest.approx({"delta_mean": -0.1, "overlap_topk": 0.5, "sym_kl": 0.5 * math.log(2),
                                           "opd_adv_mean": -kl, "opd_loss": kl, "tokens": 5.0})
    loss.backward()
    assert support.grad[1, 2].abs().sum() == 0 and support.grad[0, 0, :2].abs().sum() > 0  # padding gets no gradient


def test_a_tally_weighs_means_by_tokens_and_adds_totals():
    tally = Tally()
    tally.mean("clip_frac", 1.0, 3)  # micro-batch 1: all 3 tokens clipped
    tally.mean("clip_frac", 0.0, 1)
    tally.total("opd_loss", 0.25)
    tally.total("opd_loss", -0.75)
    tally.mean("empty", 2.0, 0)  # no tokens: divided by 1, not 0
    assert tally.result() == pytest.approx({"clip_frac": 0.75, "opd_loss": -0.5, "empty": 0.0})
