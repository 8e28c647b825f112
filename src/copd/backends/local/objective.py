"""From parts (RL rollouts, OPD rollouts) to one differentiable loss, via the pure core.

A policy calls `rl_loss` and `opd_loss` with its own log-probs; it never branches on the
algorithm. The OPD estimators are the registry copd.core.opd.OPD_ESTIMATORS
(docs/method.md §4): `sampled` (the paper's, teacher log-probs of the sampled tokens only),
`baseline` and `exact_kl` (log-probs on the top-k support too). The student's own full
distribution is local to its update; of the teacher's, only the sparse scores are here.
"""

from __future__ import annotations

import torch

from copd.backends.roles import LossSpec, OPDPart, RLPart, Scores
from copd.core.losses import aggregate_loss, clipped_pg_loss, masked_mean
from copd.core.opd import OPDInputs, first_occurrence, opd_estimate, support_diagnostics
from copd.core.overlap import mean_delta


class Tally:
    """Metrics of one part gathered over its micro-batches: token-weighted means and plain sums.

    A micro-batch reports its masked mean with its token count; the part's mean is the
    count-weighted mean of those, which is the mean over the part's tokens.
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def mean(self, name: str, value: float, tokens: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value * tokens
        self.weights[name] = self.weights.get(name, 0.0) + tokens

    def total(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def result(self) -> dict[str, float]:
        return {k: v / max(self.weights[k], 1.0) if k in self.weights else v for k, v in self.sums.items()}


def rl_loss(logprobs_B_T, old_B_T, part: RLPart, spec: LossSpec, normaliser=None, tally: Tally | None = None,
            weight_B_T=None) -> torch.Tensor:
    """Clipped policy-gradient loss with group advantages (docs/method.md §3).

    `normaliser`: the whole part's (copd.core.losses.loss_normaliser) when these rows are
    one micro-batch of it; `tally` collects pg_loss and clip_frac; `weight_B_T`: each token's
    rollout-engine correction (copd.core.correction), None when the learner sampled.
    """
    mask = part.rollouts.completion_mask_B_T
    loss_B_T, clipped_B_T = clipped_pg_loss(logprobs_B_T, old_B_T, part.advantages_B_T, spec.eps_low, spec.eps_high)
    loss = aggregate_loss(_weighted(loss_B_T, weight_B_T), mask, spec.aggregation, normaliser)
    if tally is not None:
        tally.total("pg_loss", loss.item())
        tally.mean("clip_frac", masked_mean(clipped_B_T.float(), mask).item(), _tokens(mask))
    return loss


def opd_inputs(logprobs_B_T, support_B_T_S, old_B_T, part: OPDPart, spec: LossSpec) -> OPDInputs:
    """The estimator's inputs: the student's log-probs (and, if sent, both sides on the teacher's support)."""
    teacher = part.teacher
    x = OPDInputs(logprobs_B_T, old_B_T, teacher.token_logprobs_B_T, part.rollouts.completion_mask_B_T, part.beta,
                  spec.eps_low, spec.eps_high)
    if teacher.support_ids_B_T_S is not None:
        x.student_support_B_T_S = support_B_T_S
        x.teacher_support_B_T_S = teacher.support_logprobs_B_T_S
        x.keep_B_T_S = first_occurrence(teacher.support_ids_B_T_S.long())
    return x


def opd_loss(logprobs_B_T, support_B_T_S, student_topk_B_T_K, old_B_T, part: OPDPart, spec: LossSpec, normaliser=None,
             tally: Tally | None = None, edge: Tally | None = None, weight_B_T=None) -> torch.Tensor:
    """OPD loss of one edge; `tally` gets opd_clip_frac, `edge` the edge's diagnostics on the student's own states.

    support_B_T_S: the student's log-probs on the teacher's support ids (None when no support
    was sent); student_topk_B_T_K: the student's top-`overlap_k` ids (for the diagnostics).
    """
    x = opd_inputs(logprobs_B_T, support_B_T_S, old_B_T, part, spec)
    loss_B_T, clipped, adv = opd_estimate(spec.opd_estimator, x)
    loss = aggregate_loss(_weighted(loss_B_T, weight_B_T), x.mask_B_T, spec.aggregation, normaliser)
    tokens = _tokens(x.mask_B_T)
    if tally is not None:
        tally.mean("opd_clip_frac", masked_mean(clipped.float(), x.mask_B_T).item(), tokens)
    if edge is not None:
        for name, value in edge_diagnostics(x, student_topk_B_T_K, part.teacher, spec.overlap_k).items():
            edge.mean(name, value, tokens)
        edge.mean("opd_adv_mean", masked_mean(adv, x.mask_B_T).item(), tokens)
        edge.total("opd_loss", loss.item())
        edge.total("tokens", tokens)
    return loss


def _weighted(loss_B_T, weight_B_T):
    return loss_B_T if weight_B_T is None else loss_B_T * weight_B_T


def _tokens(mask_B_T) -> float:
    return float(mask_B_T.sum().item())


def edge_diagnostics(x: OPDInputs, student_topk_B_T_K, teacher: Scores, k: int) -> dict[str, float]:
    """Mean delta always; top-k overlap and symmetric KL when the teacher sent its support (docs/method.md §7)."""
    found = {"delta_mean": mean_delta(x.teacher_logprobs_B_T, x.old_logprobs_B_T, x.mask_B_T).item()}
    if teacher.support_ids_B_T_S is not None and teacher.topk >= k and student_topk_B_T_K is not None:
        found.update(support_diagnostics(student_topk_B_T_K[..., :k], teacher.topk_ids_B_T_K[..., :k], x.student_support_B_T_S.detach(),
                                         x.teacher_support_B_T_S, teacher.support_ids_B_T_S.long(), x.mask_B_T))
    return found
