"""KV-cache sampling and completion scoring of vision-language models, on copd.multimodal.inputs' positions.

Scoring (`vl_completion_logits`) runs the prompt with its pixel inputs once, then the
completion tokens on that cache, with the same positions as sampling (see
copd.multimodal.inputs for how M-RoPE positions work under left padding). A prompt's G
rows share one prefill, as in copd.backends.local.sampling.
"""

from __future__ import annotations

import torch

from copd.backends.local.sampling import RowNoise, Sampled, decode, decoder_body, repeat_groups, repeat_rows, replay_cache
from copd.backends.roles import SamplingParams
from copd.multimodal.inputs import FORWARD_PIXEL_KEYS, decode_positions, rope_positions


def _prefill(model, prompts: dict, rows_per_prompt: int = 1, hidden: bool = False):
    """(cache, logits [B, 1, V] at the last prompt slot, rope_deltas [B, 1]) for B = prompts x rows_per_prompt.

    Each distinct prompt runs once with its pixels; the expansion to its rows is an expand,
    so gradients of the copies add up (the same as running every copy). With `hidden`, the
    last slot's hidden state [B, 1, H] instead of its logits (see sampling.prefill).
    """
    positions, deltas = rope_positions(model, prompts)
    pixels = {k: prompts[k] for k in FORWARD_PIXEL_KEYS if prompts.get(k) is not None}
    inputs = dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], position_ids=positions,
                  use_cache=True, **pixels)
    if hidden:
        cache = replay_cache()  # kept here: under checkpointing the model returns no cache
        last = decoder_body(model)(**inputs, cache=cache).last_hidden_state[:, -1:]
    else:
        out = model(**inputs, logits_to_keep=1)
        cache, last = out.cache, out.logits
    cache, last = repeat_groups(cache, last, rows_per_prompt)
    return cache, last, repeat_rows(deltas, rows_per_prompt) if rows_per_prompt > 1 else deltas


@torch.no_grad()
def vl_sample(model, prompts: dict, params: SamplingParams, noise: RowNoise | None, eos_id: int, pad_id: int,
              rows_per_prompt: int = 1) -> Sampled:
    """(completion_ids [B, T], completion_mask [B, T], top-k ids or None): rows_per_prompt samples of each prompt.

    The mask is 1 on generated tokens up to and including EOS; finished rows are padded with pad_id.
    """
    mask = repeat_rows(prompts["attention_mask"], rows_per_prompt)
    cache, logits, deltas = _prefill(model, prompts, rows_per_prompt)
    return decode(model, cache, logits[:, -1], mask, params, eos_id, pad_id, noise,
                  lambda grown: decode_positions(grown, deltas, -1))


def vl_completion_logits(model, prompts: dict, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor,
                         prompt_len: int, rows_per_prompt: int = 1) -> torch.Tensor:
    """Logits [B, T, V] predicting each completion token (slots prompt_len .. L-1); differentiable.

    `prompts` are the distinct prompts with their pixels (so gradients reach the vision
    tower); then the completion tokens but the last run on the expanded cache with the
    positions sampling used. Completion tokens are text for M-RoPE, even a sampled image
    pad id (it has no vision feature).
    """
    cache, first_B_1_V, deltas = _prefill(model, prompts, rows_per_prompt)
    if input_ids_B_L.shape[1] - prompt_len < 2:
        return first_B_1_V
    mask = attention_mask_B_L[:, :-1]
    out = model(input_ids=input_ids_B_L[:, prompt_len:-1], attention_mask=mask,
                position_ids=decode_positions(mask, deltas, prompt_len), cache=cache, use_cache=True)
    return torch.cat([first_B_1_V, out.logits], dim=1)


def vl_completion_hidden(model, prompts: dict, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor,
                         prompt_len: int, rows_per_prompt: int = 1) -> torch.Tensor:
    """Hidden states [B, T, H] that predict each completion token (what vl_completion_logits feeds the LM head)."""
    cache, first_B_1_H, deltas = _prefill(model, prompts, rows_per_prompt, hidden=True)
    if input_ids_B_L.shape[1] - prompt_len < 2:
        return first_B_1_H
    mask = attention_mask_B_L[:, :-1]
    out = decoder_body(model)(input_ids=input_ids_B_L[:, prompt_len:-1], attention_mask=mask, use_cache=True,
                              position_ids=decode_positions(mask, deltas, prompt_len), cache=replay_cache(cache))
    return torch.cat([first_B_1_H, out.last_hidden_state], dim=1)
