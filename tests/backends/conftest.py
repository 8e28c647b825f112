"""The demo config's short run in one process, shared by the Ray tests as their reference."""

from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
SHORT = ["schedule.cycles=2", "schedule.rl_steps=2", "schedule.opd_steps=2", "eval.samples=16", "rl.prompts_per_step=4",
         "opd.prompts_per_step=4", "warmup.max_steps=50", "run.threads=1"]


@pytest.fixture(scope="session")
def demo_local_run(tmp_path_factory):
    """(run folder, the model cache override): SHORT in one process, one torch thread as each Ray actor has.
    The warm-started base in the cache is shared by every run made with the override."""
    from copd.config.loader import load_config
    from copd.driver.pipeline import run_training

    folder = tmp_path_factory.mktemp("demo")
    cache = f"model.cache_dir={folder / 'cache'}"
    return run_training(load_config(DEMO, [*SHORT, cache, f"run.out={folder / 'local'}"])), cache
