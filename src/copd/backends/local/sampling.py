"""Batched autoregressive sampling with a KV cache, and log-probabilities of completions.

A lean loop instead of `generate()`: one prefill, then one cached forward per new token,
with temperature, top-p and counter-based noise (`RowNoise`): each row's draws are a pure
function of the seed, the row's index in the step and the token position, so rollouts are
reproducible from a seed (resumed runs match uninterrupted ones) and a row samples the same
tokens whichever batch it is sampled in (a chunk of a long step, a data-parallel rank's share).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from copd.backends.roles import SamplingParams


class Sampled(NamedTuple):
    """What a decode loop returns; topk_ids_B_T_K only when SamplingParams.record_topk asks for it."""

    ids_B_T: torch.Tensor
    mask_B_T: torch.Tensor  # float, 1 on generated tokens up to and including EOS
    topk_ids_B_T_K: torch.Tensor | None = None


def positions_from_mask(attention_mask_B_L: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of each left-padded row."""
    return (attention_mask_B_L.long().cumsum(-1) - 1).clamp(min=0)


def top_p_filter(logits_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (nucleus)."""
    if top_p >= 1.0:
        return logits_B_V
    sorted_logits, order = logits_B_V.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the mass before it already reaches top_p; the top token always stays.
    drop_sorted = probs.cumsum(-1) - probs >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits_B_V.masked_fill(drop, float("-inf"))


MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (the "lowbias32" constants) of int64 values in [0, 2**32), elementwise.

    Products may pass 2**63 and wrap; only their low 32 bits are kept, which wrapping leaves exact.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


class RowNoise:
    """Uniform draws in [0, 1), one per row and decode position, keyed by (seed, row key, position).

    `row_keys_B`: each row's index in the whole step (prompt index * n + sample). A
    torch.Generator's stream depends on how many draws came before, so a row's tokens
    would depend on the batch around it; keyed draws do not.
    """

    def __init__(self, seed: int, row_keys_B: torch.Tensor):
        self.rows_B = hash32((hash32(torch.tensor(seed & MASK32)) ^ row_keys_B.long()) & MASK32)

    def uniform(self, position: int) -> torch.Tensor:
        """[B, 1] float32 uniforms for this position (24 random bits each, exact in float32)."""
        h = hash32((self.rows_B + hash32(torch.tensor(position))) & MASK32)
        return ((h >> 8).float() / float(1 << 24))[:, None]

    def rows(self, index) -> RowNoise:
        """The noise of a subset of the rows (a chunk sampled on its own)."""
        picked = object.__new__(RowNoise)
        picked.rows_B = self.rows_B[index]
        return picked


def next_tokens(logits_B_V: torch.Tensor, params: SamplingParams, uniforms_B_1: torch.Tensor | None) -> torch.Tensor:
    if params.greedy:
        return logits_B_V.argmax(-1)
    logits = top_p_filter(logits_B_V.float() / params.temperature, params.top_p)
    return sample_categorical(logits.softmax(-1), uniforms_B_1)


def sample_categorical(probs_B_V: torch.Tensor, uniforms_B_1: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn with probability probs (inverse CDF: one uniform per row).

    torch.multinomial spends an exponential draw on every vocabulary entry; with a 50k
    vocabulary that was a tenth of a whole rollout on CPU. Token j is picked iff
    cdf[j-1] <= u < cdf[j], so a token with zero mass (cut by top-p) is never picked.
    """
    cdf_B_V = probs_B_V.cumsum(-1)
    u_B_1 = uniforms_B_1.to(probs_B_V.device) * cdf_B_V[:, -1:]
    return torch.searchsorted(cdf_B_V, u_B_1, right=True).squeeze(-1).clamp(max=probs_B_V.shape[-1] - 1)


@torch.no_grad()
def sample_completions(
    model,
    input_ids_B_P: torch.Tensor,
    attention_mask_B_P: torch.Tensor,
    params: SamplingParams,
    eos_id: int,
    pad_id: int,
    noise: RowNoise | None,
) -> Sampled:
    """Sample up to max_new_tokens per row; returns (completion_ids_B_T, completion_mask_B_T, top-k ids or None).

    The mask is 1 on generated tokens up to and including EOS; finished rows are padded.
    """
    cache, logits = prefill(model, input_ids_B_P, attention_mask_B_P)
    return decode(model, cache, logits[:, -1], attention_mask_B_P, params, eos_id, pad_id, noise,
                  lambda mask: positions_from_mask(mask)[:, -1:])


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in buffers sized for the whole rollout.

    transformers' DynamicLayer concatenates every new token onto a fresh tensor, which on a
    CPU costs an allocation (and page faults) per layer per token, about a fifth of a
    SmolLM2-135M rollout (benchmarks/smollm2.py). Here a token is written into its slot and
    the layer exposes views of the filled prefix, so attention sees exactly the tensors it
    saw before. Past the capacity it falls back to growing.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        shape = (*keys.shape[:2], max(capacity, keys.shape[-2]), keys.shape[-1])
        self._keys, self._values = keys.new_empty(shape), values.new_empty(shape[:3] + values.shape[-1:])
        self._filled = 0
        self._write(keys, values)

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self._filled + keys.shape[-2]
        if end > self._keys.shape[-2]:  # more tokens than planned: twice the room needed, the filled part copied
            self._keys, self._values = (self._grown(buffer, 2 * end) for buffer in (self._keys, self._values))
        self._keys[:, :, self._filled : end] = keys
        self._values[:, :, self._filled : end] = values
        self._filled = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]

    def _grown(self, buffer: torch.Tensor, size: int) -> torch.Tensor:
        grown = buffer.new_empty(*buffer.shape[:2], size, buffer.shape[-1])
        grown[:, :, : self._filled] = buffer[:, :, : self._filled]
        return grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._write(key_states, value_states)
        return self.keys, self.values


def preallocate(cache, new_tokens: int):
    """The cache with every full-attention layer moved into buffers with room for `new_tokens` more tokens."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            cache.layers[i] = PreallocatedLayer(layer.keys, layer.values, layer.keys.shape[-2] + new_tokens)
    return cache


def decode(model, cache, logits_B_V: torch.Tensor, attention_mask_B_P: torch.Tensor, params: SamplingParams, eos_id: int,
           pad_id: int, noise: RowNoise | None, new_position) -> Sampled:
    """The token-by-token loop after a prefill: completion ids, their mask and (when asked) top-k ids.

    `new_position(mask)` gives the position ids of the token just appended to `mask` (plain
    for text, M-RoPE for vision-language models). With params.record_topk = k the top-k ids
    of the model's distribution at every step come back too: the student's half of a sparse
    teacher-score support, taken from logits the loop computes anyway.
    """
    mask, logits = attention_mask_B_P, logits_B_V
    cache = preallocate(cache, params.max_new_tokens)
    finished = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens, alive, topks = [], [], []
    k = min(params.record_topk, logits_B_V.shape[-1])
    for step in range(params.max_new_tokens):
        if k:
            topks.append(logits.topk(k, dim=-1).indices.int())
        token = next_tokens(logits, params, None if params.greedy else noise.uniform(step))
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        alive.append(~finished)
        finished = finished | (token == eos_id)
        if bool(finished.all()) or step == params.max_new_tokens - 1:
            break
        # A finished row's pad token is masked out, so it never shifts that row's positions.
        mask = torch.cat([mask, (~finished | (token == eos_id)).long()[:, None]], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=new_position(mask), cache=cache,
                    use_cache=True)
        cache, logits = out.cache, out.logits[:, -1]
    return Sampled(torch.stack(tokens, 1), torch.stack(alive, 1).float(), torch.stack(topks, 1) if k else None)


def group_size(input_ids_B_P: torch.Tensor, attention_mask_B_P: torch.Tensor) -> int:
    """G when the rows are runs of G identical prompts (a GRPO group is G copies of one), else 1."""
    batch = input_ids_B_P.shape[0]
    same = (input_ids_B_P[1:] == input_ids_B_P[:-1]).all(-1) & (attention_mask_B_P[1:] == attention_mask_B_P[:-1]).all(-1)
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same]).nonzero().squeeze(-1).tolist()
    size = batch // len(starts)
    return size if starts == list(range(0, batch, size)) else 1


def repeat_rows(x: torch.Tensor, times: int) -> torch.Tensor:
    """Each row `times` times in a row. An expand, so the backward pass is a plain (deterministic) sum."""
    return x.unsqueeze(1).expand(x.shape[0], times, *x.shape[1:]).reshape(x.shape[0] * times, *x.shape[1:])


def prefill(model, input_ids_B_P: torch.Tensor, attention_mask_B_P: torch.Tensor, hidden: bool = False):
    """(KV cache, last-position logits [B, 1, V]) of the prompts, each distinct prompt run once.

    Works with gradients too: each group's copies of the cache share one computation, and
    the backward pass sums their gradients (the same as running every copy separately).
    With `hidden`, the last position's hidden state [B, 1, H] instead of its logits, and a
    cache of ReplayLayers (safe under activation checkpointing).
    """
    size = group_size(input_ids_B_P, attention_mask_B_P) if input_ids_B_P.shape[0] > 1 else 1
    mask = attention_mask_B_P[::size]
    inputs = dict(input_ids=input_ids_B_P[::size], attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True)
    if hidden:
        cache = replay_cache()  # kept here: under checkpointing the model returns no cache
        last = decoder_body(model)(**inputs, cache=cache).last_hidden_state[:, -1:]
    else:  # only the last position's logits are needed: skip the LM head on the rest of the prompt
        out = model(**inputs, logits_to_keep=1)
        cache, last = out.cache, out.logits
    return repeat_groups(cache, last, size)


def repeat_groups(cache, last_B_1_X: torch.Tensor, size: int):
    """The prefill of distinct prompts expanded to `size` rows each: (cache, last position's output)."""
    if size > 1:
        for layer in cache.layers:
            layer.keys, layer.values = repeat_rows(layer.keys, size), repeat_rows(layer.values, size)
        last_B_1_X = repeat_rows(last_B_1_X, size)
    return cache, last_B_1_X


def completion_logits(model, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor, prompt_len: int,
                      shared_prefill: bool = True) -> torch.Tensor:
    """Logits that predict each completion token: positions prompt_len-1 .. L-2, as [B, T, V].

    The prompt goes through `prefill` (once per distinct prompt), then the completions run on
    its cache; the LM head only ever sees the positions whose logits are returned. Without
    `shared_prefill`, one forward of the whole rows (each module called once per pass, which a
    sharded model's collectives need: copd.backends.local.sharded).
    """
    if not shared_prefill:
        hidden_B_T_H = completion_hidden(model, input_ids_B_L, attention_mask_B_L, prompt_len, shared_prefill=False)
        return output_head(model)(hidden_B_T_H)
    cache, first_B_1_V = prefill(model, input_ids_B_L[:, :prompt_len], attention_mask_B_L[:, :prompt_len])
    if input_ids_B_L.shape[1] - prompt_len < 2:
        return first_B_1_V
    positions = positions_from_mask(attention_mask_B_L)
    out = model(input_ids=input_ids_B_L[:, prompt_len:-1], attention_mask=attention_mask_B_L[:, :-1],
                position_ids=positions[:, prompt_len:-1], cache=cache, use_cache=True)
    return torch.cat([first_B_1_V, out.logits], dim=1)


def token_logprobs(logprobs_B_T_V: torch.Tensor, ids_B_T: torch.Tensor) -> torch.Tensor:
    return logprobs_B_T_V.gather(-1, ids_B_T.unsqueeze(-1)).squeeze(-1)


def plain_model(model):
    """The transformers model under PEFT adapters (which stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_body(model):
    """The model without its LM head: hidden states out (LlamaModel, Qwen3VLModel, ...)."""
    plain = plain_model(model)
    return getattr(plain, plain.base_model_prefix)


def output_head(model):
    """The LM head module (tied to the input embeddings in some models)."""
    return plain_model(model).get_output_embeddings()


class ReplayLayer(DynamicLayer):
    """A KV-cache layer whose update is a pure function of the prefix it was made with.

    Activation checkpointing replays a layer's forward in the backward pass. A growing
    cache would append the replayed keys a second time (transformers therefore drops the
    cache under checkpointing); this layer returns prefix + new keys on every call, so the
    replay sees exactly the tensors of the first pass. Used by the scoring forward only,
    which never decodes further.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.prefix = (keys, values)
        if keys is not None:
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.prefix
        self.keys = key_states if keys is None else torch.cat([keys, key_states], dim=-2)
        self.values = value_states if values is None else torch.cat([values, value_states], dim=-2)
        self.device, self.is_initialized = key_states.device, True
        return self.keys, self.values


def replay_cache(prefix=None) -> Cache:
    """An empty cache of ReplayLayers, or one that continues `prefix` (a prefill's cache)."""
    if prefix is None:
        return Cache(layer_class_to_replicate=ReplayLayer)
    return Cache(layers=[ReplayLayer(layer.keys, layer.values) for layer in prefix.layers])


def completion_hidden(model, input_ids_B_L: torch.Tensor, attention_mask_B_L: torch.Tensor, prompt_len: int,
                      shared_prefill: bool = True) -> torch.Tensor:
    """Hidden states [B, T, H] that predict each completion token (what `completion_logits` feeds the LM head)."""
    if not shared_prefill:
        out = decoder_body(model)(input_ids=input_ids_B_L[:, :-1], attention_mask=attention_mask_B_L[:, :-1],
                                  position_ids=positions_from_mask(attention_mask_B_L)[:, :-1], use_cache=False)
        return out.last_hidden_state[:, prompt_len - 1 :]
    cache, first_B_1_H = prefill(model, input_ids_B_L[:, :prompt_len], attention_mask_B_L[:, :prompt_len], hidden=True)
    if input_ids_B_L.shape[1] - prompt_len < 2:
        return first_B_1_H
    positions = positions_from_mask(attention_mask_B_L)
    out = decoder_body(model)(input_ids=input_ids_B_L[:, prompt_len:-1], attention_mask=attention_mask_B_L[:, :-1],
                              position_ids=positions[:, prompt_len:-1], cache=replay_cache(cache), use_cache=True)
    return torch.cat([first_B_1_H, out.last_hidden_state], dim=1)
