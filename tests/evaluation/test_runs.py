"""A model folder inside a run is scored against that run: `copd eval` and `copd diagnose` find it the same way."""

import json

import pytest
import yaml

from copd.cli.main import main
from copd.config.schema import TinyModelConfig
from copd.evaluation.runs import enclosing_run, find_run
from copd.models.sources import TINY_ALPHABET, build_char_tokenizer, build_tiny_model
from tests.cli.test_main import fails

CONFIG = {
    "model": {"path": None},
    "warmup": {"enabled": False},
    "capabilities": [{"name": "rv", "builtin": "reversal", "options": {"test_size": 4}}],
    "branches": [{"name": "rev", "capabilities": ["rv"]}],
    "schedule": {"plan": "experts"},  # one branch: GRPO alone
    "sampling": {"max_new_tokens": 2},
    "eval": {"n": 3},
}


def save_model(folder):
    tokenizer = build_char_tokenizer(TINY_ALPHABET)
    cfg = TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_positions=48)
    build_tiny_model(cfg, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture()
def run(tmp_path):
    """A run directory as training leaves it: config.yaml, a branch, the final model and a merge."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "run": {"out": str(run)}}))
    for place in ("branches/rev", "final", "merged-ties"):
        save_model(run / place)
    return run


@pytest.mark.parametrize("place", ["", "final", "base", "merged-ties", "branches/rev", "checkpoints/cycle_0002/branches/rev"])
def test_every_place_a_run_writes_models_to_lies_in_that_run(tmp_path, place):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("")
    assert enclosing_run(tmp_path / "run" / place) == (tmp_path / "run").resolve()


def test_folders_elsewhere_lie_in_no_run(tmp_path):
    (tmp_path / "config.yaml").write_text("")  # a config beside folders that are not a run's model places
    assert enclosing_run(tmp_path / "models" / "smollm") is None
    assert enclosing_run(tmp_path / "a" / "branches" / "x" / "y") is None
    assert enclosing_run(tmp_path / "models") == tmp_path.resolve()  # RUN/NAME
    assert find_run([tmp_path / "models" / "smollm", tmp_path / "models"]) == tmp_path.resolve()


def test_a_branch_folder_is_scored_on_its_runs_capability_and_settings(run, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert main(["eval", str(run / "branches" / "rev"), "--tasks", "rv", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"run: {run.resolve()} (task names are its capabilities rv, on their held-out splits")
    assert "generation: max_new_tokens 2, temperature 1.0, top_p 1.0, n 3," in printed and "model-folder defaults" not in printed
    found = json.loads(out.read_text())
    assert found["models"]["rev"]["scores"]["rv"]["all"]["prompts"] == 4  # the run's test_size, not the built-in's 200


def test_a_run_lists_its_merges_after_its_final_model(run, tmp_path):
    out = tmp_path / "scores.json"
    assert main(["eval", str(run), "--tasks", "rv", "--samples", "1", "--n", "1", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["models"]) == ["branch:rev", "merged", "merged-ties"]


def test_a_folder_outside_a_run_knows_only_builtins_and_files(tmp_path, capsys):
    save_model(tmp_path / "model")
    err = fails(capsys, ["eval", str(tmp_path / "model"), "--tasks", "rv"])
    assert "'rv' is neither a capability (" in err and "nor a data file" in err


def test_diagnose_prints_the_run_it_found(run, capsys):
    assert main(["diagnose", str(run / "branches" / "rev"), str(run / "merged-ties"), "--tasks", "rv", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"run: {run.resolve()} (task names are its capabilities rv")
    assert "\n  rv " in printed and "verdict: overall top-4 overlap" in printed  # a row for the run's own capability
