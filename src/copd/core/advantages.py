"""Per-token advantages: GRPO group normalisation (RLVR part) and OPD (distillation part).

Equations refer to docs/method.md: §3 gives A_i = (r_i - mean(r)) / (std(r) + eps);
"OPD" gives A_t = beta * (log pi_teacher(y_t) - log pi_student(y_t)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _grpo(rewards_N_G: Tensor, eps: float) -> Tensor:
    # GRPO: A_i = (r_i - mean_g r) / (std_g r + eps). Unbiased std (Bessel, torch default)
    # because that is what TRL and verl use, so numbers match what users expect.
    mean_N_1 = rewards_N_G.mean(dim=-1, keepdim=True)
    if rewards_N_G.shape[-1] < 2:
        # The unbiased std of one sample is NaN; a single rollout has no group signal.
        return torch.zeros_like(rewards_N_G)
    std_N_1 = rewards_N_G.std(dim=-1, keepdim=True)
    return (rewards_N_G - mean_N_1) / (std_N_1 + eps)


def _dr_grpo(rewards_N_G: Tensor, eps: float) -> Tensor:
    # Dr.GRPO: drop the std division, which up-weights near-uniform groups (a bias).
    del eps  # kept in the signature so every registry entry is called the same way
    return rewards_N_G - rewards_N_G.mean(dim=-1, keepdim=True)


GROUP_ADVANTAGES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
}


def group_advantages(rewards_N_G: Tensor, kind: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Sequence-level advantages for N prompts with G rollouts each, shape [N, G]."""
    try:
        fn = GROUP_ADVANTAGES[kind]
    except KeyError:
        valid = ", ".join(sorted(GROUP_ADVANTAGES))
        raise ValueError(f"unknown advantage kind {kind!r}; valid kinds: {valid}") from None
    # Integer/bool rewards (pass/fail) are promoted; float64 stays float64.
    if not rewards_N_G.is_floating_point():
        rewards_N_G = rewards_N_G.float()
    return fn(rewards_N_G, eps)


def zero_signal_groups(rewards_N_G: Tensor) -> Tensor:
    """Bool[N]: True where all G rewards are equal, so every GRPO advantage is zero.

    DAPO's dynamic sampling drops these groups: they add tokens to the denominator of
    the token-mean loss without adding gradient.
    """
    return (rewards_N_G == rewards_N_G[..., :1]).all(dim=-1)


def beta_per_row(beta: float | Tensor, like_B_T: Tensor) -> Tensor | float:
    # beta is per branch (a float) or per row (Tensor[B]) when a batch mixes edges.
    if isinstance(beta, Tensor) and beta.dim() == 1:
        return beta.to(like_B_T).unsqueeze(-1)
    return beta


def opd_sampled_advantage(
    teacher_logprobs_B_T: Tensor,
    student_logprobs_B_T: Tensor,
    mask_B_T: Tensor,
    beta: float | Tensor,
) -> Tensor:
    """OPD advantage at the sampled tokens: beta * (log p_t(y_t) - log p_s(y_t)).

    Its expectation over y_t ~ p_s is -beta * KL(p_s || p_t): a one-sample estimate of
    the negative reverse KL (docs/method.md §4). Advantages are constants in the policy
    gradient, so inputs are detached.
    """
    delta_B_T = teacher_logprobs_B_T.detach() - student_logprobs_B_T.detach()
    adv_B_T = beta_per_row(beta, delta_B_T) * delta_B_T
    return torch.where(mask_B_T.bool(), adv_B_T, torch.zeros_like(adv_B_T))
