"""Policy-gradient loss, its aggregation over tokens, and KL helpers.

Token loss (docs/method.md §3): -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t)
with rho_t = pi_theta(y_t) / pi_old(y_t). The same loss serves RLVR and OPD advantages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def masked_mean(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Mean of x over positions where mask is nonzero; 0 (still in the graph) if none."""
    keep_B_T = mask_B_T.bool()
    # where, not multiply: a NaN/inf at a padded position must not leak into the sum.
    total = torch.where(keep_B_T, x_B_T, torch.zeros_like(x_B_T)).sum()
    return total / keep_B_T.sum().clamp(min=1)


def clipped_pg_loss(
    logprobs_B_T: Tensor,
    old_logprobs_B_T: Tensor,
    advantages_B_T: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss and a bool map of where the clipped branch is active.

    Returns (loss_B_T, clipped_B_T). clipped_B_T is True exactly where the clipped term
    is the (strictly) smaller objective, i.e. the gradient is zero because of clipping:
    A > 0 with rho > 1 + eps_high, or A < 0 with rho < 1 - eps_low. eps_high > eps_low
    is DAPO's clip-higher.
    """
    rho_B_T = torch.exp(logprobs_B_T - old_logprobs_B_T.detach())
    adv_B_T = advantages_B_T.detach()
    unclipped_B_T = rho_B_T * adv_B_T
    clipped_obj_B_T = torch.clamp(rho_B_T, 1.0 - eps_low, 1.0 + eps_high) * adv_B_T
    clipped_B_T = clipped_obj_B_T < unclipped_B_T
    # where instead of torch.minimum: on ties minimum splits the gradient between both
    # branches; selecting the unclipped one keeps the full gradient there.
    objective_B_T = torch.where(clipped_B_T, clipped_obj_B_T, unclipped_B_T)
    return -objective_B_T, clipped_B_T


# An aggregation is split into a sum over a micro-batch's tokens and a normaliser taken over the
# whole part (every micro-batch of one RL batch or one OPD edge), so that the micro-batches'
# losses add up to the part's loss: sum_m total(m) / count(part) = total(part) / count(part).
# Normalising each micro-batch by its own count instead is the gradient-accumulation bug
# (a token mean becomes a mean of micro-batch means).


def _masked_sum(loss_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    keep_B_T = mask_B_T.bool()
    return torch.where(keep_B_T, loss_B_T, torch.zeros_like(loss_B_T)).sum()


def _token_count(mask_B_T: Tensor) -> Tensor:
    # DAPO: sum over every masked token of the batch / number of masked tokens, so long
    # responses weigh in proportion to their length.
    return mask_B_T.bool().sum()


def _row_means_sum(loss_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    # GRPO paper: mean over each sequence's tokens, then over sequences. Rows with no
    # tokens are left out of the outer mean rather than counted as zeros.
    keep_B_T = mask_B_T.bool()
    masked_B_T = torch.where(keep_B_T, loss_B_T, torch.zeros_like(loss_B_T))
    count_B = keep_B_T.sum(dim=-1)
    row_mean_B = masked_B_T.sum(dim=-1) / count_B.clamp(min=1)
    return torch.where(count_B > 0, row_mean_B, torch.zeros_like(row_mean_B)).sum()


def _row_count(mask_B_T: Tensor) -> Tensor:
    return (mask_B_T.bool().sum(dim=-1) > 0).sum()


def _padded_count(mask_B_T: Tensor) -> Tensor:
    # Dr.GRPO: sum over masked tokens / (B * T_padded), a constant normaliser, which
    # removes the length bias of dividing by each response's own length. T is the part's
    # padded length, never a micro-batch's trimmed one.
    return torch.tensor(mask_B_T.numel())


@dataclass(frozen=True)
class Aggregation:
    total: Callable[[Tensor, Tensor], Tensor]  # (loss_B_T, mask_B_T) -> what these rows add
    count: Callable[[Tensor], Tensor]  # mask_B_T of the whole part -> its normaliser


LOSS_AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": Aggregation(_masked_sum, _token_count),
    "seq_mean": Aggregation(_row_means_sum, _row_count),
    "seq_sum_norm": Aggregation(_masked_sum, _padded_count),
}


def _aggregation(mode: str) -> Aggregation:
    try:
        return LOSS_AGGREGATIONS[mode]
    except KeyError:
        valid = ", ".join(sorted(LOSS_AGGREGATIONS))
        raise ValueError(f"unknown loss aggregation {mode!r}; valid modes: {valid}") from None


def part_count(mask_B_T: Tensor, mode: str) -> Tensor:
    """What `mode` counts in these rows (tokens, rows or padded slots); counts of disjoint rows add up."""
    return _aggregation(mode).count(mask_B_T)


def loss_normaliser(mask_B_T: Tensor, mode: str) -> Tensor:
    """What `mode` divides a part's summed loss by, from the part's whole completion mask (at least 1)."""
    return part_count(mask_B_T, mode).clamp(min=1)


def aggregate_loss(loss_B_T: Tensor, mask_B_T: Tensor, mode: str, normaliser: Tensor | None = None) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar with one of LOSS_AGGREGATIONS.

    With `normaliser` (loss_normaliser of the whole part) these rows are one micro-batch of
    a part, and the micro-batches' results add up to the part's loss.
    """
    aggregation = _aggregation(mode)
    count = aggregation.count(mask_B_T).clamp(min=1) if normaliser is None else normaliser
    return aggregation.total(loss_B_T, mask_B_T) / count


def reverse_kl_per_token(student_logprobs_B_T_V: Tensor, teacher_logprobs_B_T_V: Tensor) -> Tensor:
    """KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)) at each position, [B, T].

    Differentiable w.r.t. the student (the exact-KL OPD objective). Terms with
    p_s(v) = 0 count as 0 (the 0 log 0 = 0 convention) instead of 0 * inf = NaN.
    """
    p_s_B_T_V = student_logprobs_B_T_V.exp()
    log_ratio_B_T_V = student_logprobs_B_T_V - teacher_logprobs_B_T_V
    log_ratio_B_T_V = torch.where(p_s_B_T_V > 0, log_ratio_B_T_V, torch.zeros_like(log_ratio_B_T_V))
    return (p_s_B_T_V * log_ratio_B_T_V).sum(dim=-1)


def approx_kl(logprobs_B_T: Tensor, old_logprobs_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(pi_old || pi_theta) over masked tokens (a diagnostic).

    With samples from pi_old and rho = pi_theta / pi_old, (rho - 1) - log rho is
    unbiased for that KL and never negative (log x <= x - 1).
    """
    log_rho_B_T = (logprobs_B_T - old_logprobs_B_T).detach()
    k3_B_T = torch.expm1(log_rho_B_T) - log_rho_B_T
    return masked_mean(k3_B_T, mask_B_T)
