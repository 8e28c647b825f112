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


def rl_loss(logprobs_B_T, old_B_T, part: RLPart, spec: LossSpec) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss with group advantages (docs/method.md §3)."""
    mask = part.rollouts.completion_mask_B_T
    loss_B_T, clipped_B_T = clipped_pg_loss(logprobs_B_T, old_B_T, part.advantages_B_T, spec.eps_low, spec.eps_high)
    loss = aggregate_loss(loss_B_T, mask, spec.aggregation)
    return loss, {"pg_loss": loss.item(), "clip_frac": masked_mean(clipped_B_T.float(), mask).item()}


def opd_inputs(logprobs_B_T, dist_B_T_V, old_B_T, part: OPDPart, spec: LossSpec) -> OPDInputs:
    """The estimator's inputs: the student's log-probs (and, if sent, both sides on the teacher's support)."""
    teacher = part.teacher
    x = OPDInputs(logprobs_B_T, old_B_T, teacher.token_logprobs_B_T, part.rollouts.completion_mask_B_T, part.beta,
                  spec.eps_low, spec.eps_high)
    if teacher.support_ids_B_T_S is not None:
        ids = teacher.support_ids_B_T_S.long()
        x.student_support_B_T_S = dist_B_T_V.gather(-1, ids)
        x.teacher_support_B_T_S = teacher.support_logprobs_B_T_S
        x.keep_B_T_S = first_occurrence(ids)
    return x


def opd_loss(logprobs_B_T, dist_B_T_V, old_B_T, part: OPDPart, spec: LossSpec) -> tuple[torch.Tensor, dict, dict]:
    """OPD loss of one edge plus the edge's diagnostics on the student's own states."""
    x = opd_inputs(logprobs_B_T, dist_B_T_V, old_B_T, part, spec)
    loss_B_T, clipped, adv = opd_estimate(spec.opd_estimator, x)
    loss = aggregate_loss(loss_B_T, x.mask_B_T, spec.aggregation)
    edge = edge_diagnostics(x, dist_B_T_V.detach(), part.teacher, spec.overlap_k)
    edge.update(opd_adv_mean=masked_mean(adv, x.mask_B_T).item(), opd_loss=loss.item())
    return loss, {"opd_clip_frac": masked_mean(clipped.float(), x.mask_B_T).item()}, edge


def edge_diagnostics(x: OPDInputs, student_dist_B_T_V, teacher: Scores, k: int) -> dict[str, float]:
    """Mean delta always; top-k overlap and symmetric KL when the teacher sent its support (docs/method.md §7)."""
    found = {"delta_mean": mean_delta(x.teacher_logprobs_B_T, x.old_logprobs_B_T, x.mask_B_T).item(),
             "tokens": float(x.mask_B_T.sum().item())}
    if teacher.support_ids_B_T_S is not None and teacher.topk >= k:
        student_topk = student_dist_B_T_V.topk(k, dim=-1).indices
        found.update(support_diagnostics(student_topk, teacher.topk_ids_B_T_K[..., :k], x.student_support_B_T_S.detach(),
                                         x.teacher_support_B_T_S, teacher.support_ids_B_T_S.long(), x.mask_B_T))
    return found
