"""The gap between a rollout engine and the learner, and the correction for it (docs/method.md §3).

A rollout engine (vLLM) samples token y_t with its own kernels, so its log-prob
log pi_engine(y_t) differs a little from the learner's log pi_old(y_t) on the same weights
(another attention kernel, another reduction order, bf16). The policy gradient assumes the
tokens were drawn from pi_old; they were drawn from pi_engine. Per token, the importance
ratio that makes up for it is

    w_t = pi_old(y_t) / pi_engine(y_t) = exp(log pi_old(y_t) - log pi_engine(y_t)),

and a correction multiplies each token's loss by a weight w^_t made from w_t, without
gradient. The ratio of a whole sequence is the product of its tokens' ratios, which
explodes on long completions from per-token gaps of ~0.01, so every correction here works
per token and bounds the weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .losses import masked_mean

CorrectionFn = Callable[[torch.Tensor, float], torch.Tensor]


def truncated_weight(ratio_B_T: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling: w^_t = min(w_t, cap). Never drops a token; bounds the variance."""
    return ratio_B_T.clamp(max=cap)


def masked_weight(ratio_B_T: torch.Tensor, cap: float) -> torch.Tensor:
    """Token masking: w^_t = 1 when 1/cap <= w_t <= cap, else 0 (the token leaves the loss)."""
    return ((ratio_B_T <= cap) & (ratio_B_T >= 1.0 / cap)).to(ratio_B_T.dtype)


def no_weight(ratio_B_T: torch.Tensor, cap: float) -> torch.Tensor:
    """No correction: every token as if the learner had sampled it."""
    return torch.ones_like(ratio_B_T)


ROLLOUT_CORRECTIONS: dict[str, CorrectionFn] = {
    "tis": truncated_weight,
    "mask": masked_weight,
    "none": no_weight,
}


def correction_weight(name: str, learner_B_T: torch.Tensor, engine_B_T: torch.Tensor, cap: float) -> torch.Tensor:
    """w^_t of correction `name` from both sides' log-probs of the sampled tokens (no gradient)."""
    ratio_B_T = (learner_B_T.detach().float() - engine_B_T.float()).exp()
    return ROLLOUT_CORRECTIONS[name](ratio_B_T, cap)


def engine_mismatch(learner_B_T: torch.Tensor, engine_B_T: torch.Tensor, mask_B_T: torch.Tensor,
                    weight_B_T: torch.Tensor) -> dict[str, float]:
    """How far the engine's log-probs are from the learner's on the sampled tokens.

    engine_logprob_gap: mean |log pi_old - log pi_engine| over completion tokens;
    engine_kl: the k3 estimate of KL(pi_engine || pi_old) from the engine's own samples,
        mean of (w - 1) - log w, which is >= 0 per token;
    engine_weight_mean: mean correction weight (1.0 when nothing was corrected).
    """
    log_ratio_B_T = learner_B_T.detach().float() - engine_B_T.float()
    k3_B_T = log_ratio_B_T.exp() - 1.0 - log_ratio_B_T
    return {
        "engine_logprob_gap": masked_mean(log_ratio_B_T.abs(), mask_B_T).item(),
        "engine_kl": masked_mean(k3_B_T, mask_B_T).item(),
        "engine_weight_mean": masked_mean(weight_B_T, mask_B_T).item(),
    }
