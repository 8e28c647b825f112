"""The command line in-process: user mistakes give exit code 2 and one line, nothing is written."""

import importlib.util
import json
import sys

import pytest
import yaml

from copd.cli.main import main
from copd.config.loader import validate_config
from copd.driver.pipeline import prepare_run_dir

BASE = {
    "model": {"path": None},
    "warmup": {"enabled": False},
    "capabilities": [{"name": "addition", "builtin": "addition"}, {"name": "reversal", "builtin": "reversal"}],
    "branches": [{"name": "add", "capabilities": ["addition"]}, {"name": "rev", "capabilities": ["reversal"]}],
    "schedule": {"cycles": 1, "rl_steps": 1, "opd_steps": 1},
}


def write_config(tmp_path, out=None, name="cfg.yaml", **changes):
    raw = json.loads(json.dumps(BASE))
    raw["run"] = {"out": str(out or tmp_path / "run")}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def fails(capsys, argv) -> str:
    """Run the CLI, expect a user error: exit code 2, one line on stderr, no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("copd: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    return err


def jsonl_config(tmp_path, lines, **options):
    data = tmp_path / "data.jsonl"
    if lines is not None:
        data.write_text("".join(line + "\n" for line in lines))
    caps = [{"name": "addition", "builtin": "addition"}, {"name": "qa", "path": str(data), **options}]
    branches = [{"name": "add", "capabilities": ["addition"]}, {"name": "qa", "capabilities": ["qa"]}]
    return write_config(tmp_path, capabilities=caps, branches=branches), data


GOOD_LINES = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(20)]


def test_missing_config_file(tmp_path, capsys):
    err = fails(capsys, ["train", str(tmp_path / "nope.yaml"), "--quiet"])
    assert "config file not found" in err and "nope.yaml" in err


def test_unknown_key_in_config(tmp_path, capsys):
    path = write_config(tmp_path, schedule={"cycels": 3})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert str(path) in err and "schedule.cycels" in err and "schedule.cycles" in err
    assert not (tmp_path / "run").exists()


def test_bad_override_on_the_command_line(tmp_path, capsys):
    err = fails(capsys, ["train", str(write_config(tmp_path)), "schedule.cycles=many", "--quiet"])
    assert err.startswith("copd: error: command line: schedule.cycles=many: ") and "valid integer" in err


def test_missing_jsonl_file(tmp_path, capsys):
    path, data = jsonl_config(tmp_path, None)
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert f"{data}: file not found" in err
    assert not (tmp_path / "run").exists()


def test_empty_jsonl_file(tmp_path, capsys):
    path, data = jsonl_config(tmp_path, [])
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert str(data) in err and "empty" in err


def test_jsonl_line_without_answer_names_file_and_line(tmp_path, capsys):
    path, data = jsonl_config(tmp_path, [*GOOD_LINES[:3], json.dumps({"prompt": "q"}), *GOOD_LINES[3:]])
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert f"{data}:4:" in err and 'missing field "answer"' in err
    assert not (tmp_path / "run").exists()


def test_relative_jsonl_path_resolves_next_to_the_config(tmp_path, capsys):
    (tmp_path / "cfgdir").mkdir()
    caps = [{"name": "addition", "builtin": "addition"}, {"name": "qa", "path": "data.jsonl"}]
    branches = [{"name": "add", "capabilities": ["addition"]}, {"name": "qa", "capabilities": ["qa"]}]
    path = write_config(tmp_path, name="cfgdir/cfg.yaml", capabilities=caps, branches=branches)
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert str(tmp_path / "cfgdir" / "data.jsonl") in err


def test_unknown_verifier(tmp_path, capsys):
    path, _ = jsonl_config(tmp_path, GOOD_LINES, verifier="numerc")
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert "'qa'" in err and "unknown verifier 'numerc'" in err and "numeric" in err


def test_model_path_that_does_not_exist_writes_nothing(tmp_path, capsys):
    path = write_config(tmp_path, model={"path": str(tmp_path / "nonexistent")})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert "model path does not exist" in err and "nonexistent" in err
    assert not (tmp_path / "run").exists()


def test_model_path_without_config_json_writes_nothing(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    path = write_config(tmp_path, model={"path": str(tmp_path / "model")})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert "config.json" in err and not (tmp_path / "run").exists()


def test_run_dir_holding_another_run_is_left_alone(tmp_path, capsys):
    run = tmp_path / "run"
    prepare_run_dir(validate_config({**BASE, "run": {"out": str(run)}}), run, resume=False)
    before = (run / "config.yaml").read_text()
    other = write_config(tmp_path, schedule={"cycles": 7, "rl_steps": 1, "opd_steps": 1})
    err = fails(capsys, ["train", str(other), "--quiet"])
    assert "already holds a run" in err and "--resume" in err
    err = fails(capsys, ["train", str(other), "--resume", str(run), "--quiet"])
    assert "different config" in err and "'schedule'" in err
    assert (run / "config.yaml").read_text() == before
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_non_empty_run_dir_without_a_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    err = fails(capsys, ["train", str(write_config(tmp_path)), "--quiet"])
    assert "not empty" in err and (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    err = fails(capsys, ["train", str(write_config(tmp_path)), "--resume", str(tmp_path / "empty"), "--quiet"])
    assert "no config.yaml" in err and not (tmp_path / "empty").exists()


def test_report_on_a_missing_dir(tmp_path, capsys):
    err = fails(capsys, ["report", str(tmp_path / "nope")])
    assert "run directory not found" in err and not (tmp_path / "nope").exists()


def test_merge_on_a_run_without_branches(tmp_path, capsys):
    run = tmp_path / "run"
    prepare_run_dir(validate_config({**BASE, "run": {"out": str(run)}}), run, resume=False)
    err = fails(capsys, ["merge", str(run)])
    assert "cannot merge" in err and "branches" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_merge_on_a_folder_without_a_run(tmp_path, capsys):
    err = fails(capsys, ["merge", str(tmp_path)])
    assert f"merge: {tmp_path} is not a run directory; expected {tmp_path / 'config.yaml'} and {tmp_path / 'branches'}/" in err


@pytest.mark.parametrize("argv, needles", [
    ([], ["demo", "train", "eval", "merge", "report", "--version", "schedule.cycles=4"]),
    (["demo"], ["--out", "--quiet", "--threads", "KEY=VALUE"]),
    (["train"], ["config", "--resume", "--quiet", "--threads", "KEY=VALUE"]),
    (["eval"], ["RUN_OR_MODEL", "--tasks", "--samples", "--verifier", "--seed", "--out"]),
    (["merge"], ["RUN", "--method", "ties", "--out"]),
    (["report"], ["RUN", "--threads"]),
])
def test_help(capsys, argv, needles):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: copd")
    for needle in needles:
        assert needle in out, needle


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


# Config mistakes found when the config loads: one line with the file, the line, the key, the nearest
# valid name and the valid list; no run folder and no base model are written.
CONFIG_MISTAKES = [
    ({"opd": {"estimator": "sampeld"}}, "opd.estimator", "unknown OPD estimator 'sampeld' (did you mean 'sampled'?); valid: sampled, baseline, exact_kl"),
    ({"rl": {"advantage": "dr-grpo"}}, "rl.advantage", "unknown advantage 'dr-grpo' (did you mean 'dr_grpo'?); valid: grpo, dr_grpo"),
    ({"rl": {"loss_aggregation": "token-mean"}}, "rl.loss_aggregation", "(did you mean 'token_mean'?); valid: token_mean, seq_mean, seq_sum_norm"),
    ({"merge": {"method": "tie"}}, "merge.method", "unknown merge method 'tie' (did you mean 'ties'?); valid: mean, weighted, task_arithmetic, ties"),
    ({"schedule": {"cycles": 1, "rl_steps": 1, "opd_steps": 1, "plan": "mopdd"}}, "schedule.plan", "(did you mean 'mopd'?); valid: copd, experts, static_opd, mopd"),
    ({"capabilities": [{"name": "addition", "builtin": "addition", "verifier": "numeric"}, {"name": "reversal", "builtin": "reversal"}]},
     "capabilities.0.verifier", "capability 'addition': `verifier` applies to data files; the built-in 'addition' has its own verifier"),
]


@pytest.mark.parametrize("changes, key, message", CONFIG_MISTAKES, ids=[m[1] for m in CONFIG_MISTAKES])
def test_config_mistakes_fail_at_load_and_write_nothing(tmp_path, capsys, changes, key, message):
    path = write_config(tmp_path, model={"path": None, "cache_dir": str(tmp_path / "cache")}, **changes)
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert err.startswith(f"copd: error: {path}:") and f": {key}: " in err and message in err, err
    line = int(err.removeprefix(f"copd: error: {path}:").split(":")[0])
    assert key.split(".")[-1] in path.read_text().splitlines()[line - 1]  # the line of the mistaken key
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_mistaken_override_fails_the_same_way(tmp_path, capsys):
    err = fails(capsys, ["train", str(write_config(tmp_path)), "opd.estimator=exact-kl", "--quiet"])
    assert "command line: opd.estimator=exact-kl: unknown OPD estimator 'exact-kl' (did you mean 'exact_kl'?)" in err
    assert not (tmp_path / "run").exists()


def test_unbuildable_plan_fails_before_the_run_folder(tmp_path, capsys):
    # Valid names, but the static OPD plan needs a branch with `distill_from`.
    path = write_config(tmp_path, model={"path": None, "cache_dir": str(tmp_path / "cache")},
                        schedule={"cycles": 1, "rl_steps": 1, "opd_steps": 1, "plan": "static_opd"})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert "distill_from" in err and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_resume_with_only_damaged_checkpoints_names_the_file(tmp_path, capsys):
    path = write_config(tmp_path, model={"path": None, "cache_dir": str(tmp_path / "cache")})
    run = tmp_path / "run"
    from copd.config.loader import load_config

    prepare_run_dir(load_config(path), run, resume=False)
    state = run / "checkpoints" / "cycle_0001" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"cycle": 1, "metrics_li')  # cut short
    err = fails(capsys, ["train", str(path), "--resume", str(run), "--quiet"])
    assert f"no intact checkpoint to resume from: {state}: not readable JSON" in err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # nothing else written


def test_eval_tasks_resolve_run_capabilities_builtins_and_data_files(tmp_path):
    from copd.config.loader import load_config
    from copd.evaluation.commands import resolve_tasks

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(line + "\n" for line in GOOD_LINES))
    run_config = load_config(write_config(tmp_path, capabilities=[
        {"name": "addition", "builtin": "addition", "options": {"digits": 1}}, {"name": "reversal", "builtin": "reversal"}]))
    own, builtin, file = resolve_tasks(f"addition,count,{data}", {"verifier": "numeric"}, run_config)
    assert all(len(s.prompt) <= 4 for s in own.test_set())  # the run's own options
    assert builtin.name == "count" and file.name == "qa" and len(file.test_set()) == 20  # the whole file is the test split
    assert file.score("it is 3", file.test_set()[3]) == 1.0  # with --verifier numeric


def test_a_token_budget_smaller_than_one_row_stops_before_the_run_folder(tmp_path, capsys):
    # 9 tokens pass the config check (8 new tokens + 1) but no addition prompt is 1 token long.
    path = write_config(tmp_path, model={"path": None, "micro_batch_tokens": 9}, sampling={"max_new_tokens": 8})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert "model.micro_batch_tokens = 9 cannot hold one row" in err and "'addition'" in err
    assert not (tmp_path / "run").exists()


def test_a_budget_below_max_new_tokens_and_mini_batches_that_do_not_divide_are_config_errors(tmp_path, capsys):
    path = write_config(tmp_path, model={"path": None, "micro_batch_tokens": 8}, sampling={"max_new_tokens": 8})
    assert "model.micro_batch_tokens" in fails(capsys, ["train", str(path), "--quiet"])
    path = write_config(tmp_path, optim={"mini_batches": 3}, rl={"prompts_per_step": 16})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert "optim.mini_batches" in err and "rl.prompts_per_step = 16" in err
    assert not (tmp_path / "run").exists()


def test_a_vllm_engine_without_vllm_stops_before_the_run_folder(tmp_path, capsys):
    path = write_config(tmp_path, sampling={"engine": "vllm", "vllm": {"python": sys.executable}})
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM")
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert f"{sys.executable} has no vllm module" in err and "make vllm" in err
    path = write_config(tmp_path, sampling={"engine": "vllm", "vllm": {"python": str(tmp_path / "nowhere")}})
    assert "sampling.vllm.python" in fails(capsys, ["train", str(path), "--quiet"])
    assert not (tmp_path / "run").exists()


def test_a_vllm_engine_on_a_vision_language_model_stops_before_the_run_folder(tmp_path, capsys, monkeypatch):
    from copd.backends.engine import setup

    monkeypatch.setattr(setup, "check_engine_python", lambda python: None)  # as if vLLM were there
    err = fails(capsys, ["demo", "--multimodal", "--quiet", "--out", str(tmp_path / "run"), "sampling.engine=vllm"])
    assert "vllm samples text models only" in err
    assert not (tmp_path / "run").exists()


def test_branches_of_several_ranks_that_cannot_run_stop_before_the_run_folder(tmp_path, capsys):
    config = str(write_config(tmp_path))
    err = fails(capsys, ["train", config, "resources.ranks_per_branch=2", "--quiet"])
    assert "resources.ranks_per_branch" in err and "run.backend: ray" in err
    # A mesh that does not divide the prompt groups.
    err = fails(capsys, ["train", config, "run.backend=ray", "resources.ranks_per_branch=3", "rl.prompts_per_step=4", "--quiet"])
    assert "resources.ranks_per_branch" in err and "do not divide into 1 mini-batch(es) x 3 ranks" in err
    err = fails(capsys, ["train", config, "run.backend=ray", "resources.ranks_per_branch=2", "optim.mini_batches=4",
                         "rl.prompts_per_step=4", "opd.prompts_per_step=4", "--quiet"])
    assert "4 mini-batch(es) x 2 ranks" in err
    err = fails(capsys, ["train", config, "run.backend=ray", "resources.ranks_per_branch=2", "resources.gpus_per_branch=4", "--quiet"])
    assert "2 ranks on 4 GPUs" in err
    assert not (tmp_path / "run").exists()


def test_ranks_that_ray_cannot_place_stop_before_the_run_folder(tmp_path, capsys):
    pytest.importorskip("ray")
    import ray

    config = str(write_config(tmp_path))
    try:
        code = main(["train", config, "run.backend=ray", "resources.ranks_per_branch=2", "resources.cpus_per_branch=64", "--quiet"])
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    # Ray may log a warning of its own first (its first start in a process, with a saved
    # ~/.ray/auth_token, says token authentication is on); copd's error is one line, the last.
    assert code == 2 and "Traceback" not in err + out
    err = err.splitlines()[-1]
    assert err.startswith("copd: error: ")
    assert "need 128 CPUs" in err and "resources.ranks_per_branch" in err
    assert not (tmp_path / "run").exists()
