"""Loading configs from YAML and overrides, and the one-line errors a user sees."""

import filecmp
import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from copd.cli.main import demo_config_path
from copd.config.loader import apply_override, dump_config, load_config, validate_config
from copd.config.schema import Config
from copd.errors import CopdError

ROOT = Path(__file__).resolve().parents[2]

VALID = """\
capabilities:
  - {name: addition, builtin: addition}
  - {name: reversal, builtin: reversal}
branches:
  - {name: add, capabilities: [addition], beta: 0.1}
  - {name: rev, capabilities: [reversal]}
schedule:
  cycles: 2
  rl_steps: 3
  opd_steps: 2
run: {out: runs/x, seed: 3}
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(CopdError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_file_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert isinstance(config, Config)
    assert (config.schedule.cycles, config.schedule.rl_steps, config.schedule.opd_steps) == (2, 3, 2)
    assert [b.name for b in config.branches] == ["add", "rev"]
    assert config.branches[1].beta == 0.1 and config.topology.kind == "pair"
    assert config.run.seed == 3 and config.rl.eps_high == 0.28  # unset keys keep their defaults


def test_overrides_apply_with_yaml_values(tmp_path):
    config = load_config(write(tmp_path, VALID), ["schedule.cycles=5", "branches.0.beta=0.5", "rl.filter_zero_signal=true",
                                                  "model.path=/m", "topology.kind=mesh", "optim.lr=1e-3"])
    assert config.schedule.cycles == 5 and config.schedule.rl_steps == 3
    assert config.branches[0].beta == 0.5 and config.branches[1].beta == 0.1
    assert config.rl.filter_zero_signal is True and config.model.path == "/m" and config.topology.kind == "mesh"
    assert config.optim.lr == 0.001  # YAML reads 1e-3 as a string; the float field still takes it


def test_override_creates_missing_sections():
    raw = {}
    apply_override(raw, "optim.lr=0.001")
    apply_override(raw, "run.threads=")
    assert raw == {"optim": {"lr": 0.001}, "run": {"threads": None}}


@pytest.mark.parametrize("item, needle", [
    ("foo", "key.sub=value"),
    ("=3", "key.sub=value"),
    ("branches.9.beta=0.5", "index below 2"),
    ("branches.x.beta=0.5", "index below 2"),
    ("run.out.x=1", "run.out is not a section"),
    ("run.out.x.y=1", "run.out is not a section"),
])
def test_malformed_overrides(tmp_path, item, needle):
    assert needle in error_of(write(tmp_path, VALID), [item])


def test_override_with_an_unknown_key_names_it(tmp_path):
    message = error_of(write(tmp_path, VALID), ["schedule.cycels=4"])
    assert "schedule.cycels" in message and "schedule.cycles" in message


def test_mistyped_key_names_file_line_and_nearest_key(tmp_path):
    path = write(tmp_path, VALID.replace("  cycles: 2", "  cycels: 2"))
    message = error_of(path)
    assert message.startswith(f"{path}:8:")  # the line of `cycels`
    assert "schedule.cycels" in message and "did you mean 'schedule.cycles'" in message


def test_mistyped_key_inside_a_list_item(tmp_path):
    path = write(tmp_path, VALID.replace("beta: 0.1}", "betta: 0.1}"))
    message = error_of(path)
    assert message.startswith(f"{path}:5:") and "branches.0.beta" in message


def test_mistyped_section_suggests_the_right_one(tmp_path):
    path = write(tmp_path, VALID.replace("schedule:", "schedul:"))
    message = error_of(path)
    assert message.startswith(f"{path}:7:") and "'schedul'" in message and "did you mean 'schedule'" in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    message = error_of(write(tmp_path, VALID + "optim: {zzz: 1}\n"))
    assert "optim.zzz" in message and "valid keys" in message and "max_nan_in_row" in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    path = write(tmp_path, VALID.replace("cycles: 2", "cycles: many"))
    message = error_of(path)
    assert message.startswith(f"{path}:8:") and "schedule.cycles" in message and "'many'" in message


def test_out_of_range_value_names_the_key(tmp_path):
    message = error_of(write(tmp_path, VALID), ["rl.rollouts_per_prompt=1"])
    assert "rl.rollouts_per_prompt" in message and "greater than 1" in message


def test_experts_from_belongs_to_the_distilling_plans(tmp_path):
    message = error_of(write(tmp_path, VALID), ["schedule.experts_from=runs/experts"])
    assert "schedule.experts_from" in message and "static_opd and mopd" in message and "'copd'" in message


def test_branch_with_unknown_capability(tmp_path):
    path = write(tmp_path, VALID.replace("capabilities: [reversal]", "capabilities: [reversl]"))
    message = error_of(path)
    assert str(path) in message and "'rev'" in message and "unknown capability 'reversl'" in message
    assert "addition" in message and "reversal" in message  # the defined ones


def test_capability_needs_exactly_one_source(tmp_path):
    path = write(tmp_path, VALID.replace("{name: addition, builtin: addition}", "{name: addition}"))
    assert "exactly one of `builtin`, `path` or `dataset`" in error_of(path)


def test_duplicate_branch_names(tmp_path):
    assert "unique" in error_of(write(tmp_path, VALID), ["branches.1.name=add"])


@pytest.mark.parametrize("hub", [None, "nope"])
def test_hub_topology_needs_a_valid_hub(tmp_path, hub):
    topology = "topology: {kind: hub}\n" if hub is None else f"topology: {{kind: hub, hub: {hub}}}\n"
    message = error_of(write(tmp_path, VALID + topology))
    assert "topology.hub" in message and "add" in message and repr(hub) in message
    assert load_config(write(tmp_path, VALID + "topology: {kind: hub, hub: rev}\n")).topology.hub == "rev"


def test_unknown_topology_kind(tmp_path):
    message = error_of(write(tmp_path, VALID + "topology: {kind: ring}\n"))
    assert "topology.kind" in message and "'ring'" in message


def test_missing_required_section(tmp_path):
    message = error_of(write(tmp_path, "capabilities:\n  - {name: a, builtin: addition}\n"))
    assert "missing required key 'branches'" in message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, VALID.replace("  rl_steps: 3", "  rl_steps: [3"))
    message = error_of(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: invalid YAML", message)
    assert int(message[len(str(path)) + 1 :].split(":")[0]) in (9, 10, 11)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    assert "mapping" in error_of(write(tmp_path, text))


def test_missing_file(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")


def test_validate_config_names_its_source():
    with pytest.raises(CopdError, match=r"^<config>: unknown key 'foo'"):
        validate_config({"foo": 1, "capabilities": [{"name": "a", "builtin": "addition"}],
                         "branches": [{"name": "b", "capabilities": ["a"]}]})


def test_dumped_config_loads_back_identically(tmp_path):
    config = load_config(write(tmp_path, VALID), ["schedule.cycles=4"])
    dump_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


def test_demo_configs_are_identical_and_valid():
    example, embedded = ROOT / "examples" / "demo.yaml", ROOT / "src" / "copd" / "configs" / "demo.yaml"
    assert filecmp.cmp(example, embedded, shallow=False)
    assert demo_config_path().resolve() == embedded.resolve()
    for path in (example, embedded):
        config = load_config(path)
        assert len(config.branches) == 2 and config.topology.kind == "pair"


def test_embedded_demo_config_is_shipped_in_the_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["copd"]
    assert any(fnmatch.fnmatch("configs/demo.yaml", pattern) for pattern in package_data)


def test_names_come_from_their_registries():
    from typing import get_args

    from copd.cli.reference import config_reference
    from copd.config.schema import MergeConfig, OPDConfig, RLConfig, ScheduleConfig, TopologyConfig
    from copd.core.advantages import GROUP_ADVANTAGES
    from copd.core.losses import LOSS_AGGREGATIONS
    from copd.core.merge import MERGE_METHODS
    from copd.core.opd import OPD_ESTIMATORS
    from copd.schedule.plan import PLANS
    from copd.schedule.topology import TOPOLOGIES

    fields = {"rl.advantage": (RLConfig, "advantage", GROUP_ADVANTAGES), "rl.loss_aggregation": (RLConfig, "loss_aggregation", LOSS_AGGREGATIONS),
              "opd.estimator": (OPDConfig, "estimator", OPD_ESTIMATORS), "merge.method": (MergeConfig, "method", MERGE_METHODS),
              "schedule.plan": (ScheduleConfig, "plan", PLANS), "topology.kind": (TopologyConfig, "kind", TOPOLOGIES)}
    reference = config_reference()
    for key, (model, name, registry) in fields.items():
        assert get_args(model.model_fields[name].annotation) == tuple(registry)
        assert f"| `{key}` | {' / '.join(registry)} |" in reference  # the config reference lists the valid values


@pytest.mark.parametrize("override, fragment", [
    ("opd.estimator=exactkl", "unknown OPD estimator 'exactkl' (did you mean 'exact_kl'?); valid: sampled, baseline, exact_kl"),
    ("rl.advantage=reinforce", "unknown advantage 'reinforce'; valid: grpo, dr_grpo"),
    ("rl.loss_aggregation=seq_man", "(did you mean 'seq_mean'?)"),
    ("merge.method=Mean", "(did you mean 'mean'?)"),
    ("schedule.plan=expert", "(did you mean 'experts'?)"),
    ("topology.kind=meh", "(did you mean 'mesh'?); valid: pair, oneway, hub, mesh"),
    ("opd.estimator=3", "unknown OPD estimator 3;"),
])
def test_unknown_names_suggest_the_nearest(tmp_path, override, fragment):
    message = error_of(write(tmp_path, VALID), [override])
    assert message.startswith(f"command line: {override}: ") and fragment in message  # the override names the key
    assert "(got " not in message  # the value is named once


def test_overlap_k_at_most_topk(tmp_path):
    message = error_of(write(tmp_path, VALID + "opd: {topk: 4, overlap_k: 8}\n"))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'}:12:") and "opd.overlap_k" in message and "at most opd.topk (4), got 8" in message
    assert load_config(write(tmp_path, VALID + "opd: {topk: null, overlap_k: 64}\n")).opd.overlap_k == 64  # whole vocabulary


def test_cross_reference_errors_name_the_key_and_line(tmp_path):
    path = write(tmp_path, VALID.replace("capabilities: [reversal]", "capabilities: [reversl]"))
    message = error_of(path)
    assert message.startswith(f"{path}:6: branches.1.capabilities: ") and "(did you mean 'reversal'?)" in message
    message = error_of(write(tmp_path, VALID), ["branches.1.name=add"])
    assert message.startswith("command line: branches.1.name=add: branch names must be unique")
    message = error_of(write(tmp_path, VALID + "merge: {branches: [add, rve]}\n"))
    assert message.startswith(f"{tmp_path / 'cfg.yaml'}:12: merge.branches: ") and "'rve'" in message


def test_duplicate_capability_names(tmp_path):
    path = write(tmp_path, VALID.replace("{name: reversal, builtin: reversal}", "{name: addition, builtin: reversal}"))
    assert "capabilities.1.name: capability names must be unique, 'addition' is defined twice" in error_of(path)


def test_weighted_merge_needs_weights(tmp_path):
    message = error_of(write(tmp_path, VALID + "merge: {method: weighted}\n"), ["branches.0.weight=0", "branches.1.weight=0"])
    assert "merge.method" in message and "sum to 0" in message
    assert load_config(write(tmp_path, VALID + "merge: {method: weighted}\n"), ["branches.0.weight=0"]).merge.method == "weighted"


@pytest.mark.parametrize("capability, key, fragment", [
    ("{name: addition, builtin: addition, verifier: numeric}", "capabilities.0.verifier",
     "capability 'addition': `verifier` applies to data files; the built-in 'addition' has its own verifier"),
    ("{name: addition, builtin: addition, prompt_field: q}", "capabilities.0.prompt_field", "`prompt_field` applies to data files"),
    ("{name: addition, builtin: addition, test_split: test}", "capabilities.0.test_split", "`test_split` applies to data files"),
    ("{name: addition, path: a.jsonl, options: {digits: 2}}", "capabilities.0.options", "`options` applies to built-in capabilities"),
    ("{name: addition, path: a.jsonl, split: test}", "capabilities.0.split", "`split` needs `dataset`"),
    ("{name: addition, path: a.jsonl, test_path: b.jsonl, test_ratio: 0.3}", "capabilities.0.test_ratio", "give `test_path` or `test_ratio`, not both"),
    ("{name: addition, path: a.jsonl, fields: [answer]}", "capabilities.0.fields", "'answer' is reserved"),
    ("{name: addition, path: ''}", "capabilities.0.path", "must not be empty"),
])
def test_capability_keys_are_checked_at_load(tmp_path, capability, key, fragment):
    path = write(tmp_path, VALID.replace("{name: addition, builtin: addition}", capability))
    message = error_of(path)
    assert message.startswith(f"{path}:2: {key}: ") and fragment in message


def test_saved_capabilities_load_back(tmp_path):
    # A saved config.yaml lists every key at its default: a built-in keeps validating.
    text = VALID.replace("{name: reversal, builtin: reversal}", "{name: reversal, path: r.jsonl, test_path: t.jsonl}")
    config = load_config(write(tmp_path, text))
    dump_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config
