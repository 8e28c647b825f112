"""A branch sampled by a rollout engine, with fakes: when its weights are synced, and what a step records."""

from pathlib import Path

import pytest
import torch

from copd.backends.engine.branch import EngineBranch
from copd.backends.engine.sampler import engine_rollouts
from copd.backends.roles import Pending, UpdateResult, settle


class FakeLearner:
    def __init__(self, skipped=False):
        self.version, self.skipped, self.calls = 0, skipped, []

    def update(self, rl, opd, spec):
        self.version += 0 if self.skipped else 1
        return UpdateResult({"loss": 1.0}, skipped=self.skipped)

    def export_weights(self, folder: Path) -> int:
        (folder / "model.safetensors").write_text(str(self.version))
        self.calls.append("export")
        return 1234

    def set_weights(self, weights):
        self.version = weights

    def load_checkpoint(self, folder):
        self.version = -1

    def parameter_counts(self):
        return (1, 2)


class FakeEngine:
    def __init__(self):
        self.version, self.restarts, self.closed = 0, 0, False

    def generate(self, prompts, n, params, seed):
        return self.version

    def reload(self, folder: Path) -> float:
        self.version = int((folder / "model.safetensors").read_text())
        return 0.5

    def restart(self):
        self.restarts, self.version = self.restarts + 1, 0

    def close(self):
        self.closed = True


@pytest.fixture
def branch(tmp_path):
    return EngineBranch("a", FakeLearner(), FakeEngine(), tmp_path)


def test_every_update_is_synced_and_recorded(branch):
    result = branch.update([], [], None)
    assert branch.engine.version == branch.learner.version == 1
    assert result.metrics["sync_bytes"] == 1234.0
    assert result.metrics["sync_reload_seconds"] == 0.5
    assert result.metrics["sync_seconds"] >= 0.0
    assert branch.generate([], 1, None, 0) == 1


def test_a_skipped_update_changes_nothing_so_nothing_is_synced(tmp_path):
    branch = EngineBranch("a", FakeLearner(skipped=True), FakeEngine(), tmp_path)
    result = branch.update([], [], None)
    assert "sync_bytes" not in result.metrics and branch.learner.calls == []


@pytest.mark.parametrize("change", [lambda b: b.set_weights(7), lambda b: b.load_checkpoint(Path("x")), lambda b: b.restart()])
def test_other_weight_changes_sync_before_the_next_sampling(branch, change):
    branch.update([], [], None)
    change(branch)
    assert branch.stale
    assert branch.generate([], 1, None, 0) == branch.learner.version
    assert not branch.stale


def test_a_remote_update_is_synced_when_the_driver_waits_for_it(branch):
    class Later(Pending):
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    learner_update = branch.learner.update
    branch.learner.update = lambda *args: Later(learner_update(*args))
    pending = branch.update([], [], None)
    assert isinstance(pending, Pending) and branch.engine.version == 0  # nothing synced before the wait
    assert settle(pending).metrics["sync_bytes"] == 1234.0 and branch.engine.version == 1


def test_everything_else_is_the_learners(branch):
    assert branch.parameter_counts() == (1, 2)
    branch.close()
    assert branch.engine.closed and not branch.folder.exists()


class CharTokenizer:
    pad_token_id, eos_token_id = 0, 9

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(str(int(i)) for i in row if not skip_special_tokens or int(i) not in (0, 9)) for row in ids]


def test_engine_answers_are_laid_out_as_copd_rollouts():
    ids = torch.tensor([[0, 5], [0, 5], [6, 7], [6, 7]])
    mask = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1]])
    answers = [([1, 9], [-0.1, -0.2], [[1, 2], [9, 3]]), ([2], [-0.3], [[2, 1]]),
               ([3, 4, 9], [-0.4, -0.5, -0.6], [[3, 1], [4, 1], [9, 1]]), ([], [], [])]
    rollouts = engine_rollouts(ids, mask, answers, CharTokenizer(), topk=2)
    assert rollouts.prompt_len == 2
    assert rollouts.completion_ids_B_T.tolist() == [[1, 9, 0], [2, 0, 0], [3, 4, 9], [0, 0, 0]]
    assert rollouts.completion_mask_B_T.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert rollouts.attention_mask_B_L[:, 2:].tolist() == rollouts.completion_mask_B_T.long().tolist()
    torch.testing.assert_close(rollouts.sampler_logprobs_B_T, torch.tensor([[-0.1, -0.2, 0], [-0.3, 0, 0], [-0.4, -0.5, -0.6], [0, 0, 0]]))
    assert rollouts.topk_ids_B_T_K[2].tolist() == [[3, 1], [4, 1], [9, 1]]
    assert rollouts.completions == ["1", "2", "34", ""]
    kept = rollouts.micro(torch.tensor([2]), 2)  # cuts carry the engine's log-probs along
    torch.testing.assert_close(kept.sampler_logprobs_B_T, torch.tensor([[-0.4, -0.5]]))
