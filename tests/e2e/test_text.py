"""One tiny real transformers model end to end: train, checkpoint, resume, merge, evaluate, report."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from copd.config.loader import validate_config
from copd.driver.pipeline import run_training
from copd.driver.trainer import Trainer
from copd.errors import CopdError
from copd.reporting.run_report import write_report

TINY = {
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_positions": 48}},
    "warmup": {"enabled": True, "max_steps": 40, "batch_size": 32, "lr": 0.003, "check_every": 20, "check_samples": 8},
    "capabilities": [
        {"name": "reversal", "builtin": "reversal", "options": {"test_size": 16}},
        {"name": "count", "builtin": "count", "options": {"test_size": 16}},
    ],
    "branches": [{"name": "rev", "capabilities": ["reversal"]}, {"name": "cnt", "capabilities": ["count"]}],
    "schedule": {"cycles": 2, "rl_steps": 2, "opd_steps": 1},
    "rl": {"prompts_per_step": 4, "rollouts_per_prompt": 4},
    "opd": {"prompts_per_step": 4, "rollouts_per_prompt": 2},
    "sampling": {"max_new_tokens": 6},
    "optim": {"lr": 0.001},
    "eval": {"samples": 16},
}


def tiny_config(tmp_path, name: str, **sections):
    raw = json.loads(json.dumps(TINY))
    raw["model"]["cache_dir"] = str(tmp_path / "cache")
    raw["run"] = {"out": str(tmp_path / name), "seed": 3}
    raw.update(sections)
    return validate_config(raw)


def records(run_dir):
    """metrics.jsonl without wall-clock fields, for comparing runs."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]


def test_run_directory_and_standard_checkpoints(tmp_path):
    run_dir = run_training(tiny_config(tmp_path, "run"))
    for name in ["config.yaml", "metrics.jsonl", "eval.json", "timing.json", "final/config.json", "final/generation_config.json",
                 "final/model.safetensors", "final/tokenizer.json", "branches/rev/config.json", "branches/rev/model.safetensors"]:
        assert (run_dir / name).exists(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["cycle_0001", "cycle_0002"]
    evals = json.loads((run_dir / "eval.json").read_text())["models"]
    assert set(evals) == {"base", "branch:rev", "branch:cnt", "merged"}
    assert all(0.0 <= v <= 1.0 for m in evals.values() for v in m["greedy"].values())
    kinds = [r["type"] for r in records(run_dir)]
    assert kinds.count("branch") == 2 * 6 and kinds.count("edge") == 2 * 2
    # The merged model is a standard transformers folder, and it is the mean of the branches.
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.decode(tokenizer("rev:abc=")["input_ids"]) == "rev:abc="
    branches = [AutoModelForCausalLM.from_pretrained(run_dir / "branches" / b).state_dict() for b in ("rev", "cnt")]
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, (branches[0][key] + branches[1][key]) / 2)
    report = write_report(run_dir).read_text()
    assert "| merged |" in report and "rev<-cnt" in report


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    straight = run_training(tiny_config(tmp_path, "straight"))
    crashed_config = tiny_config(tmp_path, "crashed")
    original_step = Trainer.step
    calls = {"n": 0}

    def crash_in_cycle_two(self, phase):
        calls["n"] += 1
        if calls["n"] == 5:  # cycle 1 has 3 steps; die in the middle of cycle 2
            raise KeyboardInterrupt
        return original_step(self, phase)

    monkeypatch.setattr(Trainer, "step", crash_in_cycle_two)
    with pytest.raises(KeyboardInterrupt):
        run_training(crashed_config)
    monkeypatch.setattr(Trainer, "step", original_step)
    resumed = run_training(crashed_config, resume=True)
    assert records(resumed) == records(straight)
    assert json.loads((resumed / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_distilling_from_a_finished_experts_run_matches_training_the_experts(tmp_path):
    """schedule.experts_from: MOPD that starts from an experts run gives MOPD's own numbers."""
    from copd.config.methods import METHODS

    base = tiny_config(tmp_path, "unused", eval={"samples": 16, "every": 2})

    def derived(method: str, name: str, **schedule):
        raw = METHODS[method].transform(base).to_yaml_dict()
        raw["run"]["out"] = str(tmp_path / name)
        raw["schedule"].update(schedule)
        return validate_config(raw)

    whole = run_training(derived("mopd", "whole"))
    experts = run_training(derived("experts", "experts"))
    adopted = run_training(derived("mopd", "adopted", experts_from=str(experts)))
    # 2 cycles x (2 + 1) expert steps are skipped; the distillation (steps 7, 8) and the student's
    # held-out scores from step 6 on are the same, bit for bit. The experts only teach from step 6
    # on: the run that trained them scored them at step 6, neither scores them again.
    distilled = [r for r in records(whole) if r["step"] > 6 or (r["type"] == "eval" and r["step"] == 6 and r["branch"] == "student")]
    assert distilled == records(adopted)
    assert {r["branch"] for r in records(whole) if r["type"] == "eval" and r["step"] == 6} == {"rev", "cnt", "student"}
    assert {r["branch"] for r in records(whole) if r["type"] == "eval" and r["step"] == 8} == {"student"}
    assert json.loads((adopted / "eval.json").read_text()) == json.loads((whole / "eval.json").read_text())
    with pytest.raises(CopdError, match=r"schedule.experts_from: .*nowhere/branches/rev/config.json is missing"):
        run_training(derived("mopd", "broken", experts_from=str(tmp_path / "nowhere")))
    assert not (tmp_path / "broken").exists()


def twice_rows(path):
    """A data capability no built-in shares a name with: 24 distinct prompts, `twice` the word is the answer."""
    words = [a + b + c for a in "abc" for b in "de" for c in "fghi"]
    path.write_text("".join(json.dumps({"prompt": f"tw:{w}=", "answer": w + w}) + "\n" for w in words))
    return path


def test_cli_eval_and_merge_on_a_finished_run(tmp_path, capsys):
    from copd.cli.main import main

    data = twice_rows(tmp_path / "twice.jsonl")
    caps = [*TINY["capabilities"], {"name": "twice", "path": str(data), "test_ratio": 0.25}]
    branches = [{"name": "rev", "capabilities": ["reversal", "twice"]}, {"name": "cnt", "capabilities": ["count"]}]
    run_dir = run_training(tiny_config(tmp_path, "run", capabilities=caps, branches=branches,
                                       eval={"samples": 16, "n": 2, "log_samples": True}))
    # eval.n and eval.log_samples: mean@2 and pass@k in eval.json, every prompt's completions under samples/, linked.
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert evaluated["settings"]["n"] == 2 and set(evaluated["models"]["merged"]["scores"]["reversal"]["all"]) == {
        "prompts", "greedy", "mean@2", "pass@1", "pass@2"}
    lines = (run_dir / "samples" / "branch-rev.jsonl").read_text().splitlines()
    assert len(lines) == 16 * 2 + 6 and all(len(json.loads(line)["sampled"]) == 2 for line in lines)  # reversal, count, twice
    assert "[samples/merged.jsonl](samples/merged.jsonl)" in (run_dir / "report.md").read_text()
    scores = tmp_path / "scores.json"
    assert main(["eval", str(run_dir), "--tasks", "reversal,count", "--samples", "8", "--out", str(scores)]) == 0
    assert json.loads(scores.read_text())["settings"]["n"] == 2  # the run's own settings are the defaults
    models = json.loads(scores.read_text())["models"]
    assert set(models) == {"base", "branch:cnt", "branch:rev", "merged"}
    # The run's own capability options are used, so scores match eval.json on the same prompts.
    assert models["merged"]["greedy"]["reversal"] == pytest.approx(
        _greedy_on_first(run_dir, "reversal", 8), abs=1e-9
    )
    assert main(["merge", str(run_dir), "--method", "ties"]) == 0
    ties = AutoModelForCausalLM.from_pretrained(run_dir / "merged-ties").state_dict()
    mean = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert any(not torch.equal(ties[k], mean[k]) for k in mean)
    assert main(["merge", str(run_dir), "--method", "ties"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    _merge_is_scored_on_the_held_out_split(run_dir, tmp_path, capsys)


def _merge_is_scored_on_the_held_out_split(run_dir, tmp_path, capsys):
    """`copd eval RUN/merged-ties --tasks twice`: the run's own capability, on its test split only, with the run's
    settings; and `copd eval RUN` scores the merge beside the run's own models."""
    from copd.cli.main import main
    from copd.config.loader import load_config
    from copd.driver.pipeline import load_capabilities

    out, logged = tmp_path / "ties.json", tmp_path / "ties.jsonl"
    assert main(["eval", str(run_dir / "merged-ties"), "--tasks", "twice", "--out", str(out), "--log-samples", str(logged)]) == 0
    assert f"run: {run_dir.resolve()} (task names are its capabilities reversal, count, twice" in capsys.readouterr().out
    found = json.loads(out.read_text())
    assert found["settings"]["n"] == 2  # eval.n of the run, not a model folder's n 1
    twice = load_capabilities(load_config(run_dir / "config.yaml"))["twice"]
    held_out = [s.prompt for s in twice.test_set()]
    assert found["models"]["merged-ties"]["scores"]["twice"]["all"]["prompts"] == len(held_out) == 6
    prompts = [json.loads(line)["prompt"] for line in logged.read_text().splitlines()]
    assert prompts == held_out
    assert not set(prompts) & {s.prompt for s in twice.source.train} and len(twice.source.train) == 18
    every = tmp_path / "every.json"
    assert main(["eval", str(run_dir), "--tasks", "twice", "--samples", "2", "--out", str(every)]) == 0
    assert list(json.loads(every.read_text())["models"]) == ["base", "branch:cnt", "branch:rev", "merged", "merged-ties"]


def _greedy_on_first(run_dir, capability: str, n: int) -> float:
    from copd.backends.local.hf import HFPolicy
    from copd.backends.roles import SamplingParams
    from copd.config.loader import load_config
    from copd.driver.pipeline import load_capabilities
    from copd.evaluation.evaluate import evaluate_policy
    from copd.models.sources import load_pretrained

    config = load_config(run_dir / "config.yaml")
    cap = load_capabilities(config)[capability]
    model, tokenizer = load_pretrained(run_dir / "final")
    params = SamplingParams(max_new_tokens=config.sampling.max_new_tokens)
    return evaluate_policy(HFPolicy("m", model, tokenizer), [cap], n, params)["greedy"][capability]


@pytest.mark.parametrize(
    "overrides",
    [
        {"opd": {"estimator": "baseline"}},
        {"opd": {"estimator": "exact_kl"}},
        {"rl": {"advantage": "dr_grpo", "loss_aggregation": "seq_mean", "filter_zero_signal": True, "epochs": 2,
                "prompts_per_step": 4, "rollouts_per_prompt": 4}},
        {"rl": {"loss_aggregation": "seq_sum_norm", "prompts_per_step": 4, "rollouts_per_prompt": 4},
         "sampling": {"max_new_tokens": 6, "top_p": 0.9}},
    ],
    ids=["opd-baseline", "opd-exact-kl", "dr-grpo-seq-mean-filter-epochs", "seq-sum-norm-top-p"],
)
def test_every_objective_option_trains_the_real_model(tmp_path, overrides):
    raw = {**overrides, "schedule": {"cycles": 1, "rl_steps": 1, "opd_steps": 2}}
    run_dir = run_training(tiny_config(tmp_path, "run", **raw))
    rows = records(run_dir)
    branch_rows = [r for r in rows if r["type"] == "branch"]
    edge_rows = [r for r in rows if r["type"] == "edge"]
    assert len(edge_rows) == 2 * 2
    assert all(r.get("skipped") is False for r in branch_rows if "loss" in r)
    for r in edge_rows:
        assert 0.0 <= r["overlap_topk"] <= 1.0 and r["sym_kl"] >= 0.0
    if overrides.get("rl", {}).get("epochs") == 2:
        # A second epoch on the same batch moves the ratio away from 1, so clipping can act.
        assert any(r["approx_kl"] > 0 for r in branch_rows if "approx_kl" in r)
