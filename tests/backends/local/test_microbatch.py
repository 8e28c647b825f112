"""Micro-batches, head chunks, mini-batches and activation checkpointing leave the update as it was.

The reference is the one-shot update: every part in one pass, its [B, T, V] logits whole.
Gradients of a micro-batched update must equal it to fp32 rounding (atol 1e-6, rtol 1e-5),
for every loss aggregation and OPD estimator, on a step with an RL part and two OPD edges
of different lengths, and so must its metrics.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.modeling_layers import GradientCheckpointingLayer

from copd.backends.local import lm_head
from copd.backends.local.microbatch import micro_batches, mini_batch_rows
from copd.backends.roles import LossSpec, OPDPart, RLPart, SamplingParams, ScoreRequest
from copd.core.losses import LOSS_AGGREGATIONS
from copd.core.opd import OPD_ESTIMATORS
from tests.backends.local.test_hf import PROMPTS, tiny_policy

GRAD_TOLERANCE = dict(atol=1e-6, rtol=1e-5)


def _step(seed: int = 0):
    """An RL part (12 rows, up to 6 tokens) and two OPD edges (4 and 2 tokens) for student `s`."""
    student, teacher_a, teacher_b = tiny_policy("s", seed=0, lr=0.0), tiny_policy("a", seed=1), tiny_policy("b", seed=2)
    rl_rollouts = student.generate(PROMPTS, 4, SamplingParams(max_new_tokens=6), seed=seed)
    advantages = torch.randn(rl_rollouts.input_ids_B_L.shape[0], generator=torch.Generator().manual_seed(seed))
    edges = []
    for teacher, length, prompts in ((teacher_a, 4, PROMPTS[:2]), (teacher_b, 2, PROMPTS[1:])):
        rollouts = student.generate(prompts, 2, SamplingParams(max_new_tokens=length, record_topk=4), seed=seed + length)
        edges.append(OPDPart(rollouts, teacher.score(rollouts, ScoreRequest.support(4)), beta=0.5, edge=f"s<-{teacher.name}"))
    return student, [RLPart(rl_rollouts, advantages)], edges


def _update(policy, rl, opd, spec, budget=10**9):
    policy.micro_batch_tokens = budget
    result = policy.update(rl, opd, spec)
    return result, [p.grad.clone() for p in policy.model.parameters()]


def _assert_same(reference, other):
    (ref_result, ref_grads), (result, grads) = reference, other
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(b, a, **GRAD_TOLERANCE)
    assert set(result.metrics) == set(ref_result.metrics)
    for key, value in untimed(ref_result.metrics).items():
        assert result.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for edge, metrics in ref_result.edge_metrics.items():
        for key, value in metrics.items():
            assert result.edge_metrics[edge][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (edge, key)


@pytest.mark.parametrize("aggregation", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("estimator", sorted(OPD_ESTIMATORS))
def test_micro_batched_gradients_equal_the_one_shot_update(monkeypatch, aggregation, estimator):
    student, rl, opd = _step()
    spec = LossSpec(aggregation=aggregation, opd_estimator=estimator, grad_clip=1e9)
    reference = _update(student, rl, opd, spec)
    row = rl[0].rollouts.input_ids_B_L.shape[1]  # the longest row: one row per micro-batch
    for budget in (row, 3 * row, 10**9):
        if budget == 10**9:  # the whole batch in one pass, but the LM head one position at a time
            monkeypatch.setattr(lm_head, "LOGITS_PER_CHUNK", 1)
        _assert_same(reference, _update(student, rl, opd, spec, budget))


def test_cuts_fit_the_budget_group_long_rows_and_trim_padding():
    _student, rl, _ = _step()
    rollouts = rl[0].rollouts
    lengths = rollouts.completion_mask_B_T.sum(-1).long()
    row = rollouts.input_ids_B_L.shape[1]
    assert len(micro_batches(rollouts, 10**9)) == 1 and micro_batches(rollouts, 10**9)[0].width == lengths.max()
    cuts = micro_batches(rollouts, 3 * row)
    assert sorted(torch.cat([c.rows for c in cuts]).tolist()) == list(range(len(lengths)))
    for cut in cuts:
        assert len(cut.rows) * (rollouts.prompt_len + cut.width) <= 3 * row
        assert cut.width == lengths[cut.rows].max()  # trimmed to the cut's own longest completion
    widths = [c.width for c in cuts]
    assert widths == sorted(widths, reverse=True)  # longest rows first


def test_mini_batches_are_whole_prompt_groups():
    _student, rl, _ = _step()
    rows = mini_batch_rows(rl[0].rollouts, 3)  # 3 prompts x 4 rollouts
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_mini_batches_step_once_each_with_the_old_log_probs_from_before_the_first():
    student, rl, opd = _step()
    student.optimizer.param_groups[0]["lr"] = 1e-2
    before = student._token_logprobs(rl[0].resolved().rollouts)
    result = student.update(rl, opd, LossSpec(mini_batches=2))
    assert result.metrics["optimizer_steps"] == 2.0
    assert all(s["step"].item() == 2 for s in student.optimizer.state.values())
    # Mini-batch 2 ran on a policy one step old, against the log-probs from before step 1: rho != 1.
    after = student._token_logprobs(rl[0].resolved().rollouts)
    assert not torch.allclose(before, after) and result.metrics["approx_kl"] > 0


def test_the_second_mini_batch_gradient_is_that_of_its_rows_alone():
    student, rl, opd = _step()
    spec = LossSpec(mini_batches=2, grad_clip=1e9, step_kl=False)
    _, grads = _update(student, rl, opd, spec)  # lr 0: both steps see the same weights
    # 3 prompt groups of the RL part in 2 mini-batches: groups 0-1, then group 2; each edge's 2 groups one each.
    second_rl = [RLPart(rl[0].rollouts.select(torch.arange(8, 12)), rl[0].advantages[8:])]
    second_opd = [p.micro(torch.arange(2, 4), p.rollouts.completion_mask_B_T.shape[1]) for p in opd]
    _, alone = _update(student, second_rl, second_opd, LossSpec(grad_clip=1e9, step_kl=False))
    for a, b in zip(alone, grads):
        torch.testing.assert_close(b, a, **GRAD_TOLERANCE)


def test_activation_checkpointing_gives_the_same_gradients():
    from copd.backends.local.hf import enable_checkpointing

    student, rl, opd = _step()
    spec = LossSpec(opd_estimator="exact_kl", grad_clip=1e9)
    reference = _update(student, rl, opd, spec)
    enable_checkpointing(student.model)
    student.checkpointing = True
    layers = [m for m in student.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    replays = []
    for layer in layers:  # count the passes that go through torch.utils.checkpoint
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _inner=inner, **k: replays.append(1) or _inner(*a, **k)
    _assert_same(reference, _update(student, rl, opd, spec))
    assert len(layers) == 2 and len(replays) >= 2 * 3  # every layer, for each part's prefill and completions
    _assert_same(reference, _update(student, rl, opd, spec, budget=2 * rl[0].rollouts.input_ids_B_L.shape[1]))


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_exceeds_one_chunk_of_logits(monkeypatch):
    student, rl, opd = _step()
    vocab = student.model.get_output_embeddings().weight.shape[0]
    chunk = 3 * vocab  # three positions of logits
    monkeypatch.setattr(lm_head, "LOGITS_PER_CHUNK", chunk)
    student.micro_batch_tokens = 2 * rl[0].rollouts.input_ids_B_L.shape[1]
    weights = max(p.numel() for p in student.model.parameters())  # the LM head's gradient is that big anyway
    with LargestTensor() as seen:
        student.update(rl, opd, LossSpec(opd_estimator="exact_kl"))
        student.score(rl[0].rollouts, ScoreRequest.support(4))
    assert seen.largest <= max(chunk, weights)
    rows, width = rl[0].rollouts.completion_mask_B_T.shape
    assert rows * width * vocab > max(chunk, weights)  # the one-shot logits would have been larger


def test_sampling_over_the_budget_runs_whole_groups_at_a_time_reproducibly():
    policy = tiny_policy()
    params = SamplingParams(max_new_tokens=5, record_topk=2)
    whole = policy.generate(PROMPTS, 4, params, seed=3)
    policy.micro_batch_tokens = 4 * (whole.prompt_len + 5)  # one prompt group per pass
    a, b = policy.generate(PROMPTS, 4, params, seed=3), policy.generate(PROMPTS, 4, params, seed=3)
    assert a.completions == b.completions and torch.equal(a.input_ids_B_L, b.input_ids_B_L)
    assert a.input_ids_B_L.shape[0] == 12 and a.prompt_len == whole.prompt_len
    assert a.topk_ids_B_T_K.shape[:2] == a.completion_mask_B_T.shape
    # Each row's scores are its own whatever the padding: scoring the cut batch as one agrees with per-group passes.
    scores = policy.score(a).token_logprobs_B_T
    mask = a.completion_mask_B_T.bool()
    for group in range(3):
        rows = torch.arange(4 * group, 4 * group + 4)
        alone = policy.score(a.select(rows)).token_logprobs_B_T
        torch.testing.assert_close(alone[mask[rows]], scores[rows][mask[rows]])


def test_a_second_epoch_clips_the_same_tokens_whatever_the_budget():
    # Epoch 2 runs on a moved policy (rho != 1), so clip fractions are not trivially 0. Two
    # identical students take the same two AdamW steps, one in passes of one row.
    spec = LossSpec(epochs=2, eps_low=0.02, eps_high=0.02, opd_estimator="baseline", grad_clip=1e9)
    results = []
    for budget in (10**9, None):
        student, rl, opd = _step()
        student.optimizer.param_groups[0]["lr"] = 0.05
        budget = budget or rl[0].rollouts.input_ids_B_L.shape[1]
        results.append(_update(student, rl, opd, spec, budget)[0])
    one_shot, micro = results
    assert one_shot.metrics["clip_frac"] > 0 and one_shot.metrics["opd_clip_frac"] > 0
    for key, value in untimed(one_shot.metrics).items():
        assert micro.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for edge, metrics in one_shot.edge_metrics.items():
        for key, value in metrics.items():
            assert micro.edge_metrics[edge][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (edge, key)


def untimed(metrics: dict) -> dict:
    """Metrics without the timings (update_seconds), which no two updates share."""
    return {k: v for k, v in metrics.items() if not k.endswith("seconds")}
