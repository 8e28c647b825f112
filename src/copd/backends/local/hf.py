"""A branch on a transformers causal LM, trained with AdamW, on CPU or GPU: it plays all three roles.

What it receives (rollouts, parts) are CPU tensors, moved here onto its device; what it
returns (rollouts, scores, weights) are CPU tensors (copd.backends.roles).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from copd.backends.local.allocator import keep_freed_memory
from copd.core.losses import approx_kl
from copd.errors import CopdError
from copd.backends.local.objective import opd_loss, rl_loss
from copd.backends.local.sampling import Sampled, completion_logits, group_size, sample_completions, token_logprobs
from copd.backends.roles import LossSpec, OPDPart, Prompt, RLPart, Rollouts, SamplingParams, ScoreRequest, Scores, UpdateResult

# model.compute_dtype values other than float32: the dtype autocast runs matmuls in.
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16}
# Scoring runs in chunks of whole prompt groups once rows x tokens x vocabulary exceeds this
# many logits (512 MB in fp32), so a teacher never holds a whole batch's [B, T, V] at once.
SCORE_CHUNK_LOGITS = 2**27


class HFPolicy:
    """One branch: a model, its tokenizer and its optimizer."""

    def __init__(self, name: str, model, tokenizer, lr: float = 1e-4, weight_decay: float = 0.0, device: str = "cpu",
                 chat_template: str = "auto", system_prompt: str | None = None, params: list | None = None,
                 compute_dtype: str = "float32", fused: bool = True):
        self.name = name
        self.compute_dtype = compute_dtype
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat = chat_template == "on" or (chat_template == "auto" and has_template)
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

    def activate(self) -> None:
        """Make this branch the one the model computes with (a no-op unless weights are shared)."""

    def _compute(self):
        """Forward passes in bf16 under autocast when asked: weights and AdamW stay as loaded."""
        if self.compute_dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=COMPUTE_DTYPES[self.compute_dtype])

    # ---- sampling and scoring -------------------------------------------------------
    def format_prompt(self, prompt: str | Prompt) -> str:
        """The text the model sees: the raw prompt, or a chat turn with the generation prompt.

        A sample's own system message replaces model.system_prompt; without a chat template
        there is nowhere to put it, so it is dropped.
        """
        prompt = Prompt(prompt) if isinstance(prompt, str) else prompt
        if prompt.images or prompt.videos:
            raise CopdError(f"policy {self.name!r}: a prompt comes with images or videos, but this model reads text only")
        if not self.use_chat:
            return prompt.text
        system_text = prompt.system or self.system_prompt
        system = [{"role": "system", "content": system_text}] if system_text else []
        turns = [*system, {"role": "user", "content": prompt.text}]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def _encode(self, prompts: list[str | Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.format_prompt(p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def generate(self, prompts: list[str | Prompt], n: int, params: SamplingParams, seed: int) -> Rollouts:
        self.activate()
        ids, mask = self._encode([p for p in prompts for _ in range(n)])
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.model.eval()
        with self._compute():
            sampled = sample_completions(
                self.model, ids, mask, params, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, generator
            )
        return self._rollouts(ids, mask, sampled)

    def _rollouts(self, ids, mask, sampled: Sampled, vision=None) -> Rollouts:
        """CPU rollouts of the prompts and their sampled completions."""
        # Rows that finished are padded after EOS, so skipping special tokens leaves the answer text.
        texts = self.tokenizer.batch_decode(sampled.ids_B_T, skip_special_tokens=True)
        topk = sampled.topk_ids_B_T_K
        return Rollouts(
            input_ids_B_L=torch.cat([ids, sampled.ids_B_T], 1).cpu(),
            attention_mask_B_L=torch.cat([mask, sampled.mask_B_T.long()], 1).cpu(),
            prompt_len=ids.shape[1],
            completion_mask_B_T=sampled.mask_B_T.cpu(),
            completions=texts,
            vision=vision,
            topk_ids_B_T_K=None if topk is None else topk.cpu(),
        )

    def _dist(self, rollouts: Rollouts) -> torch.Tensor:
        with self._compute():
            logits = completion_logits(
                self.model, rollouts.input_ids_B_L.to(self.device), rollouts.attention_mask_B_L.to(self.device), rollouts.prompt_len
            )
        return logits.float().log_softmax(-1)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, request: ScoreRequest | None = None) -> Scores:
        """The sampled tokens' log-probs and, when asked, log-probs on a sparse support; CPU out."""
        self.activate()
        self.model.eval()
        chunks = self._score_chunks(rollouts)
        if len(chunks) == 1:
            return self._score_rows(rollouts, request)
        return _cat_scores([self._score_rows(rollouts.select(rows), _request_rows(request, rows)) for rows in chunks])

    def _score_rows(self, rollouts: Rollouts, request: ScoreRequest | None) -> Scores:
        dist = self._dist(rollouts)
        tokens = token_logprobs(dist, rollouts.completion_ids_B_T.to(self.device))
        if request is None or not request.wants_support:
            return Scores(tokens.cpu())
        topk = min(request.topk, dist.shape[-1])
        ids = [dist.topk(topk, dim=-1).indices] if topk else []
        if request.student_topk and rollouts.topk_ids_B_T_K is not None:
            ids.append(rollouts.topk_ids_B_T_K.to(self.device).long())
        if request.ids_B_T_J is not None:
            ids.append(request.ids_B_T_J.to(self.device).long())
        support = torch.cat(ids, -1)
        return Scores(tokens.cpu(), support.int().cpu(), dist.gather(-1, support).cpu(), topk)

    def _score_chunks(self, rollouts: Rollouts) -> list[torch.Tensor]:
        """Row indices of whole prompt groups, few enough that each chunk's logits fit SCORE_CHUNK_LOGITS."""
        rows, length = rollouts.input_ids_B_L.shape[0], rollouts.completion_mask_B_T.shape[1]
        per_row = max(length * self.model.get_output_embeddings().weight.shape[0], 1)
        if rows * per_row <= SCORE_CHUNK_LOGITS:
            return [torch.arange(rows)]
        prompt = slice(0, rollouts.prompt_len)
        group = rollouts.vision.rows_per_prompt if rollouts.vision is not None else group_size(
            rollouts.input_ids_B_L[:, prompt], rollouts.attention_mask_B_L[:, prompt])
        size = max(group, SCORE_CHUNK_LOGITS // per_row // group * group)
        return list(torch.arange(rows).split(size))

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

    # ---- training ---------------------------------------------------------------------
    def update(self, rl: list[RLPart], opd: list[OPDPart], spec: LossSpec) -> UpdateResult:
        """`spec.epochs` optimizer steps on all parts together; old log-probs from the first pass."""
        self.activate()
        self.model.train()
        rl, opd = [p.resolved().to(self.device) for p in rl], [p.to(self.device) for p in opd]
        olds: list[torch.Tensor | None] = [None] * (len(rl) + len(opd))
        result = UpdateResult()
        for _ in range(spec.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            metrics, edges, finite = self._accumulate(rl, opd, spec, olds)
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                return UpdateResult(metrics=metrics, skipped=True)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, spec.grad_clip)
            if not torch.isfinite(grad_norm):  # a finite loss can still have overflowing gradients
                self.optimizer.zero_grad(set_to_none=True)
                return UpdateResult(metrics={**metrics, "grad_norm": float("nan")}, skipped=True)
            self.optimizer.step()
            result = UpdateResult(metrics={**metrics, "grad_norm": float(grad_norm)}, edge_metrics=edges)
        if spec.step_kl:
            result.metrics["approx_kl"] = self._policy_kl([p.rollouts for p in rl] + [p.rollouts for p in opd], olds)
        return result

    def _accumulate(self, rl, opd, spec, olds) -> tuple[dict, dict, bool]:
        """Backward each part's loss in turn (gradients add up; peak memory stays one part's)."""
        metrics: dict[str, float] = {"loss": 0.0, "tokens": 0.0}
        edges: dict[str, dict] = {}
        parts = [("rl", p) for p in rl] + [("opd", p) for p in opd]
        for i, (kind, part) in enumerate(parts):
            dist = self._dist(part.rollouts)
            logprobs = token_logprobs(dist, part.rollouts.completion_ids_B_T.to(self.device))
            if olds[i] is None:
                olds[i] = logprobs.detach()
            if kind == "rl":
                loss, stats = rl_loss(logprobs, olds[i], part, spec)
            else:
                loss, stats, edges[part.edge] = opd_loss(logprobs, dist, olds[i], part, spec)
            if not torch.isfinite(loss):
                return {"loss": float("nan")}, {}, False
            loss.backward()
            metrics["loss"] += loss.item()
            metrics["tokens"] += float(part.rollouts.num_tokens)
            metrics.update(stats)
        return metrics, edges, True

    @torch.no_grad()
    def _policy_kl(self, rollouts: list[Rollouts], olds: list[torch.Tensor]) -> float:
        """k3 estimate of KL(pi_old || pi_new) on this update's tokens: how far one step moved."""
        self.model.eval()
        values = []
        for r, old in zip(rollouts, olds):
            new = token_logprobs(self._dist(r), r.completion_ids_B_T.to(self.device))
            values.append(approx_kl(new, old, r.completion_mask_B_T.to(self.device)).item())
        return sum(values) / max(len(values), 1)

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


def _request_rows(request: ScoreRequest | None, rows: torch.Tensor) -> ScoreRequest | None:
    if request is None or request.ids_B_T_J is None:
        return request
    return ScoreRequest(request.topk, request.ids_B_T_J[rows], request.student_topk)


def _cat_scores(chunks: list[Scores]) -> Scores:
    """Scores of consecutive row chunks as one."""
    cat = lambda get: None if get(chunks[0]) is None else torch.cat([get(c) for c in chunks])  # noqa: E731
    return Scores(cat(lambda c: c.token_logprobs_B_T), cat(lambda c: c.support_ids_B_T_S), cat(lambda c: c.support_logprobs_B_T_S),
                  chunks[0].topk)
