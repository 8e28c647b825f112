"""Behavioural-overlap diagnostics on student-visited states (docs/method.md §7).

All inputs are computed on the student's own rollouts; positions where mask is 0
(prompt, padding) are ignored. Results are scalars for logging.
"""

from __future__ import annotations

from torch import Tensor

from .losses import masked_mean, reverse_kl_per_token


def topk_overlap(
    student_logprobs_B_T_V: Tensor,
    teacher_logprobs_B_T_V: Tensor,
    mask_B_T: Tensor,
    k: int,
) -> Tensor:
    """O_k = mean over masked positions of |TopK(p_s) ∩ TopK(p_t)| / k.

    Ties inside a distribution are resolved by torch.topk's choice. The intersection is
    counted by comparing the two k-id lists pairwise ([B, T, k, k] booleans) instead of a
    one-hot over the vocabulary: same result (top-k ids within one list are distinct),
    but memory scales with k^2 rather than V, which matters for 150k-token vocabularies.
    """
    vocab = student_logprobs_B_T_V.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"topk_overlap needs 1 <= k <= vocabulary size {vocab}, got k={k}")
    ids_s_B_T_K = student_logprobs_B_T_V.detach().topk(k, dim=-1).indices
    ids_t_B_T_K = teacher_logprobs_B_T_V.detach().topk(k, dim=-1).indices
    match_B_T_K_K = ids_s_B_T_K.unsqueeze(-1) == ids_t_B_T_K.unsqueeze(-2)
    shared_B_T = match_B_T_K_K.any(dim=-1).sum(dim=-1)
    return masked_mean(shared_B_T.float() / k, mask_B_T)


def symmetric_kl(
    student_logprobs_B_T_V: Tensor,
    teacher_logprobs_B_T_V: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """Mean over masked positions of KL(p_s || p_t) + KL(p_t || p_s) over the vocabulary."""
    s_B_T_V = student_logprobs_B_T_V.detach()
    t_B_T_V = teacher_logprobs_B_T_V.detach()
    sym_B_T = reverse_kl_per_token(s_B_T_V, t_B_T_V) + reverse_kl_per_token(t_B_T_V, s_B_T_V)
    return masked_mean(sym_B_T, mask_B_T)


def mean_delta(
    teacher_token_logprobs_B_T: Tensor,
    student_token_logprobs_B_T: Tensor,
    mask_B_T: Tensor,
) -> Tensor:
    """Mean of delta_t = log p_t(y_t) - log p_s(y_t) over masked tokens.

    This is the average raw OPD signal (before beta); its expectation is -KL(p_s || p_t),
    so it is <= 0 on average and moves towards 0 as the branches converge.
    """
    delta_B_T = teacher_token_logprobs_B_T.detach() - student_token_logprobs_B_T.detach()
    return masked_mean(delta_B_T, mask_B_T)
