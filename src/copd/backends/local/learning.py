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

import contextlib
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

    @property
    def rows(self) -> int:
        return self.part.rollouts.completion_mask_B_T.shape[0]


class Learning:
    """HFPolicy's update; needs `_completion_values`, `_token_logprobs`, `model`, `optimizer`, `params`, `micro_batch_tokens`."""

    def update(self, rl: list[RLPart], opd: list[OPDPart], spec: LossSpec) -> UpdateResult:
        """`spec.epochs` passes over the parts, `spec.mini_batches` optimizer steps each."""
        started = time.perf_counter()
        self.activate()
        self.model.train()
        batches = self._mini_batches([p.resolved() for p in rl] + list(opd), spec.mini_batches)
        pieces = [piece for batch in batches for piece in batch]
        if spec.mini_batches > 1:  # mini-batch 2 must see the policy from before step 1
            with self._no_grad_passes():
                for piece in pieces:
                    piece.old_B_T = self._token_logprobs(piece.part.rollouts) if piece.rows else None
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
            result.metrics["approx_kl"] = self._policy_kl([p for p in pieces if p.rows])
        result.metrics["update_seconds"] = time.perf_counter() - started
        return result

    def _mini_batches(self, parts: list[RLPart | OPDPart], count: int) -> list[list[Piece]]:
        """`count` lists of pieces on this device, mini-batch i holding group chunk i of every part (empty chunks
        left out), of which this process keeps its share (`_share`)."""
        if count == 1 and not self.lockstep:
            return [[Piece(p.to(self.device)) for p in parts]]
        batches: list[list[Piece]] = [[] for _ in range(count)]
        for part in parts:
            width = part.rollouts.completion_mask_B_T.shape[1]
            for batch, rows in zip(batches, mini_batch_rows(part.rollouts, count)):
                if len(rows):
                    batch.append(Piece(part.micro(self._share(rows, part.rollouts), width).to(self.device)))
        return [b for b in batches if b]

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
        tally, edges = Tally(), {}
        tally.total("loss", 0.0)
        tally.total("tokens", 0.0)
        for piece in batch:
            edge = None if piece.is_rl else edges.setdefault(piece.part.edge, Tally())
            part_loss = self._backward_part(piece, spec, tally, edge)
            if part_loss is None:
                return {"loss": float("nan")}, {}, False
            tally.total("loss", part_loss)
            tally.total("tokens", float(piece.part.rollouts.num_tokens))
        self._reduce([tally, *edges.values()])
        return tally.result(), {name: e.result() for name, e in edges.items()}, True

    def _backward_part(self, piece: Piece, spec: LossSpec, tally: Tally, edge: Tally | None) -> float | None:
        """The part's loss, backpropagated micro-batch by micro-batch; None if it is not finite."""
        part = piece.part
        mask_B_T = part.rollouts.completion_mask_B_T
        normaliser = self._normaliser(mask_B_T, spec.aggregation)
        cuts = micro_batches(part.rollouts, self.micro_batch_tokens) if piece.rows else []  # a rank may have no rows
        whole = len(cuts) == 1
        olds, total, finite = [], 0.0, True
        for index in range(self._passes(len(cuts))):
            if index >= len(cuts):
                self._idle_pass()
                continue
            cut = cuts[index]
            micro = part if whole else part.micro(cut.rows, cut.width)
            old = None if piece.old_B_T is None else piece.old_B_T if whole else piece.old_B_T[cut.rows, : cut.width]
            loss, old = self._micro_loss(micro, old, spec, normaliser, tally, edge)
            if not torch.isfinite(loss):
                finite = False
                if not self.lockstep:
                    return None
            self._backward(loss)  # in lockstep a non-finite loss still runs its (collective) backward; the step is skipped
            total += loss.item()
            olds.append(old)
        if not self._agree(finite):
            return None
        if piece.old_B_T is None and olds:  # the first pass's log-probs are the old policy's (later epochs reuse them)
            piece.old_B_T = olds[0] if whole else scatter_rows(olds, cuts, *mask_B_T.shape)
        return total

    # ---- hooks: what the ranks of a sharded branch agree on (copd.backends.local.sharded) ----
    lockstep = False  # whether every pass with gradients must run on every rank (collective passes)

    def _normaliser(self, mask_B_T: torch.Tensor, aggregation: str) -> torch.Tensor:
        return loss_normaliser(mask_B_T, aggregation)

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _passes(self, count: int) -> int:
        """Passes to run for a part of `count` micro-batches (the most any rank runs, in lockstep)."""
        return count

    def _idle_pass(self) -> None:
        raise NotImplementedError("only a rank of a sharded branch runs idle passes")

    def _agree(self, finite: bool) -> bool:
        return finite

    def _reduce(self, tallies: list[Tally]) -> None:
        """Tallies of this process's rows are the whole step's."""

    def _share(self, rows: torch.Tensor, rollouts: Rollouts) -> torch.Tensor:
        """The rows of a mini-batch this process trains on: all of them."""
        return rows

    def _no_grad_passes(self):
        """Around passes without gradients that not every rank runs alike."""
        return contextlib.nullcontext()

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
    def _policy_kl(self, pieces: list[Piece]) -> float:
        """k3 estimate of KL(pi_old || pi_new) on this update's tokens: how far one step moved (mean over parts)."""
        self.model.eval()
        tally = Tally()
        with self._no_grad_passes():
            for piece in pieces:
                rollouts = piece.part.rollouts
                new = self._token_logprobs(rollouts)
                mask_B_T = rollouts.completion_mask_B_T
                name = piece.part.edge if not piece.is_rl else "rl"
                tally.mean(name, approx_kl(new, piece.old_B_T, mask_B_T).item(), float(mask_B_T.sum().item()))
        self._reduce([tally])
        values = list(tally.result().values())
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


def _mean_results(results: list[UpdateResult]) -> UpdateResult:
    """One optimizer step's result as it is; several steps' metrics averaged (each edge's too)."""
    if len(results) == 1:
        return results[0]
    mean = lambda dicts: {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for d in dicts for k in d}  # noqa: E731
    edges = {e for r in results for e in r.edge_metrics}
    return UpdateResult(metrics={**mean([r.metrics for r in results]), "optimizer_steps": float(len(results))},
                        edge_metrics={e: mean([r.edge_metrics[e] for r in results if e in r.edge_metrics]) for e in edges})
