"""Branches of two ranks each (a worker group per branch, FSDP2 over gloo) on a local Ray: the one-rank numbers."""

import json
import math
import os
import signal

import pytest

from tests.extras import require

ray = require("ray")

from copd.config.loader import load_config  # noqa: E402
from copd.driver import trainer as trainer_module  # noqa: E402
from copd.driver.pipeline import run_training  # noqa: E402
from tests.backends.conftest import DEMO, SHORT  # noqa: E402

TWO_RANKS = ["run.backend=ray", "resources.ranks_per_branch=2"]
# Two ranks compute each row in one forward and sum their gradients in another order than one rank:
# metrics agree to this relative tolerance (measured: at most 1.4e-5 after 8 steps; eval.json identical).
REL = 1e-3


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def runs(demo_local_run, tmp_path_factory, local_ray):
    """(one-rank run in one process, two-rank run on Ray, the model cache) of the same config."""
    one, cache = demo_local_run
    two = run_training(load_config(DEMO, [*SHORT, *TWO_RANKS, cache, f"run.out={tmp_path_factory.mktemp('ranks') / 'two'}"]))
    return one, two, cache


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]


def assert_close(found, expected, path="") -> None:
    """Equal structure and strings, numbers within REL (or 1e-6 near zero)."""
    if isinstance(expected, dict):
        assert found.keys() == expected.keys(), path
        for key in expected:
            assert_close(found[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(found) == len(expected), path
        for i, (a, b) in enumerate(zip(found, expected)):
            assert_close(a, b, f"{path}[{i}]")
    elif isinstance(expected, float) and not math.isnan(expected):
        assert found == pytest.approx(expected, rel=REL, abs=1e-6), path
    else:
        assert found == expected, path


def test_two_ranks_per_branch_match_one_rank(runs):
    one, two, _ = runs
    assert_close(records(two), records(one))
    assert_close(json.loads((two / "eval.json").read_text()), json.loads((one / "eval.json").read_text()))
    # The branch folders and the merge are ordinary transformers folders.
    assert (two / "final" / "config.json").is_file() and (two / "branches" / "rev" / "model.safetensors").is_file()


def test_a_killed_rank_restarts_every_branch_and_the_run_ends_as_if_uninterrupted(tmp_path, runs, monkeypatch):
    _, two, cache = runs
    step, killed = trainer_module.Trainer.step, []

    def step_that_kills(self, phase):
        if self.state.global_step == 5 and not killed:  # in cycle 2, after cycle 1's checkpoint
            killed.append(self.learners["rev"].pids()[1])
            os.kill(killed[0], signal.SIGKILL)
        return step(self, phase)

    monkeypatch.setattr(trainer_module.Trainer, "step", step_that_kills)
    again = run_training(load_config(DEMO, [*SHORT, *TWO_RANKS, cache, f"run.out={tmp_path / 'killed'}"]))
    assert killed
    assert records(again) == records(two)
    assert (again / "eval.json").read_text() == (two / "eval.json").read_text()


@pytest.mark.slow  # tests/backends/local/test_sharded.py checks the checkpoint itself across rank counts
def test_a_run_saved_by_two_ranks_resumes_on_one(tmp_path, runs, monkeypatch):
    one, _, cache = runs
    step = trainer_module.Trainer.step

    def step_that_stops(self, phase):
        if self.state.global_step == 5:  # in cycle 2, after cycle 1's checkpoint
            raise KeyboardInterrupt
        return step(self, phase)

    monkeypatch.setattr(trainer_module.Trainer, "step", step_that_stops)
    out = f"run.out={tmp_path / 'moved'}"
    with pytest.raises(KeyboardInterrupt):
        run_training(load_config(DEMO, [*SHORT, *TWO_RANKS, cache, out]))
    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    resumed = run_training(load_config(DEMO, [*SHORT, cache, out]), resume=True)
    assert_close(records(resumed), records(one))
