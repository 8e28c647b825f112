"""From parts (RL rollouts, OPD rollouts) to one differentiable loss, via the pure core.

The policy implementation calls `rl_loss` and `opd_loss` with its own log-probs; it never
branches on the algorithm. OPD estimators are a registry (METHOD.md, OPD):
- sampled:  A_t = beta * (log pi_t - log pi_s) at the sampled token (the paper's estimator)
- baseline: the same minus a per-position baseline -KL(pi_s || pi_t) (unbiased, lower variance)
- exact_kl: minimise beta * KL(pi_s || pi_t) over the vocabulary at each student-visited state
"""

from __future__ import annotations

from typing import Callable

import torch

from copd.core.advantages import opd_baseline_advantage, opd_sampled_advantage
from copd.core.losses import aggregate_loss, clipped_pg_loss, masked_mean, reverse_kl_per_token
from copd.core.overlap import mean_delta, symmetric_kl, topk_overlap
from copd.backends.roles import LossSpec, OPDPart, RLPart


def rl_loss(logprobs_B_T, old_B_T, part: RLPart, spec: LossSpec) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss with group advantages (METHOD.md, GRPO)."""
    mask = part.rollouts.completion_mask_B_T
    loss_B_T, clipped_B_T = clipped_pg_loss(logprobs_B_T, old_B_T, part.advantages_B_T, spec.eps_low, spec.eps_high)
    loss = aggregate_loss(loss_B_T, mask, spec.aggregation)
    return loss, {"pg_loss": loss.item(), "clip_frac": masked_mean(clipped_B_T.float(), mask).item()}


def _sampled(logprobs, dist, old, part: OPDPart, spec: LossSpec):
    mask = part.rollouts.completion_mask_B_T
    adv = opd_sampled_advantage(part.teacher.token_logprobs_B_T, old, mask, part.beta)
    loss_B_T, clipped = clipped_pg_loss(logprobs, old, adv, spec.eps_low, spec.eps_high)
    return loss_B_T, clipped, adv


def _baseline(logprobs, dist, old, part: OPDPart, spec: LossSpec):
    mask = part.rollouts.completion_mask_B_T
    adv = opd_baseline_advantage(
        part.teacher.token_logprobs_B_T, old, part.teacher.dist_logprobs_B_T_V, dist.detach(), mask, part.beta
    )
    loss_B_T, clipped = clipped_pg_loss(logprobs, old, adv, spec.eps_low, spec.eps_high)
    return loss_B_T, clipped, adv


def _exact_kl(logprobs, dist, old, part: OPDPart, spec: LossSpec):
    # Gradient flows through the student's whole distribution, not through sampled tokens.
    kl_B_T = reverse_kl_per_token(dist, part.teacher.dist_logprobs_B_T_V)
    return part.beta * kl_B_T, torch.zeros_like(kl_B_T, dtype=torch.bool), -part.beta * kl_B_T.detach()


OPD_ESTIMATORS: dict[str, Callable] = {"sampled": _sampled, "baseline": _baseline, "exact_kl": _exact_kl}


def opd_loss(logprobs_B_T, dist_B_T_V, old_B_T, part: OPDPart, spec: LossSpec) -> tuple[torch.Tensor, dict, dict]:
    """OPD loss of one edge plus the edge's diagnostics on the student's own states."""
    if spec.opd_estimator not in OPD_ESTIMATORS:
        raise ValueError(f"unknown OPD estimator {spec.opd_estimator!r}; valid: {sorted(OPD_ESTIMATORS)}")
    mask = part.rollouts.completion_mask_B_T
    loss_B_T, clipped, adv = OPD_ESTIMATORS[spec.opd_estimator](logprobs_B_T, dist_B_T_V, old_B_T, part, spec)
    loss = aggregate_loss(loss_B_T, mask, spec.aggregation)
    edge = edge_diagnostics(dist_B_T_V.detach(), old_B_T, part, spec.overlap_k)
    edge.update(opd_adv_mean=masked_mean(adv, mask).item(), opd_loss=loss.item())
    return loss, {"opd_clip_frac": masked_mean(clipped.float(), mask).item()}, edge


def edge_diagnostics(student_dist_B_T_V, student_token_B_T, part: OPDPart, k: int) -> dict[str, float]:
    """Top-k overlap, symmetric KL and mean delta (METHOD.md, Diagnostics)."""
    mask = part.rollouts.completion_mask_B_T
    teacher = part.teacher
    return {
        "overlap_topk": topk_overlap(student_dist_B_T_V, teacher.dist_logprobs_B_T_V, mask, k).item(),
        "sym_kl": symmetric_kl(student_dist_B_T_V, teacher.dist_logprobs_B_T_V, mask).item(),
        "delta_mean": mean_delta(teacher.token_logprobs_B_T, student_token_B_T, mask).item(),
        "tokens": float(mask.sum().item()),
    }
