"""LoRA branches: one frozen base shared by every branch, one PEFT adapter each."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from copd.backends.local.lora import LoraPolicy, SharedBase, adapter_name
from copd.backends.roles import LossSpec, RLPart, SamplingParams
from copd.config.schema import TinyModelConfig
from copd.driver.pipeline import run_training
from copd.driver.trainer import Trainer
from copd.models.sources import build_char_tokenizer, build_tiny_model
from tests.e2e.test_text import records, tiny_config
from tests.extras import require

peft = require("peft")


@pytest.fixture
def trio():
    tokenizer = build_char_tokenizer("0123456789+=abc")
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_positions=32), tokenizer)
    shared = SharedBase(model, ["a", "b"], rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    a = LoraPolicy("a", shared, tokenizer, adapter_name("a"), lr=1e-2)
    b = LoraPolicy("b", shared, tokenizer, adapter_name("b"), lr=1e-2)
    base = LoraPolicy("base", shared, tokenizer, None)
    return a, b, base


def _train_a(a):
    rollouts = a.generate(["1+2=", "ab="], 4, SamplingParams(max_new_tokens=4), seed=0)
    advantages = torch.linspace(-1, 1, rollouts.completion_mask_B_T.shape[0])[:, None] * rollouts.completion_mask_B_T
    for _ in range(3):
        result = a.update([RLPart(rollouts, advantages)], [], LossSpec())
        assert not result.skipped
    return rollouts


def test_only_the_active_adapter_trains_and_the_base_stays_frozen(trio):
    a, b, base = trio
    frozen = {k: v.clone() for k, v in a.shared.base_state.items()}
    # B starts at zero: every adapter computes exactly the base at first.
    rollouts = a.generate(["1+2="], 2, SamplingParams(max_new_tokens=4), seed=1)
    start = base.score(rollouts).token_logprobs_B_T
    torch.testing.assert_close(a.score(rollouts).token_logprobs_B_T, start)
    assert a.model is b.model is base.model  # one model in memory
    _train_a(a)
    assert not torch.allclose(a.score(rollouts).token_logprobs_B_T, start)
    torch.testing.assert_close(b.score(rollouts).token_logprobs_B_T, start)
    torch.testing.assert_close(base.score(rollouts).token_logprobs_B_T, start)
    for key, value in frozen.items():
        assert torch.equal(a.shared.base_state[key], value), key
    full = sum(p.numel() for p in a.shared.base_state.values())
    assert 0 < sum(p.numel() for p in a.params) < full // 5


def test_branch_folder_is_base_plus_delta_and_the_adapter_loads_with_peft(trio, tmp_path):
    a, _, base = trio
    rollouts = _train_a(a)
    a.save_pretrained(tmp_path / "a")
    base.save_pretrained(tmp_path / "base")
    ids, mask = rollouts.input_ids_B_L, rollouts.attention_mask_B_L
    a.activate()
    with torch.no_grad():
        expected = a.model(input_ids=ids, attention_mask=mask).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
        reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "a" / "adapter")
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


def test_weights_move_between_adapters_and_checkpoints_restore_them(trio, tmp_path):
    a, b, _ = trio
    rollouts = _train_a(a)
    b.set_weights(a.get_weights())  # a static-OPD fork: the student starts as the expert
    torch.testing.assert_close(b.score(rollouts).token_logprobs_B_T, a.score(rollouts).token_logprobs_B_T)
    a.save_checkpoint(tmp_path / "ckpt")
    trained = a.score(rollouts).token_logprobs_B_T
    _train_a(a)
    a.load_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(a.score(rollouts).token_logprobs_B_T, trained)


def lora_config(tmp_path, name):
    return tiny_config(tmp_path, name, lora={"enabled": True, "r": 4, "alpha": 8}, optim={"lr": 0.01})


def test_lora_run_merges_deltas_into_the_base(tmp_path):
    run_dir = run_training(lora_config(tmp_path, "run"))
    assert (run_dir / "branches" / "rev" / "adapter" / "adapter_config.json").is_file()
    load = lambda sub: AutoModelForCausalLM.from_pretrained(run_dir / sub).state_dict()  # noqa: E731
    base, final = load("base"), load("final")
    rev, cnt = load("branches/rev"), load("branches/cnt")
    changed = [k for k in base if not torch.equal(rev[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted linear layers move
    for key in base:
        torch.testing.assert_close(final[key], base[key] + ((rev[key] - base[key]) + (cnt[key] - base[key])) / 2)


def test_lora_run_resumes_exactly(tmp_path, monkeypatch):
    straight = run_training(lora_config(tmp_path, "straight"))
    original_step, calls = Trainer.step, {"n": 0}

    def crash_in_cycle_two(self, phase):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original_step(self, phase)

    monkeypatch.setattr(Trainer, "step", crash_in_cycle_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(lora_config(tmp_path, "crashed"))
    monkeypatch.setattr(Trainer, "step", original_step)
    resumed = run_training(lora_config(tmp_path, "crashed"), resume=True)
    assert records(resumed) == records(straight)


def test_the_run_log_says_how_many_weights_each_branch_trains(tmp_path):
    from copd.backends.local.branches import build_branches, describe_branches

    config = lora_config(tmp_path, "unused")
    tokenizer = build_char_tokenizer("0123456789+=abc")
    model = build_tiny_model(config.model.tiny, tokenizer)
    total = sum(p.numel() for p in model.parameters())
    # Per layer, r = 4: q, k, v, o (32 -> 32) 4 x 256; gate, up (32 -> 64) 2 x 384; down (64 -> 32) 384.
    line = describe_branches(build_branches(config, model, tokenizer, "cpu")[0])
    assert line == f"2 branches, {2 * 2176:,} trained parameters each, of {total:,} in the model"
