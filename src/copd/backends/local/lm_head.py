"""Log-probs at chosen token ids from hidden states, the LM head run over token chunks.

A policy needs, at each completion position, its log-prob of a few ids: the sampled token,
and for sparse teacher scores a support of top-k ids (docs/method.md §4). The log-softmax
behind them spans the whole vocabulary, so computed at once for a step it is a [tokens, V]
tensor: 16k tokens x 151,936 ids in fp32 is 10 GB for one rollout, and its gradient as
much again. Here the hidden states are cut into chunks of LOGITS_PER_CHUNK // V tokens; a
chunk's logits live only while its few values are gathered, and in the backward pass they
are recomputed from the chunk's hidden states (torch.utils.checkpoint). No [tokens, V]
tensor larger than one chunk's ever exists, in the forward or the backward pass.

torch's `linear_cross_entropy` chunks the same way but returns only the target's log-prob;
the support values, the top-k ids and the scores need more, hence this small function on
the well-kept checkpoint mechanism (the same recomputation activation checkpointing uses).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

# At most this many logits (256 MB in fp32) exist at once: for Qwen3's 151,936-id vocabulary,
# chunks of 441 tokens; for SmolLM2's 49,152, 1,365.
LOGITS_PER_CHUNK = 2**26


class HeadValues(NamedTuple):
    """What the head gives at N positions: log-probs at the asked ids, and top-k ids and log-probs."""

    logprobs_N_J: torch.Tensor
    topk_ids_N_K: torch.Tensor | None = None
    topk_logprobs_N_K: torch.Tensor | None = None


def chunk_tokens(vocab: int, logits_per_chunk: int | None = None) -> int:
    """Positions per chunk so that a chunk's logits stay within logits_per_chunk (default LOGITS_PER_CHUNK)."""
    return max(1, (logits_per_chunk or LOGITS_PER_CHUNK) // max(vocab, 1))


def _chunk_values(head, hidden_C_H: torch.Tensor, ids_C_J: torch.Tensor, k: int):
    # fp32 log-softmax, as the model's logits are used everywhere else (.float().log_softmax).
    logprobs_C_V = head(hidden_C_H).float().log_softmax(-1)
    values_C_J = logprobs_C_V.gather(-1, ids_C_J)
    if not k:
        return values_C_J, None, None
    top = logprobs_C_V.detach().topk(k, dim=-1)
    return values_C_J, top.indices, top.values


def head_values(hidden_N_H: torch.Tensor, head, ids_N_J: torch.Tensor, topk: int = 0,
                logits_per_chunk: int | None = None) -> HeadValues:
    """log softmax(head(h))[ids] at each of N positions, and (topk > 0) the top-k ids and their log-probs.

    Differentiable in the hidden states and the head's weights when gradients are on; the
    top-k (ids, log-probs) never carry a gradient. `head` is the model's output embedding
    module, so autocast and adapters apply as in the model's own forward.
    """
    vocab = head.weight.shape[0]
    k = min(topk, vocab)
    size = chunk_tokens(vocab, logits_per_chunk)
    track = torch.is_grad_enabled() and (hidden_N_H.requires_grad or head.weight.requires_grad)
    parts = []
    for start in range(0, hidden_N_H.shape[0], size):
        h, ids = hidden_N_H[start : start + size], ids_N_J[start : start + size]
        if track:  # forward keeps only the chunk's inputs; backward recomputes its logits
            parts.append(checkpoint(_chunk_values, head, h, ids, k, use_reentrant=False))
        else:
            parts.append(_chunk_values(head, h, ids, k))
    if not parts:
        empty = hidden_N_H.new_zeros(0, ids_N_J.shape[-1], dtype=torch.float32)
        none = (hidden_N_H.new_zeros(0, k, dtype=torch.long), hidden_N_H.new_zeros(0, k, dtype=torch.float32)) if k else (None, None)
        return HeadValues(empty, *none)
    values = torch.cat([p[0] for p in parts])
    if not k:
        return HeadValues(values)
    return HeadValues(values, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))
