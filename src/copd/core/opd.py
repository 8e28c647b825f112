"""On-policy distillation from sparse teacher scores (docs/method.md §4).

What a teacher sends for a student's rollouts is never its distribution over the whole
vocabulary. It is, always, its log-prob of every sampled token, [B, T]; and, only when an
estimator or a diagnostic needs it, its log-probs on a small support of ids per position:
S_t = TopK(pi_t(.|ctx_t)) ∪ TopK(pi_s(.|ctx_t)), laid out as [B, T, S] with the teacher's
own top-k first (in descending order) and the student's requested ids after them. Ids may
repeat across the two halves; `first_occurrence` marks the copies to count.

KL on a support (§4, "Sparse teacher scores"): each distribution is coarsened to
S ∪ {rest}, where rest carries the mass outside S, 1 - sum_{v in S} p(v):
    KL_S(p || q) = sum_{v in S} p(v) log(p(v) / q(v)) + p(rest) log(p(rest) / q(rest)).
By the log-sum inequality KL_S <= KL (coarsening never adds information), with equality
when S is the whole vocabulary or p / q is constant over the tail. So the support forms
are lower bounds that become exact as k grows; the full-vocabulary functions in
copd.core.overlap are the oracle they are tested against.

An estimator is a small function in OPD_ESTIMATORS and declares whether it needs the
support; the paper's `sampled` estimator needs only the [B, T] token log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .advantages import beta_per_row, opd_sampled_advantage
from .losses import clipped_pg_loss, masked_mean

# Mass outside the support below this counts as none. A float32 sum of probabilities is only
# good to about 1e-7 per term, so when a support holds (almost) all of both distributions' mass,
# 1 - sum is rounding noise; flooring both rests makes their term vanish instead of adding noise
# (and keeps it finite). A real tail of mass m contributes at most about m log(m / floor).
REST_FLOOR = 1e-6


def first_occurrence(ids_B_T_S: Tensor) -> Tensor:
    """True at the first copy of each id along the last axis.

    A stable sort puts copies side by side in their original order, so a copy is any entry
    equal to its left neighbour in sorted order: O(S log S), whatever the support's size
    (the whole vocabulary included).
    """
    sorted_B_T_S, order_B_T_S = ids_B_T_S.sort(dim=-1, stable=True)
    repeat_B_T_S = torch.zeros_like(sorted_B_T_S, dtype=torch.bool)
    repeat_B_T_S[..., 1:] = sorted_B_T_S[..., 1:] == sorted_B_T_S[..., :-1]
    return torch.zeros_like(repeat_B_T_S).scatter(-1, order_B_T_S, ~repeat_B_T_S)


def _with_rest(logprobs_B_T_S: Tensor, keep_B_T_S: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probs on S with repeats masked out, log of the mass outside S [B, T])."""
    logp = torch.where(keep_B_T_S, logprobs_B_T_S, torch.full_like(logprobs_B_T_S, float("-inf")))
    inside_B_T = logp.logsumexp(-1).exp()
    rest_B_T = (1.0 - inside_B_T).clamp(min=REST_FLOOR)
    return logp, rest_B_T.log()


def support_kl(p_logprobs_B_T_S: Tensor, q_logprobs_B_T_S: Tensor, keep_B_T_S: Tensor) -> Tensor:
    """KL(p || q) of the two distributions coarsened to S ∪ {rest}, at each position [B, T].

    Differentiable in both arguments (exact_kl trains the student through it). Ids that
    repeat in S (keep False) are left out; terms with p(v) = 0 count 0 (0 log 0 = 0).
    """
    p, p_rest = _with_rest(p_logprobs_B_T_S, keep_B_T_S)
    q, q_rest = _with_rest(q_logprobs_B_T_S, keep_B_T_S)
    p_S = p.exp()
    log_ratio = torch.where(p_S > 0, p - q, torch.zeros_like(p))
    return (p_S * log_ratio).sum(-1) + p_rest.exp() * (p_rest - q_rest)


def support_symmetric_kl(student_B_T_S: Tensor, teacher_B_T_S: Tensor, keep_B_T_S: Tensor, mask_B_T: Tensor) -> Tensor:
    """Mean over masked positions of KL_S(p_s || p_t) + KL_S(p_t || p_s) (a lower bound of the full value)."""
    s, t = student_B_T_S.detach(), teacher_B_T_S.detach()
    return masked_mean(support_kl(s, t, keep_B_T_S) + support_kl(t, s, keep_B_T_S), mask_B_T)


def ids_overlap(student_topk_B_T_K: Tensor, teacher_topk_B_T_K: Tensor, mask_B_T: Tensor) -> Tensor:
    """O_k = mean over masked positions of |TopK(p_s) ∩ TopK(p_t)| / k, from the two id lists.

    Exact: both top-k lists are known (the teacher's is the head of its support). Ids
    within one list are distinct, so a pairwise k x k compare counts the intersection.
    """
    k = student_topk_B_T_K.shape[-1]
    match_B_T_K_K = student_topk_B_T_K.unsqueeze(-1) == teacher_topk_B_T_K.unsqueeze(-2)
    return masked_mean(match_B_T_K_K.any(-1).sum(-1).float() / k, mask_B_T)


def support_diagnostics(student_topk_B_T_K: Tensor, teacher_topk_B_T_K: Tensor, student_support_B_T_S: Tensor,
                        teacher_support_B_T_S: Tensor, support_ids_B_T_S: Tensor, mask_B_T: Tensor) -> dict[str, float]:
    """Top-k overlap (exact) and symmetric KL on the support (a lower bound) of one edge (docs/method.md §7)."""
    keep_B_T_S = first_occurrence(support_ids_B_T_S)
    return {
        "overlap_topk": ids_overlap(student_topk_B_T_K, teacher_topk_B_T_K, mask_B_T).item(),
        "sym_kl": support_symmetric_kl(student_support_B_T_S, teacher_support_B_T_S, keep_B_T_S, mask_B_T).item(),
    }


@dataclass
class OPDInputs:
    """One edge's tensors as its student's update sees them (all [B, T] or [B, T, S])."""

    student_logprobs_B_T: Tensor  # log pi_s(y_t), with gradient
    old_logprobs_B_T: Tensor  # the same at sampling time, detached
    teacher_logprobs_B_T: Tensor  # log pi_t(y_t), from the teacher
    mask_B_T: Tensor
    beta: float | Tensor
    eps_low: float
    eps_high: float
    student_support_B_T_S: Tensor | None = None  # log pi_s on the support, with gradient
    teacher_support_B_T_S: Tensor | None = None
    keep_B_T_S: Tensor | None = None  # first_occurrence of the support ids


Estimate = tuple[Tensor, Tensor, Tensor]  # (loss_B_T, clipped_B_T, advantage_B_T)


def _pg(x: OPDInputs, adv_B_T: Tensor) -> Estimate:
    loss_B_T, clipped_B_T = clipped_pg_loss(x.student_logprobs_B_T, x.old_logprobs_B_T, adv_B_T, x.eps_low, x.eps_high)
    return loss_B_T, clipped_B_T, adv_B_T


def _sampled(x: OPDInputs) -> Estimate:
    # A_t = beta (log pi_t(y_t) - log pi_s(y_t)): the paper's estimator (§4).
    return _pg(x, opd_sampled_advantage(x.teacher_logprobs_B_T, x.old_logprobs_B_T, x.mask_B_T, x.beta))


def _baseline(x: OPDInputs) -> Estimate:
    # A_t = beta (delta_t - b_t) with b_t = -KL_S(pi_s || pi_t): context-only, so unbiased (§4).
    baseline_B_T = -support_kl(x.student_support_B_T_S.detach(), x.teacher_support_B_T_S, x.keep_B_T_S)
    delta_B_T = x.teacher_logprobs_B_T - x.old_logprobs_B_T.detach()
    adv_B_T = beta_per_row(x.beta, delta_B_T) * (delta_B_T - baseline_B_T)
    return _pg(x, torch.where(x.mask_B_T.bool(), adv_B_T, torch.zeros_like(adv_B_T)))


def _exact_kl(x: OPDInputs) -> Estimate:
    # loss_t = beta KL_S(pi_s || pi_t), the gradient through the student's distribution on S
    # (exact over the whole vocabulary when S is all of it, i.e. opd.topk: null).
    kl_B_T = support_kl(x.student_support_B_T_S, x.teacher_support_B_T_S, x.keep_B_T_S)
    scaled_B_T = beta_per_row(x.beta, kl_B_T) * kl_B_T
    return scaled_B_T, torch.zeros_like(kl_B_T, dtype=torch.bool), -scaled_B_T.detach()


@dataclass(frozen=True)
class Estimator:
    fn: Callable[[OPDInputs], Estimate]
    needs_support: bool  # True: the teacher must send log-probs on the top-k support


OPD_ESTIMATORS: dict[str, Estimator] = {
    "sampled": Estimator(_sampled, needs_support=False),
    "baseline": Estimator(_baseline, needs_support=True),
    "exact_kl": Estimator(_exact_kl, needs_support=True),
}


def opd_estimate(name: str, x: OPDInputs) -> Estimate:
    """(loss_B_T, clipped_B_T, advantage_B_T) of one edge with the named estimator."""
    try:
        estimator = OPD_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown OPD estimator {name!r}; valid: {', '.join(OPD_ESTIMATORS)}") from None
    if estimator.needs_support and x.teacher_support_B_T_S is None:
        raise ValueError(f"the {name!r} estimator needs the teacher's log-probs on the top-k support")
    return estimator.fn(x)
