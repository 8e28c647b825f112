"""run.backend: ray on a local Ray with logical resources: one actor per branch, the same numbers as in one process."""

import json
import os
import signal
import time
from functools import partial

import pytest

from tests.extras import require

ray = require("ray")

from copd.backends.ray_backend import BranchWorker, RemoteBranch  # noqa: E402
from copd.config.loader import load_config  # noqa: E402
from copd.driver import trainer as trainer_module  # noqa: E402
from copd.driver.pipeline import run_training  # noqa: E402
from copd.errors import BranchNotStarted  # noqa: E402
from tests.backends.conftest import DEMO, SHORT  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # Logical GPUs: placement with GPU bundles is exercised on a machine without any.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(demo_local_run):
    """The reference: the same config in one process (one torch thread, as each actor has)."""
    return demo_local_run


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
        if self.state.global_step == 5 and not killed:  # in cycle 2, after cycle 1's checkpoint
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
        if self.state.global_step == 5:
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


def test_a_restarted_branch_that_cannot_be_placed_fails_within_its_timeout(local_ray):
    # A resource no node has: the actor stays pending for good, as on a cluster that lost the branch's node.
    unplaceable = ray.remote(BranchWorker).options(num_cpus=0, resources={"lost_node": 1})
    branch = RemoteBranch("rev", partial(unplaceable.remote, dict, 1), restart_timeout=1)
    begin = time.monotonic()
    with pytest.raises(BranchNotStarted, match=r"^branch 'rev': its new actor could not be placed or started within 1 s"):
        branch.restart()
    assert time.monotonic() - begin < 15
    ray.kill(branch.actor, no_restart=True)


def test_a_restarted_branch_whose_actor_fails_to_build_names_the_cause(local_ray):
    def unbuildable():
        raise ValueError("no base folder")

    worker = ray.remote(BranchWorker).options(num_cpus=0)
    branch = RemoteBranch("rev", partial(worker.remote, unbuildable, 1), restart_timeout=60)
    with pytest.raises(BranchNotStarted, match=r"^branch 'rev': its new actor died while starting \(ValueError: no base folder\)$"):
        branch.restart()


def test_a_restarted_actor_lost_before_it_ran_is_started_again(local_ray):
    worker, starts = ray.remote(BranchWorker).options(num_cpus=0), []

    def start():
        starts.append(worker.remote(dict, 1))
        if len(starts) == 2:  # the restart's first actor dies before it runs, as when its node is found dead
            ray.kill(starts[-1], no_restart=True)
        return starts[-1]

    branch = RemoteBranch("rev", start, restart_timeout=60)
    branch.restart()
    assert len(starts) == 3 and branch.pid() > 0
    ray.kill(branch.actor, no_restart=True)
