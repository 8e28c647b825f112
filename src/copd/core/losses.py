"""Policy-gradient loss, its aggregation over tokens, and KL helpers.

Token loss (docs/method.md §3): -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t)
with rho_t = pi_theta(y_t) / pi_old(y_t). The same loss serves RLVR and OPD advantages.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _token_mean(loss_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    # DAPO: sum over every masked token of the batch / number of masked tokens, so long
    # responses weigh in proportion to their length.
    return masked_mean(loss_B_T, mask_B_T)


def _seq_mean(loss_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    # GRPO paper: mean over each sequence's tokens, then over sequences. Rows with no
    # tokens are left out of the outer mean rather than counted as zeros.
    keep_B_T = mask_B_T.bool()
    masked_B_T = torch.where(keep_B_T, loss_B_T, torch.zeros_like(loss_B_T))
    count_B = keep_B_T.sum(dim=-1)
    row_mean_B = masked_B_T.sum(dim=-1) / count_B.clamp(min=1)
    valid_B = count_B > 0
    kept_sum = torch.where(valid_B, row_mean_B, torch.zeros_like(row_mean_B)).sum()
    return kept_sum / valid_B.sum().clamp(min=1)


def _seq_sum_norm(loss_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    # Dr.GRPO: sum over masked tokens / (B * T_padded), a constant normaliser, which
    # removes the length bias of dividing by each response's own length.
    keep_B_T = mask_B_T.bool()
    total = torch.where(keep_B_T, loss_B_T, torch.zeros_like(loss_B_T)).sum()
    return total / max(loss_B_T.numel(), 1)


LOSS_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token_mean": _token_mean,
    "seq_mean": _seq_mean,
    "seq_sum_norm": _seq_sum_norm,
}


def aggregate_loss(loss_B_T: Tensor, mask_B_T: Tensor, mode: str) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar with one of LOSS_AGGREGATIONS."""
    try:
        fn = LOSS_AGGREGATIONS[mode]
    except KeyError:
        valid = ", ".join(sorted(LOSS_AGGREGATIONS))
        raise ValueError(f"unknown loss aggregation {mode!r}; valid modes: {valid}") from None
    return fn(loss_B_T, mask_B_T)


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
