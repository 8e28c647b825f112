"""run.backend: ray on a local Ray with logical resources: one actor per branch, the same numbers as in one process."""

import json
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray backend needs copd[ray]")

from copd.config.loader import load_config  # noqa: E402
from copd.driver.pipeline import run_training  # noqa: E402
EXAMPLES_DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"

SHORT = ["schedule.cycles=2", "schedule.rl_steps=2", "schedule.opd_steps=2", "eval.samples=16", "rl.prompts_per_step=4",
         "opd.prompts_per_step=4", "warmup.max_steps=50", "run.threads=1"]


@pytest.fixture(scope="module")
def local_ray():
    # Logical GPUs: placement with GPU bundles is exercised on a machine without any.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]


def test_a_ray_run_matches_the_local_run(tmp_path, local_ray):
    cache = f"model.cache_dir={tmp_path / 'cache'}"
    local = run_training(load_config(EXAMPLES_DEMO, [*SHORT, cache, f"run.out={tmp_path / 'local'}"]))
    remote = run_training(load_config(EXAMPLES_DEMO, [*SHORT, cache, f"run.out={tmp_path / 'ray'}", "run.backend=ray",
                                                      "resources.gpus_per_branch=1"]))
    assert records(remote) == records(local)
    assert (remote / "eval.json").read_text() == (local / "eval.json").read_text()
    assert ray.util.placement_group_table()  # the branches were placed with a placement group
    bundles = [b for group in ray.util.placement_group_table().values() for b in group["bundles"].values()]
    assert {"CPU": 1.0, "GPU": 1.0} in bundles
