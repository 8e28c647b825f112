"""Damaged checkpoints: found before loading, skipped for the one before them, or one line naming the file."""

import dataclasses
import json

import pytest

from copd.backends.local.hf import HFPolicy
from copd.config.schema import TinyModelConfig
from copd.driver.checkpoint import damage, latest_checkpoint, load_checkpoint, load_latest_intact, save_checkpoint
from copd.driver.run_state import RunState
from copd.errors import CopdError
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model
from tests.driver.test_trainer import make_trainer, plain, records, states

STATE = RunState(cycle=1)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def tiny_policies(seed=0):
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    cfg = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=32)
    return {name: HFPolicy(name, build_tiny_model(cfg, tokenizer, seed=seed + i), tokenizer, lr=1e-2) for i, name in enumerate(("a", "b"))}


@pytest.fixture
def two_cycles(tmp_path):
    """A run folder with real checkpoints of two tiny models after cycles 1 and 2 (weights differ by cycle)."""
    policies = tiny_policies()
    for cycle in (1, 2):
        for policy in policies.values():
            for p in policy.model.parameters():
                p.data.fill_(float(cycle))
        save_checkpoint(tmp_path, cycle, policies, dataclasses.replace(STATE, cycle=cycle), keep=2)
    return tmp_path, policies


def weights_of(policies):
    return {name: next(p.model.parameters()).flatten()[0].item() for name, p in policies.items()}


def test_intact_checkpoints_load_the_newest(two_cycles):
    run_dir, policies = two_cycles
    assert damage(latest_checkpoint(run_dir), policies) is None
    lines = []
    folder, state = load_latest_intact(run_dir, tiny_policies(seed=5), lines.append)
    assert folder.name == "cycle_0002" and state.cycle == 2 and lines == []


@pytest.mark.parametrize("damaged, fragment", [
    ("branches/b/model.safetensors", "model.safetensors: truncated"),
    ("branches/a/optimizer.pt", "optimizer.pt: not a complete torch file"),
    ("state.json", "state.json: not readable JSON"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(two_cycles, damaged, fragment):
    run_dir, _ = two_cycles
    truncate(run_dir / "checkpoints" / "cycle_0002" / damaged)
    fresh, lines = tiny_policies(seed=5), []
    folder, state = load_latest_intact(run_dir, fresh, lines.append)
    assert folder.name == "cycle_0001" and state.cycle == 1
    assert weights_of(fresh) == {"a": 1.0, "b": 1.0}  # every branch from cycle 1, none left at cycle 2
    assert len(lines) == 1 and "\n" not in lines[0]
    assert fragment in lines[0] and "cycle_0002" in lines[0] and "resuming from" in lines[0] and "cycle_0001" in lines[0]


def test_no_intact_checkpoint_is_one_line_naming_the_file(two_cycles):
    run_dir, policies = two_cycles
    truncate(run_dir / "checkpoints" / "cycle_0002" / "branches" / "a" / "model.safetensors", 0.9)
    (run_dir / "checkpoints" / "cycle_0001" / "state.json").write_text('{"cycle": 1')
    with pytest.raises(CopdError) as info:
        load_latest_intact(run_dir, policies, print)
    message = str(info.value)
    assert "\n" not in message and message.startswith("no intact checkpoint to resume from: ")
    assert str(run_dir / "checkpoints" / "cycle_0002" / "branches" / "a" / "model.safetensors") in message
    assert message.endswith("; the older one is damaged too") and "cycle_0001/state.json" not in message


def test_load_checkpoint_of_a_damaged_folder_is_a_copd_error(two_cycles):
    run_dir, policies = two_cycles
    folder = latest_checkpoint(run_dir)
    (folder / "branches" / "b" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CopdError, match=r"^damaged checkpoint: .*/b/optimizer\.pt: not a complete torch file"):
        load_checkpoint(folder, policies)


def test_state_without_the_trainers_keys_is_damage(tmp_path):
    (tmp_path / "branches").mkdir()
    (tmp_path / "state.json").write_text(json.dumps({"cycle": 1}))
    assert damage(tmp_path) == f"{tmp_path / 'state.json'}: missing key 'metrics_lines'"


def test_a_missing_branch_folder_is_damage(two_cycles):
    run_dir, policies = two_cycles
    folder = latest_checkpoint(run_dir)
    assert damage(folder, {**policies, "c": None}) == f"{folder / 'branches' / 'c'}: missing"


def test_no_checkpoint_yet_is_none(tmp_path):
    assert load_latest_intact(tmp_path, {}, print) is None


def test_trainer_resumes_from_the_previous_checkpoint_when_the_last_is_damaged(tmp_path, capsys):
    full, _ = make_trainer(tmp_path, "full")
    full.run()
    run, _ = make_trainer(tmp_path, "run")
    run.run()
    root = run.run_dir / "checkpoints"
    (root / "cycle_0002" / "branches" / "rev" / "state.json").write_text("{")
    resumed, log = make_trainer(tmp_path, "run")
    printed = []
    resumed.reporter.print = printed.append
    resumed.run(resume=True)
    assert any("cycle_0002" in line and "resuming from" in line for line in printed)
    assert [e for e in log if e[0] == "update"]  # cycle 2 was trained again
    assert states(resumed) == states(full)
    assert plain(records(resumed.run_dir)) == plain(records(full.run_dir))



def test_run_state_round_trips_through_state_json_and_reads_an_older_one(tmp_path):
    state = RunState(next_phase=3, global_step=12, opd_steps=4, nan_in_row={"a": 1}, nan_skipped={"a": 2}, carry=1,
                     cycle=2, metrics_lines=40, rl_samplers={"a": {"turn": 1}}, opd_samplers={})
    policies = tiny_policies()
    save_checkpoint(tmp_path, 2, policies, state, keep=2)
    assert load_checkpoint(latest_checkpoint(tmp_path), policies) == state
    # A state.json without the keys a later version added (carry, opd_steps) reads with their defaults.
    older = {k: v for k, v in state.to_json().items() if k not in ("carry", "opd_steps")}
    assert RunState.from_json(older) == dataclasses.replace(state, carry=0, opd_steps=0)
