"""The learner's update on a step's parts, in mini-batches (optimizer steps) of micro-batches (passes).

One update (Algorithm 1, Phase II) trains on every part of a step together: the RL batch
and each OPD edge's rollouts. The structure, outermost first:
- epochs (rl.epochs): passes over the batch;
- mini-batches (optim.mini_batches): one optimizer step each, on whole prompt groups of
  every part; every old log-prob is taken before the first step;
- parts: each part's loss is backpropagated in turn, gradients adding up;
- micro-batches (model.micro_batch_tokens): a part's rows cut to fit the token budget.
A micro-batch's loss is normalised by its whole part's count (copd.core.losses
.loss_normaliser), so the micro-batches' gradients add up to the part's own: the result
does not depend on the budget, up to float rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from copd.backends.local.microbatch import micro_batches, mini_batch_rows, scatter_rows
from copd.backends.local.objective import Tally, opd_loss, rl_loss
from copd.backends.roles import LossSpec, OPDPart, RLPart, Rollouts, UpdateResult
from copd.core.correction import correction_weight, engine_mismatch
from copd.core.losses import approx_kl, loss_normaliser


@dataclass
class Piece:
    """One part of one mini-batch, with the old log-probs of its rows once they are known."""

    part: RLPart | OPDPart
    old_B_T: torch.Tensor | None = None

    @property
    def is_rl(self) -> bool:
        return isinstance(self.part, RLPart)


class Learning:
    """HFPolicy's update; needs `_completion_values`, `_token_logprobs`, `model`, `optimizer`, `params`, `micro_batch_tokens`."""

    def update(self, rl: list[RLPart], opd: list[OPDPart], spec: LossSpec) -> UpdateResult:
        """`spec.epochs` passes over the parts, `spec.mini_batches` optimizer steps each."""
        started = time.perf_counter()
        self.activate()
        self.model.train()
        parts = [p.resolved().to(self.device) for p in rl] + [p.to(self.device) for p in opd]
        pieces = [Piece(p) for p in parts]
        if spec.mini_batches > 1:  # mini-batch 2 must see the policy from before step 1
            for piece in pieces:
                piece.old_B_T = self._token_logprobs(piece.part.rollouts)
        batches = _mini_batches(pieces, spec.mini_batches)
        results: list[UpdateResult] = []
        for _ in range(spec.epochs):
            results = []
            for batch in batches:
                result = self._optimizer_step(batch, spec)
                if result.skipped:
                    return result
                results.append(result)
        result = _mean_results(results)
        if spec.step_kl:
            result.metrics["approx_kl"] = self._policy_kl([p.part.rollouts for p in pieces], [p.old_B_T for p in pieces])
        result.metrics["update_seconds"] = time.perf_counter() - started
        return result

    def _optimizer_step(self, batch: list[Piece], spec: LossSpec) -> UpdateResult:
        self.optimizer.zero_grad(set_to_none=True)
        metrics, edges, finite = self._accumulate(batch, spec)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return UpdateResult(metrics=metrics, skipped=True)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, spec.grad_clip)
        if not torch.isfinite(grad_norm):  # a finite loss can still have overflowing gradients
            self.optimizer.zero_grad(set_to_none=True)
            return UpdateResult(metrics={**metrics, "grad_norm": float("nan")}, skipped=True)
        self.optimizer.step()
        return UpdateResult(metrics={**metrics, "grad_norm": float(grad_norm)}, edge_metrics=edges)

    def _accumulate(self, batch: list[Piece], spec: LossSpec) -> tuple[dict, dict, bool]:
        """Backward each part's loss in turn (gradients add up; peak memory stays one micro-batch's)."""
        tally, edges, loss, tokens = Tally(), {}, 0.0, 0.0
        for piece in batch:
            edge = None if piece.is_rl else edges.setdefault(piece.part.edge, Tally())
            part_loss = self._backward_part(piece, spec, tally, edge)
            if part_loss is None:
                return {"loss": float("nan")}, {}, False
            loss += part_loss
            tokens += float(piece.part.rollouts.num_tokens)
        metrics = {"loss": loss, "tokens": tokens, **tally.result()}
        return metrics, {name: e.result() for name, e in edges.items()}, True

    def _backward_part(self, piece: Piece, spec: LossSpec, tally: Tally, edge: Tally | None) -> float | None:
        """The part's loss, backpropagated micro-batch by micro-batch; None if it is not finite."""
        part = piece.part
        mask_B_T = part.rollouts.completion_mask_B_T
        normaliser = loss_normaliser(mask_B_T, spec.aggregation)
        cuts = micro_batches(part.rollouts, self.micro_batch_tokens)
        whole = len(cuts) == 1
        olds, total = [], 0.0
        for cut in cuts:
            micro = part if whole else part.micro(cut.rows, cut.width)
            old = None if piece.old_B_T is None else piece.old_B_T if whole else piece.old_B_T[cut.rows, : cut.width]
            loss, old = self._micro_loss(micro, old, spec, normaliser, tally, edge)
            if not torch.isfinite(loss):
                return None
            loss.backward()
            total += loss.item()
            olds.append(old)
        if piece.old_B_T is None:  # the first pass's log-probs are the old policy's (later epochs reuse them)
            piece.old_B_T = olds[0] if whole else scatter_rows(olds, cuts, *mask_B_T.shape)
        return total

    def _micro_loss(self, micro, old_B_T, spec: LossSpec, normaliser, tally: Tally, edge: Tally | None):
        """(loss of one micro-batch, its old log-probs): the student's values computed once, with gradient."""
        if isinstance(micro, RLPart):
            values = self._completion_values(micro.rollouts)
            old_B_T = values.logprobs_B_T.detach() if old_B_T is None else old_B_T
            weight_B_T = _engine_weight(micro.rollouts, old_B_T, spec, tally)
            return rl_loss(values.logprobs_B_T, old_B_T, micro, spec, normaliser, tally, weight_B_T), old_B_T
        support = micro.teacher.support_ids_B_T_S
        values = self._completion_values(micro.rollouts, support, topk=spec.overlap_k if support is not None else 0)
        old_B_T = values.logprobs_B_T.detach() if old_B_T is None else old_B_T
        weight_B_T = _engine_weight(micro.rollouts, old_B_T, spec, tally)
        loss = opd_loss(values.logprobs_B_T, values.extra_B_T_J, values.topk_ids_B_T_K, old_B_T, micro, spec, normaliser,
                        tally, edge, weight_B_T)
        return loss, old_B_T

    @torch.no_grad()
    def _policy_kl(self, rollouts: list[Rollouts], olds: list[torch.Tensor]) -> float:
        """k3 estimate of KL(pi_old || pi_new) on this update's tokens: how far one step moved."""
        self.model.eval()
        values = []
        for r, old in zip(rollouts, olds):
            new = self._token_logprobs(r)
            values.append(approx_kl(new, old, r.completion_mask_B_T.to(self.device)).item())
        return sum(values) / max(len(values), 1)


def _engine_weight(rollouts: Rollouts, old_B_T: torch.Tensor, spec: LossSpec, tally: Tally) -> torch.Tensor | None:
    """Each token's correction for rollouts a rollout engine sampled (None when the learner sampled them),
    with the engine/learner gap tallied (copd.core.correction)."""
    engine_B_T = rollouts.sampler_logprobs_B_T
    if engine_B_T is None:
        return None
    weight_B_T = correction_weight(spec.correction, old_B_T, engine_B_T, spec.correction_cap)
    mask_B_T = rollouts.completion_mask_B_T
    tokens = float(mask_B_T.sum().item())
    for name, value in engine_mismatch(old_B_T, engine_B_T, mask_B_T, weight_B_T).items():
        tally.mean(name, value, tokens)
    return weight_B_T


def _mini_batches(pieces: list[Piece], count: int) -> list[list[Piece]]:
    """`count` lists of pieces, mini-batch i holding group chunk i of every part (empty chunks left out)."""
    if count == 1:
        return [pieces]
    batches: list[list[Piece]] = [[] for _ in range(count)]
    for piece in pieces:
        width = piece.part.rollouts.completion_mask_B_T.shape[1]
        for batch, rows in zip(batches, mini_batch_rows(piece.part.rollouts, count)):
            if len(rows):
                batch.append(Piece(piece.part.micro(rows, width), piece.old_B_T[rows]))
    return [b for b in batches if b]


def _mean_results(results: list[UpdateResult]) -> UpdateResult:
    """One optimizer step's result as it is; several steps' metrics averaged (each edge's too)."""
    if len(results) == 1:
        return results[0]
    mean = lambda dicts: {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for d in dicts for k in d}  # noqa: E731
    edges = {e for r in results for e in r.edge_metrics}
    return UpdateResult(metrics={**mean([r.metrics for r in results]), "optimizer_steps": float(len(results))},
                        edge_metrics={e: mean([r.edge_metrics[e] for r in results if e in r.edge_metrics]) for e in edges})
