"""Every shipped example config validates and its capabilities load (paths relative to the file)."""

from pathlib import Path

import pytest

from copd.config.loader import load_config
from copd.driver.pipeline import load_capabilities
from copd.driver.trainer import Trainer
from copd.schedule.plan import build_plan

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path, tmp_path):
    config = load_config(path, [f"run.out={tmp_path / 'run'}"])
    capabilities = load_capabilities(config, base_dir=path.parent)
    assert all(c.test_set(5) for c in capabilities.values())
    trainer = Trainer(config, tmp_path, {}, capabilities)
    assert sum(p.steps for p in trainer.plan) == config.schedule.cycles * (config.schedule.rl_steps + config.schedule.opd_steps)


def test_three_branch_example_is_hub_and_spoke(tmp_path):
    config = load_config(EXAMPLES[0].parent / "three_branches.yaml")
    trainer = Trainer(config, tmp_path, {}, load_capabilities(config))
    assert {e.label for e in trainer.edges} == {"rev<-sort", "sort<-rev", "add<-sort", "sort<-add"}
    assert build_plan("copd", ["a"], [], 1, 1, 1)[1].edges == ()
