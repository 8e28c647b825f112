"""The seam's contract, for every implementation of the roles: CPU tensors in, CPU tensors out.

Each policy (full weights, LoRA, vision-language, the test fake) samples, scores and learns
through copd.backends.roles only; what crosses is plain CPU data, so the same driver runs
branches on any device or in another process.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from copd.backends.local.factory import make_policy
from copd.backends.local.hf import HFPolicy
from copd.backends.roles import BranchRoles, LossSpec, OPDPart, Prompt, RLPart, SamplingParams, ScoreRequest, UpdateResult
from copd.config.schema import TinyModelConfig
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model
from copd.multimodal.tiny import build_tiny_vl
from tests.extras import require
from tests.fakes import FakePolicy

TEXT = ["rev:abc=", "12+3="]
K = 5  # covers the fake's five-token vocabulary


def _tiny_text():
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=48)
    return build_tiny_model(cfg, tokenizer, seed=0), tokenizer


def full_pair(tmp_path):
    model, tokenizer = _tiny_text()
    return HFPolicy("s", model, tokenizer, lr=1e-3), HFPolicy("t", copy.deepcopy(model), tokenizer), TEXT


def lora_pair(tmp_path):
    require("peft")
    from copd.backends.local.lora import LoraPolicy, SharedBase, adapter_name

    model, tokenizer = _tiny_text()
    shared = SharedBase(model, ["s", "t"], rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    return (LoraPolicy("s", shared, tokenizer, adapter_name("s"), lr=1e-3), LoraPolicy("t", shared, tokenizer, adapter_name("t")), TEXT)


def vl_pair(tmp_path):
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    model, processor = build_tiny_vl(seed=0, init_std=0.3)
    prompts = [Prompt("colour?", images=(str(tmp_path / "red.png"),)), Prompt("text only")]
    return make_policy("s", model, processor, lr=1e-3), make_policy("t", copy.deepcopy(model), processor), prompts


def fake_pair(tmp_path):
    return FakePolicy("s", [], 0.5), FakePolicy("t", [], 0.7, [0.3 * i for i in range(5)]), ["1+2=", "rev:ab="]


def cpu_tensors(obj) -> list[torch.Tensor]:
    """Every tensor held by a dataclass of the seam (nested VisionInputs and dicts included)."""
    found = []
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(v for v in value.values() if isinstance(v, torch.Tensor))
        elif hasattr(value, "__dataclass_fields__"):
            found.extend(cpu_tensors(value))
    return found


@pytest.mark.parametrize("build", [full_pair, lora_pair, vl_pair, fake_pair], ids=["full", "lora", "vision-language", "fake"])
def test_every_policy_keeps_the_seam_on_the_cpu(tmp_path, build):
    student, teacher, prompts = build(tmp_path)
    roles = BranchRoles.of(student)
    assert roles.sampler is roles.scorer is roles.learner is student
    rollouts = roles.sampler.generate(prompts, 2, SamplingParams(max_new_tokens=3, record_topk=K), seed=0)
    B, T = rollouts.completion_mask_B_T.shape
    assert rollouts.topk_ids_B_T_K.shape[:2] == (B, T)
    assert all(t.device.type == "cpu" for t in cpu_tensors(rollouts))

    plain = teacher.score(rollouts)
    assert plain.token_logprobs_B_T.device.type == "cpu" and plain.token_logprobs_B_T.shape == (B, T)
    assert plain.support_ids_B_T_S is None and plain.nbytes == B * T * plain.token_logprobs_B_T.element_size()
    sparse = teacher.score(rollouts, ScoreRequest(K, rollouts.topk_ids_B_T_K))
    assert all(t.device.type == "cpu" for t in cpu_tensors(sparse))
    assert sparse.support_ids_B_T_S.dtype == torch.int32 and sparse.support_ids_B_T_S.shape == (B, T, sparse.topk + K)
    assert sparse.support_logprobs_B_T_S.shape == sparse.support_ids_B_T_S.shape

    advantages = torch.linspace(-1, 1, B)[:, None] * rollouts.completion_mask_B_T
    result = roles.learner.update([RLPart(rollouts, advantages)], [OPDPart(rollouts, sparse, 0.1, "s<-t")], LossSpec())
    assert isinstance(result, UpdateResult) and not result.skipped
    assert all(isinstance(v, float) for v in result.metrics.values())
    edge = result.edge_metrics["s<-t"]
    assert 0 <= edge["overlap_topk"] <= 1 and edge["sym_kl"] >= 0
    # What was handed in stays where it was: on the CPU, unchanged.
    assert all(t.device.type == "cpu" for t in cpu_tensors(rollouts) + cpu_tensors(sparse) + [advantages])
    assert all(w.device.type == "cpu" for w in roles.learner.get_weights().values())
