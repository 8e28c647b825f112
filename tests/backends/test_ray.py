"""run.backend: ray on a local Ray with logical resources: one actor per branch, the same numbers as in one process."""

import json
import os
import signal
from pathlib import Path

import pytest

from tests.extras import require  # noqa: E402

ray = require("ray")

from copd.config.loader import load_config  # noqa: E402
from copd.driver import trainer as trainer_module  # noqa: E402
from copd.driver.pipeline import run_training  # noqa: E402

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
SHORT = ["schedule.cycles=2", "schedule.rl_steps=2", "schedule.opd_steps=2", "eval.samples=16", "rl.prompts_per_step=4",
         "opd.prompts_per_step=4", "warmup.max_steps=50", "run.threads=1"]


@pytest.fixture(scope="module")
def local_ray():
    # Logical GPUs: placement with GPU bundles is exercised on a machine without any.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same config in one process (one torch thread, as each actor has)."""
    folder = tmp_path_factory.mktemp("ray")
    cache = f"model.cache_dir={folder / 'cache'}"
    return run_training(load_config(DEMO, [*SHORT, cache, f"run.out={folder / 'local'}"])), cache


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]


def ray_run(tmp_path, cache, name):
    return run_training(load_config(DEMO, [*SHORT, cache, f"run.out={tmp_path / name}", "run.backend=ray", "resources.gpus_per_branch=1"]))


def test_a_ray_run_matches_the_local_run(tmp_path, local_ray, local_run):
    local, cache = local_run
    remote = ray_run(tmp_path, cache, "ray")
    assert records(remote) == records(local)
    assert (remote / "eval.json").read_text() == (local / "eval.json").read_text()
    bundles = [b for group in ray.util.placement_group_table().values() for b in group["bundles"].values()]
    assert {"CPU": 1.0, "GPU": 1.0} in bundles  # one bundle per branch, placed with a placement group


def test_a_killed_branch_restarts_every_branch_from_the_last_checkpoint(tmp_path, local_ray, local_run, monkeypatch, capsys):
    local, cache = local_run
    step, killed = trainer_module.Trainer.step, []

    def step_that_kills(self, phase):
        if self.state["global_step"] == 5 and not killed:  # in cycle 2, after cycle 1's checkpoint
            killed.append(self.learners["rev"].pid())
            os.kill(killed[0], signal.SIGKILL)
        return step(self, phase)

    monkeypatch.setattr(trainer_module.Trainer, "step", step_that_kills)
    remote = ray_run(tmp_path, cache, "killed")
    assert killed
    assert records(remote) == records(local)
    assert (remote / "eval.json").read_text() == (local / "eval.json").read_text()


def test_ctrl_c_releases_the_actors_and_the_run_resumes(tmp_path, local_ray, local_run, monkeypatch):
    local, cache = local_run
    step = trainer_module.Trainer.step

    def interrupted(self, phase):
        if self.state["global_step"] == 5:
            raise KeyboardInterrupt
        return step(self, phase)

    monkeypatch.setattr(trainer_module.Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ray_run(tmp_path, cache, "stopped")
    assert all(group["state"] == "REMOVED" for group in ray.util.placement_group_table().values())
    assert (tmp_path / "stopped" / "checkpoints" / "cycle_0001" / "state.json").is_file()
    monkeypatch.setattr(trainer_module.Trainer, "step", step)
    config = load_config(DEMO, [*SHORT, cache, f"run.out={tmp_path / 'stopped'}", "run.backend=ray", "resources.gpus_per_branch=1"])
    resumed = run_training(config, resume=True)
    assert records(resumed) == records(local)
    assert (resumed / "eval.json").read_text() == (local / "eval.json").read_text()


def test_lora_branches_on_ray_match_the_local_run(tmp_path, local_ray):
    require("peft")
    cache = f"model.cache_dir={tmp_path / 'cache'}"
    lora = [*SHORT, cache, "lora.enabled=true", "lora.r=4", "optim.lr=2e-3"]
    local = run_training(load_config(DEMO, [*lora, f"run.out={tmp_path / 'local'}"]))
    remote = run_training(load_config(DEMO, [*lora, f"run.out={tmp_path / 'ray'}", "run.backend=ray"]))
    assert records(remote) == records(local)
    assert (remote / "eval.json").read_text() == (local / "eval.json").read_text()
