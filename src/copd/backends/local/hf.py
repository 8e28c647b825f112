"""A branch on a transformers causal LM, trained with AdamW, on CPU or GPU: it plays all three roles.

What it receives (rollouts, parts) are CPU tensors, moved here onto its device; what it
returns (rollouts, scores, weights) are CPU tensors (copd.backends.roles).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_model, save_model
from transformers.modeling_layers import GradientCheckpointingLayer

from copd.backends.local import lm_head
from copd.backends.local.allocator import keep_freed_memory
from copd.backends.local.learning import Learning
from copd.backends.local.microbatch import micro_batches, scatter_rows
from copd.backends.local.sampling import RowNoise, Sampled, completion_hidden, completion_logits, output_head, plain_model, sample_completions
from copd.backends.roles import Prompt, Rollouts, SamplingParams, ScoreRequest, Scores
from copd.errors import CopdError

# model.compute_dtype values other than float32: the dtype autocast runs matmuls in.
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16}
# model.micro_batch_tokens when a policy is made without one (tests, the Python API).
DEFAULT_MICRO_BATCH_TOKENS = 16384


class CompletionValues(NamedTuple):
    """A policy's log-probs at each completion slot [B, T]: of the sampled token, of asked ids, its own top-k."""

    logprobs_B_T: torch.Tensor
    extra_B_T_J: torch.Tensor | None = None
    topk_ids_B_T_K: torch.Tensor | None = None
    topk_logprobs_B_T_K: torch.Tensor | None = None


class HFPolicy(Learning):
    """One branch: a model, its tokenizer and its optimizer."""

    # Scoring passes run each distinct prompt once and the completions on its cache (sampling.completion_logits).
    shared_prefill = True

    def __init__(self, name: str, model, tokenizer, lr: float = 1e-4, weight_decay: float = 0.0, device: str = "cpu",
                 chat_template: str = "auto", system_prompt: str | None = None, params: list | None = None,
                 compute_dtype: str = "float32", fused: bool = True, micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
                 gradient_checkpointing: bool = False):
        self.name = name
        self.compute_dtype = compute_dtype
        # Tokens (rows x padded length) of one forward and backward pass: updates, scores, old log-probs.
        self.micro_batch_tokens = micro_batch_tokens
        self.use_chat = uses_chat(tokenizer, chat_template)
        self.system_prompt = system_prompt
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults for each step's large tensors (copd.backends.local.allocator)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        # What this branch trains: every weight (full fine-tuning) or only its adapter (LoRA).
        self.params = list(self.model.parameters()) if params is None else list(params)
        # A read-only view (e.g. the frozen base under LoRA branches) has nothing to optimize.
        # The fused kernel does a whole AdamW step in one pass (5x faster than the default on CPU);
        # the warm start keeps the plain one, which built bases were cached with.
        fused = fused and self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=fused) if self.params else None
        self.checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            enable_checkpointing(self.model)

    def activate(self) -> None:
        """Make this branch the one the model computes with (a no-op unless weights are shared)."""

    def _compute(self):
        """Forward passes in bf16 under autocast when asked: weights and AdamW stay as loaded."""
        if self.compute_dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=COMPUTE_DTYPES[self.compute_dtype])

    # ---- sampling and scoring -------------------------------------------------------
    def format_prompt(self, prompt: str | Prompt) -> str:
        """The text the model sees: the raw prompt, or a chat turn with the generation prompt (chat_prompt_text)."""
        prompt = Prompt(prompt) if isinstance(prompt, str) else prompt
        if prompt.images or prompt.videos:
            raise CopdError(f"policy {self.name!r}: a prompt comes with images or videos, but this model reads text only")
        return chat_prompt_text(self.tokenizer, prompt, self.use_chat, self.system_prompt)

    def _encode(self, prompts: list[str | Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.format_prompt(p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generate(self, prompts: list[str | Prompt], n: int, params: SamplingParams, seed: int) -> Rollouts:
        """n samples per prompt (each row's draws keyed by its index: copd.backends.local.sampling.RowNoise)."""
        return self.generate_share(prompts, n, params, seed, range(len(prompts)))

    def generate_share(self, prompts: list[str | Prompt], n: int, params: SamplingParams, seed: int, share: range) -> Rollouts:
        """The samples of prompts[share] only, as they are in the whole step's rollouts: the prompts padded to
        the longest of all, each row's draws keyed by its index in the step (a data-parallel rank's part).

        Rows x (prompt + max_new_tokens) beyond the token budget are sampled a few whole prompt groups at a time."""
        self.activate()
        ids, mask = self._encode([p for p in prompts for _ in range(n)])
        rows = torch.arange(share.start * n, share.stop * n)
        ids, mask, noise = ids[rows.to(ids.device)], mask[rows.to(ids.device)], RowNoise(seed, rows)
        self.model.eval()
        group_tokens = n * (ids.shape[1] + params.max_new_tokens)
        step = n * max(1, self.micro_batch_tokens // group_tokens)
        sampled = []
        for start in range(0, ids.shape[0], step):
            chunk = slice(start, start + step)
            with self._compute():
                sampled.append(sample_completions(self.model, ids[chunk], mask[chunk], params, self.tokenizer.eos_token_id,
                                                  self.tokenizer.pad_token_id, noise.rows(chunk)))
        return self._rollouts(ids, mask, sampled[0] if len(sampled) == 1 else _cat_sampled(sampled, self.tokenizer.pad_token_id))

    def _rollouts(self, ids, mask, sampled: Sampled, vision=None) -> Rollouts:
        """CPU rollouts of the prompts and their sampled completions."""
        return rollouts_of(ids, mask, sampled, self.tokenizer, vision)

    def _dist(self, rollouts: Rollouts) -> torch.Tensor:
        """Log-softmax [B, T, V] at every completion slot, for rollouts whose logits fit one chunk."""
        with self._compute():
            logits = completion_logits(self.model, rollouts.input_ids_B_L.to(self.device), rollouts.attention_mask_B_L.to(self.device),
                                       rollouts.prompt_len, self.shared_prefill)
        return logits.float().log_softmax(-1)

    def _hidden(self, rollouts: Rollouts) -> torch.Tensor:
        """Hidden states [B, T, H] that the LM head turns into each completion slot's logits."""
        return completion_hidden(self.model, rollouts.input_ids_B_L.to(self.device), rollouts.attention_mask_B_L.to(self.device),
                                 rollouts.prompt_len, self.shared_prefill)

    def _completion_values(self, rollouts: Rollouts, extra_ids_B_T_J: torch.Tensor | None = None, topk: int = 0) -> CompletionValues:
        """Log-probs of the sampled tokens and of `extra_ids_B_T_J`, and the top-`topk` (ids, log-probs).

        Rollouts whose [B, T, V] logits fit one chunk (copd.backends.local.lm_head) take them
        whole; longer ones go through the LM head chunk by chunk, on their completion tokens
        only (padded slots get 0). With activation checkpointing every pass with gradients
        takes the chunked path: its cache is the one that survives the replay.
        """
        ids_B_T_J = rollouts.completion_ids_B_T.to(self.device).unsqueeze(-1)
        if extra_ids_B_T_J is not None:
            ids_B_T_J = torch.cat([ids_B_T_J, extra_ids_B_T_J.to(self.device).long()], -1)
        rows, width, asked = ids_B_T_J.shape
        vocab = output_head(self.model).weight.shape[0]
        k = min(topk, vocab)
        replayed = self.checkpointing and torch.is_grad_enabled()
        if rows * width * vocab <= lm_head.LOGITS_PER_CHUNK and not replayed:
            dist = self._dist(rollouts)
            values_B_T_J = dist.gather(-1, ids_B_T_J)
            top = dist.detach().topk(k, dim=-1) if k else None
            top_ids, top_values = (top.indices, top.values) if k else (None, None)
        else:
            keep_B_T = rollouts.completion_mask_B_T.to(self.device).bool()
            with self._compute():
                found = lm_head.head_values(self._hidden(rollouts)[keep_B_T], output_head(self.model), ids_B_T_J[keep_B_T], k)
            values_B_T_J = found.logprobs_N_J.new_zeros(rows, width, asked).index_put((keep_B_T,), found.logprobs_N_J)
            top_ids = None if not k else keep_B_T.new_zeros(rows, width, k, dtype=torch.long).index_put((keep_B_T,), found.topk_ids_N_K)
            top_values = None if not k else values_B_T_J.new_zeros(rows, width, k).index_put((keep_B_T,), found.topk_logprobs_N_K)
        extra = values_B_T_J[..., 1:] if extra_ids_B_T_J is not None else None
        return CompletionValues(values_B_T_J[..., 0], extra, top_ids, top_values)

    def _token_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """Log-probs [B, T] of the sampled tokens, no gradient, micro-batch by micro-batch."""
        cuts = micro_batches(rollouts, self.micro_batch_tokens)
        with torch.no_grad():
            if len(cuts) == 1:
                return self._completion_values(rollouts).logprobs_B_T
            pieces = [self._completion_values(rollouts.micro(c.rows, c.width)).logprobs_B_T for c in cuts]
        return scatter_rows(pieces, cuts, *rollouts.completion_mask_B_T.shape)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, request: ScoreRequest | None = None) -> Scores:
        """The sampled tokens' log-probs and, when asked, log-probs on a sparse support; CPU out."""
        self.activate()
        self.model.eval()
        cuts = micro_batches(rollouts, self.micro_batch_tokens)
        if len(cuts) == 1:
            return self._score_rows(rollouts, request)
        pieces = [self._score_rows(rollouts.micro(c.rows, c.width), _request_rows(request, c)) for c in cuts]
        return scatter_scores(pieces, cuts, *rollouts.completion_mask_B_T.shape)

    def _score_rows(self, rollouts: Rollouts, request: ScoreRequest | None) -> Scores:
        if request is None or not request.wants_support:
            return Scores(self._completion_values(rollouts).logprobs_B_T.cpu())
        extra = []
        if request.student_topk and rollouts.topk_ids_B_T_K is not None:
            extra.append(rollouts.topk_ids_B_T_K.to(self.device).long())
        if request.ids_B_T_J is not None:
            extra.append(request.ids_B_T_J.to(self.device).long())
        extra_ids = torch.cat(extra, -1) if extra else None
        values = self._completion_values(rollouts, extra_ids, request.topk)
        ids = [values.topk_ids_B_T_K] if values.topk_ids_B_T_K is not None else []
        logprobs = [values.topk_logprobs_B_T_K] if values.topk_ids_B_T_K is not None else []
        topk = ids[0].shape[-1] if ids else 0
        if extra_ids is not None:
            ids, logprobs = ids + [extra_ids], logprobs + [values.extra_B_T_J]
        return Scores(values.logprobs_B_T.cpu(), torch.cat(ids, -1).int().cpu(), torch.cat(logprobs, -1).cpu(), topk)

    # ---- supervised warm start ---------------------------------------------------------
    def supervised_step(self, prompts: list[str | Prompt], answers: list[str], grad_clip: float = 1.0) -> float:
        """One AdamW step on the answers' cross-entropy (the warm start); returns the loss."""
        self.activate()
        self.model.train()
        loss = self.supervised_loss(prompts, answers)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        self.optimizer.step()
        return loss.item()

    def supervised_loss(self, prompts: list[str | Prompt], answers: list[str]) -> torch.Tensor:
        """Cross-entropy on answer tokens (and EOS) only, prompt tokens masked out."""
        tokenizer, device = self.tokenizer, self.device
        rows, targets = [], []
        for prompt, answer in zip(prompts, answers):
            p = tokenizer(self.format_prompt(prompt), add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(p + a)
            targets.append([-100] * len(p) + a)
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        mask = (labels != -100) | (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None])
        with self._compute():
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(device))

    # ---- weights and checkpoints --------------------------------------------------------
    def parameter_counts(self) -> tuple[int, int]:
        return sum(t.numel() for t in self.params), sum(t.numel() for t in self.model.parameters())

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(weights)

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(folder / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_checkpoint(self, folder: Path) -> None:
        load_model(self.model, str(folder / "model.safetensors"), device=str(self.device))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device))

    def save_pretrained(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)

    def export_weights(self, folder: Path) -> int:
        """The model's weights as a safetensors folder, what a rollout engine reloads; returns their bytes."""
        return export_state(self.model, folder)


def rollouts_of(ids_B_P, mask_B_P, sampled: Sampled, tokenizer, vision=None, sampler_logprobs_B_T=None) -> Rollouts:
    """CPU rollouts of left-padded prompts and their completions (padded after EOS, the mask 1 up to and including it)."""
    # Rows that finished are padded after EOS, so skipping special tokens leaves the answer text.
    texts = tokenizer.batch_decode(sampled.ids_B_T, skip_special_tokens=True)
    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    return Rollouts(
        input_ids_B_L=torch.cat([ids_B_P, sampled.ids_B_T], 1).cpu(),
        attention_mask_B_L=torch.cat([mask_B_P, sampled.mask_B_T.long()], 1).cpu(),
        prompt_len=ids_B_P.shape[1],
        completion_mask_B_T=sampled.mask_B_T.cpu(),
        completions=texts,
        vision=vision,
        topk_ids_B_T_K=cpu(sampled.topk_ids_B_T_K),
        sampler_logprobs_B_T=cpu(sampler_logprobs_B_T),
    )


def pad_completions(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Rollouts of consecutive rows with one prompt layout (generate_share's) as one, completions padded to the longest."""
    width = max(p.completion_mask_B_T.shape[1] for p in parts)
    # F.pad lists the last dimension first: nothing after the completion axis (dim 1), then the growth.
    pad = lambda x, value: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=value)  # noqa: E731
    joined = lambda get, value: None if get(parts[0]) is None else torch.cat([pad(get(p), value) for p in parts])  # noqa: E731
    prompt = parts[0].prompt_len
    return Rollouts(
        input_ids_B_L=torch.cat([torch.cat([p.input_ids_B_L[:, :prompt] for p in parts]), joined(lambda p: p.completion_ids_B_T, pad_id)], 1),
        attention_mask_B_L=torch.cat([torch.cat([p.attention_mask_B_L[:, :prompt] for p in parts]),
                                      joined(lambda p: p.attention_mask_B_L[:, prompt:], 0)], 1),
        prompt_len=prompt,
        completion_mask_B_T=joined(lambda p: p.completion_mask_B_T, 0.0),
        completions=[text for p in parts for text in p.completions],
        topk_ids_B_T_K=joined(lambda p: p.topk_ids_B_T_K, 0),
        sampler_logprobs_B_T=joined(lambda p: p.sampler_logprobs_B_T, 0.0),
    )


def export_state(model, folder: Path, state_dict: dict | None = None) -> int:
    """`model`'s weights (or `state_dict` in its layout) written into `folder`; the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def uses_chat(tokenizer, chat_template: str) -> bool:
    """Whether prompts are chat turns: model.chat_template on, or auto with a tokenizer that has a template."""
    return chat_template == "on" or (chat_template == "auto" and getattr(tokenizer, "chat_template", None) is not None)


def chat_prompt_text(tokenizer, prompt: Prompt, use_chat: bool, system_prompt: str | None) -> str:
    """The raw prompt, or a chat turn with the generation prompt.

    A sample's own system message replaces model.system_prompt; without a chat template
    there is nowhere to put it, so it is dropped.
    """
    if not use_chat:
        return prompt.text
    system_text = prompt.system or system_prompt
    system = [{"role": "system", "content": system_text}] if system_text else []
    turns = [*system, {"role": "user", "content": prompt.text}]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def enable_checkpointing(model) -> None:
    """transformers' activation checkpointing (non-reentrant), keeping the scoring cache (see sampling.ReplayLayer)."""
    plain = plain_model(model)
    plain.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for module in plain.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True  # only ReplayLayer caches pass through with gradients on


def _cat_sampled(parts: list[Sampled], pad_id: int) -> Sampled:
    """Decode loops' outputs over consecutive rows as one, completions right-padded to the longest."""
    width = max(p.ids_B_T.shape[1] for p in parts)
    # F.pad lists the last dimension first: nothing after the completion axis (dim 1), then the growth.
    pad = lambda x, value: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=value)  # noqa: E731
    topk = None if parts[0].topk_ids_B_T_K is None else torch.cat([pad(p.topk_ids_B_T_K, 0) for p in parts])
    return Sampled(torch.cat([pad(p.ids_B_T, pad_id) for p in parts]), torch.cat([pad(p.mask_B_T, 0.0) for p in parts]), topk)


def _request_rows(request: ScoreRequest | None, cut) -> ScoreRequest | None:
    if request is None or request.ids_B_T_J is None:
        return request
    return ScoreRequest(request.topk, request.ids_B_T_J[cut.rows, : cut.width], request.student_topk)


def scatter_scores(pieces: list[Scores], cuts, rows: int, width: int) -> Scores:
    """Scores of micro-batches (rows sorted by length, trimmed) as one, in the rollouts' row order."""
    gather = lambda get: None if get(pieces[0]) is None else scatter_rows([get(p) for p in pieces], cuts, rows, width)  # noqa: E731
    return Scores(gather(lambda p: p.token_logprobs_B_T), gather(lambda p: p.support_ids_B_T_S),
                  gather(lambda p: p.support_logprobs_B_T_S), pieces[0].topk)
