"""A newcomer adding their own capability from the command line: what runs, and the one-line errors on the way.

One branch needs the `experts` plan, a `module:function` verifier is found beside the config,
a bad override is blamed on the command line, text a built tiny model cannot encode is named
with its file and line, and `copd merge` says what folder it wants.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from copd.capabilities import BUILTIN_CAPABILITIES, Capability, Sample
from copd.capabilities.prompt_sources import ProceduralSource
from copd.capabilities.verifiers import exact
from copd.cli.main import main
from tests.cli.test_main import GOOD_LINES, fails, jsonl_config, write_config

SRC = Path(__file__).resolve().parents[2] / "src"
ONE_BRANCH = {"capabilities": [{"name": "addition", "builtin": "addition"}], "branches": [{"name": "add", "capabilities": ["addition"]}]}
# A short real run of a built tiny model: no warm start, two steps, a few test prompts.
TINY_RUN = {"model": {"path": None, "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}},
            "schedule": {"plan": "experts", "cycles": 1, "rl_steps": 1, "opd_steps": 1},
            "rl": {"prompts_per_step": 2, "rollouts_per_prompt": 2}, "sampling": {"max_new_tokens": 4},
            "eval": {"samples": 4, "batch_size": 4}}


def copd(args, cwd) -> subprocess.CompletedProcess:
    """`python -m copd.cli ARGS` in `cwd`, with copd importable but nothing else added to its path."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "copd.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("copd: error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    return done.stderr


# --- one branch: no distillation, so the plan must say so ---------------------------------------

def test_one_branch_with_the_default_plan_fails_at_load_naming_the_fix(tmp_path, capsys):
    path = write_config(tmp_path, model={"path": None, "cache_dir": str(tmp_path / "cache")}, **ONE_BRANCH)
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert err.startswith(f"copd: error: {path}:") and (": schedule.plan: the plan 'copd' distils between branches and needs "
                                                         "at least 2, got 1 (add); add a branch, or set schedule.plan: experts "
                                                         "to train one branch with GRPO alone") in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_the_copd_plan_given_on_the_command_line_to_one_branch_is_blamed_there(tmp_path, capsys):
    path = write_config(tmp_path, schedule={"plan": "experts"}, **ONE_BRANCH)
    err = fails(capsys, ["train", str(path), "schedule.plan=copd", "--quiet"])
    assert err.startswith("copd: error: command line: schedule.plan=copd: the plan 'copd' distils between branches")


@pytest.mark.parametrize("plan", ["static_opd", "mopd"])
def test_distilling_baselines_without_a_student_fail_at_load(tmp_path, capsys, plan):
    path = write_config(tmp_path, model={"path": None, "cache_dir": str(tmp_path / "cache")}, schedule={"plan": plan})
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert f"schedule.plan: the plan {plan!r} distils students from trained experts and needs a branch with `distill_from`" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_one_branch_with_plan_experts_trains_and_its_report_says_what_ran(tmp_path, capsys):
    path = write_config(tmp_path, **{**TINY_RUN, "model": {**TINY_RUN["model"], "cache_dir": str(tmp_path / "cache")}},
                        warmup={"enabled": False}, **ONE_BRANCH)
    assert main(["train", str(path), "--quiet"]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Plan `experts`: each branch trains with GRPO alone, no distillation; K=1 branch (add), 1 cycles × 2 RL steps" in report
    assert "_None: plan `experts` trains each branch with GRPO alone, so no branch distils from another._" in report
    assert "topology" not in report.split("## Results")[0]  # nothing about edges that were never there
    kinds = [json.loads(line)["type"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "edge" not in kinds and kinds.count("branch") == 2


# --- a module:function verifier beside the config ------------------------------------------------

def own_verifier_config(tmp_path, module="rewards_beside_cfg"):
    """cfg/ with the config, its data and a package `module` whose `score` leaves a mark when it scores."""
    folder = tmp_path / "cfg"
    (folder / module).mkdir(parents=True)
    (folder / module / "__init__.py").write_text("")
    (folder / module / "rewards.py").write_text(
        "from pathlib import Path\n\n"
        "def score(completion, answer):\n"
        "    (Path(__file__).parent / 'scored').touch()\n"
        "    return float(completion.strip() == answer)\n")
    (folder / "data.jsonl").write_text("".join(line + "\n" for line in GOOD_LINES))
    caps = [{"name": "qa", "path": "data.jsonl", "verifier": f"{module}.rewards:score", "test_ratio": 0.2}]
    return write_config(folder, out=tmp_path / "run", name="cfg.yaml", warmup={"enabled": False}, capabilities=caps,
                        branches=[{"name": "qa", "capabilities": ["qa"]}],
                        **{**TINY_RUN, "model": {**TINY_RUN["model"], "cache_dir": str(tmp_path / "cache")}})


def test_a_verifier_package_beside_the_config_is_found_from_another_folder(tmp_path):
    path = own_verifier_config(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    done = copd(["train", str(path), "--quiet"], cwd=tmp_path / "elsewhere")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cfg" / "rewards_beside_cfg" / "scored").is_file()  # the user's function scored the rollouts
    assert (tmp_path / "run" / "eval.json").is_file()
    # The run records the config's folder, so its relative data path and verifier resolve from anywhere later on.
    (tmp_path / "cfg" / "rewards_beside_cfg" / "scored").unlink()
    done = copd(["eval", str(tmp_path / "run" / "final"), "--tasks", "qa", "--samples", "2", "--quiet"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cfg" / "rewards_beside_cfg" / "scored").is_file() and "qa" in done.stdout


def test_a_missing_verifier_module_names_where_copd_looked(tmp_path):
    path = own_verifier_config(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    err = one_line_error(copd(["train", str(path), "capabilities.0.verifier=no_such_verifier_pkg.rewards:score", "--quiet"], cwd=tmp_path / "elsewhere"))
    assert (f"capability 'qa': key 'verifier': verifier 'no_such_verifier_pkg.rewards:score': cannot import module "
            f"'no_such_verifier_pkg.rewards': no module 'no_such_verifier_pkg' in the config's folder "
            f"{tmp_path / 'cfg'}, the working directory {tmp_path / 'elsewhere'} or on sys.path") in err, err
    assert not (tmp_path / "run").exists()


def test_a_verifier_module_in_the_working_directory_is_found_too(tmp_path, monkeypatch):
    from copd.capabilities import load_capability

    (tmp_path / "cwd_rewards_module.py").write_text("def score(completion, answer):\n    return 0.5\n")
    (tmp_path / "data.jsonl").write_text("".join(line + "\n" for line in GOOD_LINES))
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    cap = load_capability({"name": "qa", "path": "data.jsonl", "verifier": "cwd_rewards_module:score"})
    assert cap.score("1", cap.test_set(1)[0]) == 0.5 and sys.path == before  # found, and sys.path left as it was


# --- overrides are blamed on the command line --------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("schedule.cycels=4", "unknown key 'schedule.cycels'; did you mean 'schedule.cycles'?"),
    ("schedule.cycles=-1", "Input should be greater than 0"),
    ("branches.1.beta=-0.5", "Input should be greater than or equal to 0"),
    ("schedule.cycles=[1", "the value is not valid YAML"),
])
def test_a_bad_override_is_blamed_on_the_command_line_not_the_yaml_line(tmp_path, capsys, override, message):
    path = write_config(tmp_path)
    err = fails(capsys, ["train", str(path), override, "--quiet"])
    assert err.startswith(f"copd: error: command line: {override}: {message}"), err
    assert str(path) not in err and not (tmp_path / "run").exists()


def test_a_mistake_in_the_file_is_still_blamed_on_its_line_beside_overrides(tmp_path, capsys):
    path = write_config(tmp_path, schedule={"cycles": 0})
    err = fails(capsys, ["train", str(path), "schedule.rl_steps=2", "--quiet"])
    line = int(err.removeprefix(f"copd: error: {path}:").split(":")[0])
    assert "cycles: 0" in path.read_text().splitlines()[line - 1] and "schedule.cycles: Input should be greater than 0" in err


# --- text a built tiny model cannot encode --------------------------------------------------------

def test_a_character_outside_the_tiny_alphabet_names_the_file_and_line(tmp_path, capsys):
    lines = [*GOOD_LINES[:2], json.dumps({"prompt": "café=", "answer": "1"}), *GOOD_LINES[2:]]
    path, data = jsonl_config(tmp_path, lines)
    err = fails(capsys, ["train", str(path), f"model.cache_dir={tmp_path / 'cache'}", "--quiet"])
    assert (f"capability 'qa': key 'path': {data}:3: field \"prompt\": character 'é' (U+00E9) is not in the tiny model's "
            "alphabet (printable ASCII; its tokenizer would read it as <unk>)") in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_answers_of_a_test_file_are_checked_too(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text(json.dumps({"prompt": "q=", "answer": "a\tb"}) + "\n")
    path, _ = jsonl_config(tmp_path, GOOD_LINES, test_path=str(tmp_path / "test.jsonl"))
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert f"key 'test_path': {tmp_path / 'test.jsonl'}:1: field \"answer\": character '\\t' (U+0009)" in err, err


def test_a_built_in_generating_such_a_character_names_the_capability_and_options(tmp_path, capsys, monkeypatch):
    def accents(letters="abc", test_size=8):
        generate = lambda rng: Sample(f"{rng.choice(letters)}{rng.randint(0, 999)}=", "x")  # noqa: E731
        return Capability("accents", exact, ProceduralSource("accents", generate, test_size))

    monkeypatch.setitem(BUILTIN_CAPABILITIES, "accents", accents)
    caps = [{"name": "addition", "builtin": "addition"}, {"name": "acc", "builtin": "accents", "options": {"letters": "aé"}}]
    path = write_config(tmp_path, capabilities=caps, branches=[{"name": "add", "capabilities": ["addition"]},
                                                               {"name": "acc", "capabilities": ["acc"]}])
    err = fails(capsys, ["train", str(path), "--quiet"])
    assert "capability 'acc': key 'options': the built-in 'accents' with options {'letters': 'aé'} generates the prompt 'é" in err
    assert "character 'é' (U+00E9) is not in the tiny model's alphabet" in err, err


def test_pretrained_and_vision_language_tokenizers_read_any_text():
    from copd.config.loader import validate_config
    from copd.driver.warmstart import model_text_check

    raw = {**ONE_BRANCH, "schedule": {"plan": "experts"}}
    assert model_text_check(validate_config(raw)) is not None  # the built tiny text model
    assert model_text_check(validate_config({**raw, "model": {"path": "/some/model"}})) is None
    assert model_text_check(validate_config({**raw, "model": {"tiny": {"architecture": "qwen3_vl"}}})) is None


# --- copd merge given a model folder ----------------------------------------------------------------

def test_merge_on_a_model_folder_says_it_wants_a_run(tmp_path, capsys):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    err = fails(capsys, ["merge", str(tmp_path / "final")])
    assert err == (f"copd: error: merge: {tmp_path / 'final'} is not a run directory (it holds a model: config.json); expected "
                   f"{tmp_path / 'final' / 'config.yaml'} and {tmp_path / 'final' / 'branches'}/: give the folder copd train wrote\n")
