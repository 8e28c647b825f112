"""Sampling by a rollout engine: prompts formatted as the learner formats them, answers laid out as Rollouts.

The engine gets token ids and gives back token ids with their log-probs; everything
about text (chat template, system message, padding, decoding) stays here, with the
branch's own tokenizer, so the rollouts have the layout copd's own decoder gives:
left-padded prompts, then completions padded after EOS, the mask 1 on generated tokens
(EOS included). The engine's log-probs ride along (Rollouts.sampler_logprobs_B_T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copd.backends.engine.process import EngineProcess
from copd.backends.local.hf import chat_prompt_text, rollouts_of, uses_chat
from copd.backends.local.sampling import Sampled
from copd.backends.roles import Prompt, Rollouts, SamplingParams
from copd.errors import CopdError


@dataclass
class TextPrompts:
    """How a text branch turns prompts into token ids (its tokenizer, chat template, system message)."""

    tokenizer: object
    use_chat: bool
    system_prompt: str | None = None

    @classmethod
    def of(cls, tokenizer, chat_template: str = "auto", system_prompt: str | None = None) -> TextPrompts:
        tokenizer.padding_side = "left"
        return cls(tokenizer, uses_chat(tokenizer, chat_template), system_prompt)

    def encode(self, prompts: list[str | Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask [P, L] of the prompts, formatted as the learner formats them."""
        texts = []
        for prompt in prompts:
            prompt = Prompt(prompt) if isinstance(prompt, str) else prompt
            if prompt.images or prompt.videos:
                raise CopdError("a rollout engine samples text prompts only; this prompt has images or videos")
            texts.append(chat_prompt_text(self.tokenizer, prompt, self.use_chat, self.system_prompt))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"], enc["attention_mask"]


class EngineSampler:
    """The sampling role played by an engine process (copd.backends.engine.process)."""

    def __init__(self, name: str, engine: EngineProcess, prompts: TextPrompts):
        self.name, self.engine, self.prompts = name, engine, prompts

    def generate(self, prompts: list[str | Prompt], n: int, params: SamplingParams, seed: int) -> Rollouts:
        """n samples per prompt, rows grouped by prompt; one engine seed per sample, derived from `seed`."""
        ids_P_L, mask_P_L = self.prompts.encode(prompts)
        unpadded = [row[keep.bool()].tolist() for row, keep in zip(ids_P_L, mask_P_L)]
        tokenizer = self.prompts.tokenizer
        answers = self.engine.request(
            "generate", "sampling", prompt_ids=unpadded, n=n, temperature=params.temperature, top_p=params.top_p,
            greedy=params.greedy, max_tokens=params.max_new_tokens, seed=seed, topk=params.record_topk,
            stop_ids=[tokenizer.eos_token_id],
        )
        return engine_rollouts(ids_P_L.repeat_interleave(n, 0), mask_P_L.repeat_interleave(n, 0), answers, tokenizer, params.record_topk)

    def reload(self, folder) -> float:
        """The weights of a safetensors folder into the engine; seconds it took there."""
        return self.engine.request("reload", "a weight sync", path=str(folder))

    def ready(self) -> None:
        """Wait until the engine has loaded its model (see start_engine's `wait`)."""
        self.engine.ready()

    def restart(self) -> None:
        self.engine.restart()

    def close(self) -> None:
        self.engine.close()


def engine_rollouts(ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, answers: list, tokenizer, topk: int) -> Rollouts:
    """Rollouts from the engine's answers: per row (completion ids, their log-probs, top-k ids per position),
    laid out by copd.backends.local.hf.rollouts_of as copd's own decoder's are."""
    rows, width = len(answers), max(1, max(len(ids) for ids, _, _ in answers))
    completion_B_T = torch.full((rows, width), tokenizer.pad_token_id, dtype=ids_B_P.dtype)
    mask_B_T = torch.zeros(rows, width)
    logprobs_B_T = torch.zeros(rows, width)
    topk_B_T_K = torch.zeros(rows, width, topk, dtype=torch.int32) if topk else None
    for row, (ids, logprobs, top) in enumerate(answers):
        length = len(ids)
        completion_B_T[row, :length] = torch.tensor(ids, dtype=ids_B_P.dtype)
        mask_B_T[row, :length] = 1.0
        logprobs_B_T[row, :length] = torch.tensor(logprobs)
        if topk and length:
            topk_B_T_K[row, :length] = torch.tensor([(t + [0] * topk)[:topk] for t in top], dtype=torch.int32)
    return rollouts_of(ids_B_P, mask_B_P, Sampled(completion_B_T, mask_B_T, topk_B_T_K), tokenizer,
                       sampler_logprobs_B_T=logprobs_B_T)
