"""Baselines are config transforms and plans, run by the same driver."""

import json

import pytest

from copd.config.loader import validate_config
from copd.config.methods import METHODS
from copd.driver.pipeline import run_training
from copd.driver.trainer import plan_of
from tests.e2e.test_text import TINY, records

BASE = {
    "capabilities": [{"name": "sort", "builtin": "sort"}, {"name": "reversal", "builtin": "reversal"}],
    "branches": [{"name": "s", "capabilities": ["sort"]}, {"name": "r", "capabilities": ["reversal"]}],
    "schedule": {"cycles": 2, "rl_steps": 3, "opd_steps": 2},
}


def method_config(name):
    method = METHODS[name]
    config = method.transform(validate_config(BASE))
    return config, method.outputs(config)


def test_every_method_trains_the_same_number_of_updates_per_capability():
    updates = {}
    for name in METHODS:
        config, _ = method_config(name)
        plan = plan_of(config)
        rl_updates = sum(p.steps * len(p.rl_branches) for p in plan)
        updates[name] = rl_updates
    # K = 2 branches x 2 cycles x (3 + 2) steps: experts, CoPD and mixed all make 20 RL updates.
    assert set(updates.values()) == {20}


def test_static_opd_forks_each_expert_and_distils_from_the_other():
    config, outputs = method_config("static_opd")
    plan = plan_of(config)
    distill = plan[-1]
    assert [p.name for p in plan] == ["explore", "explore", "distill"]
    assert distill.steps == 2 * 2 and distill.rl_branches == ()
    assert set(distill.forks) == {("s_from_r", "s"), ("r_from_s", "r")}
    assert {e.label for e in distill.edges} == {"s_from_r<-r", "r_from_s<-s"}
    assert outputs == {"static OPD s<-r": "branch:s_from_r", "static OPD r<-s": "branch:r_from_s"}
    assert config.merge.branches == ["s", "r"]


def test_mopd_student_starts_from_base_and_learns_from_every_expert():
    config, outputs = method_config("mopd")
    distill = plan_of(config)[-1]
    assert distill.forks == () and {e.label for e in distill.edges} == {"student<-s", "student<-r"}
    assert all("student" not in p.rl_branches for p in plan_of(config))
    assert outputs == {"MOPD": "branch:student"}


def test_mixed_is_one_policy_on_the_union_with_k_times_the_updates():
    config, _ = method_config("mixed")
    assert [b.name for b in config.branches] == ["mixed"] and config.branches[0].capabilities == ["reversal", "sort"]
    assert sum(p.steps for p in plan_of(config)) == 2 * 2 * 5


def test_copd_variants_share_and_differ_where_they_should():
    assert METHODS["copd"].run == METHODS["copd_nomerge"].run
    oneway, _ = method_config("copd_oneway")
    assert {e.label for p in plan_of(oneway) for e in p.edges} == {"s<-r"}


def test_unknown_reference_in_distill_from_is_a_config_error():
    raw = json.loads(json.dumps(BASE))
    raw["branches"].append({"name": "x", "capabilities": ["sort"], "distill_from": ["nope"]})
    with pytest.raises(Exception, match="nope"):
        validate_config(raw)


@pytest.mark.parametrize("name", ["static_opd", "mopd"])
def test_distillation_baselines_run_on_a_real_model(tmp_path, name):
    raw = json.loads(json.dumps(TINY))
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["run"] = {"out": str(tmp_path / name), "seed": 1}
    raw["schedule"] = {"cycles": 1, "rl_steps": 2, "opd_steps": 1}
    config = METHODS[name].transform(validate_config(raw))
    run_dir = run_training(config)
    rows = records(run_dir)
    distill_edges = {r["edge"] for r in rows if r["type"] == "edge"}
    assert distill_edges == {e.label for e in plan_of(config)[-1].edges}
    assert all(r["phase"] == "distill" for r in rows if r["type"] == "edge")
    evals = json.loads((run_dir / "eval.json").read_text())["models"]
    for label in METHODS[name].outputs(config).values():
        assert label in evals


def test_a_forked_student_starts_as_a_copy_of_its_expert(tmp_path):
    from copd.driver.pipeline import load_capabilities
    from copd.driver.trainer import Trainer
    from tests.driver.test_trainer import FakePolicy, make_config

    branches = [{"name": "add", "capabilities": ["addition"]}, {"name": "rev", "capabilities": ["reversal"]},
                {"name": "add_from_rev", "capabilities": ["addition"], "distill_from": ["rev"], "fork_of": "add"}]
    config = make_config(tmp_path, branches=branches, schedule={"plan": "static_opd", "cycles": 1, "rl_steps": 1, "opd_steps": 1})
    log = []
    policies = {b.name: FakePolicy(b.name, log, 0.5, [float(i) * (k + 1) for i in range(5)]) for k, b in enumerate(config.branches)}
    trainer = Trainer(config, tmp_path, policies, load_capabilities(config))
    seen = {}
    original = policies["add_from_rev"].update

    def first_update(rl, opd, spec):
        seen.setdefault("logits", list(policies["add_from_rev"].state["logits"]))
        return original(rl, opd, spec)

    policies["add_from_rev"].update = first_update
    trainer.run()
    # At its first (distillation) update the student holds exactly the expert's trained weights.
    assert seen["logits"] == policies["add"].state["logits"]
    assert policies["add"].state["updates"] == 2 and policies["add_from_rev"].state["updates"] == 1


def test_overlap_trigger_moves_unused_explore_steps_into_consolidation(tmp_path):
    from copd.driver.pipeline import load_capabilities
    from copd.driver.trainer import Trainer
    from tests.driver.test_trainer import FakePolicy, make_config, records

    config = make_config(tmp_path, schedule={"cycles": 2, "rl_steps": 4, "opd_steps": 2, "trigger": "overlap", "overlap_threshold": 0.9})
    plan = plan_of(config)
    assert plan[0].stop_below == 0.9 and plan[1].absorbs_carry and {e.label for e in plan[0].probe_edges} == {"add<-rev", "rev<-add"}
    log = []
    # Different top-2 tokens: probed overlap is 0.5 < 0.9, so each explore phase stops after one step.
    policies = {"add": FakePolicy("add", log, 0.5, [0.0, 0.0, 0.0, 1.0, 2.0]), "rev": FakePolicy("rev", log, 0.5, [2.0, 1.0, 0.0, 0.0, 0.0])}
    Trainer(config, tmp_path, policies, load_capabilities(config)).run()
    rows = records(tmp_path)
    cycles = [[r["phase"] for r in rows if r["type"] == "branch" and r["branch"] == "add" and r["cycle"] == c] for c in (1, 2)]
    probes = [(r["cycle"], r["overlap_topk"]) for r in rows if r.get("probe")]
    # Cycle 1: top-4 overlap 0.75 < 0.9 after the first step, so the 3 unused explore steps go to consolidation.
    assert cycles[0] == ["explore"] + ["consolidate"] * 5
    # Distillation pulled the fake policies together (overlap 1.0): cycle 2 keeps the fixed rhythm,
    # probing after every explore step but the last.
    assert cycles[1] == ["explore"] * 4 + ["consolidate"] * 2
    assert probes == [(1, 0.75)] * 2 + [(2, 1.0)] * 6


def test_experts_are_probed_for_overlap_without_changing_training(tmp_path):
    from copd.driver.pipeline import load_capabilities
    from copd.driver.trainer import Trainer
    from tests.driver.test_trainer import FakePolicy, make_config, records

    def run(sub, probe):
        config = make_config(tmp_path / sub, schedule={"plan": "experts", "cycles": 1, "rl_steps": 2, "opd_steps": 1, "probe": probe})
        (tmp_path / sub).mkdir()
        policies = {b: FakePolicy(b, [], 0.5, [float(i) * (k + 1) for i in range(5)]) for k, b in enumerate(["add", "rev"])}
        Trainer(config, tmp_path / sub, policies, load_capabilities(config)).run()
        return records(tmp_path / sub), {b: p.state for b, p in policies.items()}

    probed, probed_states = run("probed", True)
    plain, plain_states = run("plain", False)
    assert probed_states == plain_states
    assert [r["edge"] for r in probed if r.get("probe")] == ["add<-rev", "rev<-add"] * 3
    strip = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in probed if not r.get("probe")]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in plain]


def test_every_method_derives_from_a_hub_and_spoke_config():
    raw = json.loads(json.dumps(BASE))
    raw["capabilities"].append({"name": "count", "builtin": "count"})
    raw["branches"].append({"name": "c", "capabilities": ["count"]})
    raw["topology"] = {"kind": "hub", "hub": "s"}
    hub = validate_config(raw)
    for name in ("copd", "experts", "mixed", "static_opd", "mopd"):
        assert plan_of(METHODS[name].transform(hub))  # a valid config whose plan builds
    mixed = METHODS["mixed"].transform(hub)
    assert [b.name for b in mixed.branches] == ["mixed"] and not any(p.edges for p in plan_of(mixed))
