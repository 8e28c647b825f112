"""Tests of copd.reporting.run_report on synthetic run directories (no model, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from copd.reporting.run_report import load_metrics, merged_vs_base, write_report

CONFIG = {
    "branches": [
        {"name": "add", "capabilities": ["addition"], "beta": 0.1, "weight": 1.0},
        {"name": "rev", "capabilities": ["reversal"], "beta": 0.2, "weight": 1.0},
    ],
    "topology": {"kind": "pair"},
    "schedule": {"plan": "copd", "cycles": 2, "rl_steps": 3, "opd_steps": 2},
    "opd": {"estimator": "sampled", "overlap_k": 16},
    "rl": {"advantage": "grpo", "loss_aggregation": "token"},
    "merge": {"method": "mean"},
    "model": {"path": None, "tiny": {"architecture": "llama"}},
    "run": {"seed": 0},
}

EVAL = {
    "decoding": {"greedy": "temperature 0, max 32 new tokens"},
    "samples": 200,
    "models": {
        "merged": {"greedy": {"addition": 0.53, "reversal": 0.185}, "sampled": {"addition": 0.4, "reversal": 0.1}},
        "base": {"greedy": {"addition": 0.41, "reversal": 0.2}, "sampled": {"addition": 0.3, "reversal": 0.15}},
        "branch:add": {"greedy": {"addition": 0.6, "reversal": 0.1}, "sampled": {"addition": 0.5, "reversal": 0.05}},
        "branch:rev": {"greedy": {"addition": 0.3, "reversal": 0.5}, "sampled": {"addition": 0.2, "reversal": 0.45}},
    },
}


def _metrics() -> list[dict]:
    """Two cycles of 3 explore + 2 consolidate steps, for two branches and the two edges of a pair."""
    records, step = [], 0
    for cycle in range(2):
        for phase, n in (("explore", 3), ("consolidate", 2)):
            for _ in range(n):
                step += 1
                for i, name in enumerate(("add", "rev")):
                    rec = {"type": "branch", "step": step, "cycle": cycle, "phase": phase, "branch": name,
                           "seconds": 0.5, "loss": 1.0 / step, "tokens": 100.0, "skipped": step == 4 and i == 0}
                    if phase == "explore":
                        rec["reward"] = 0.1 * step + 0.05 * i
                    records.append(rec)
                if phase == "consolidate":
                    for student, teacher in (("add", "rev"), ("rev", "add")):
                        records.append({"type": "edge", "step": step, "cycle": cycle, "phase": phase,
                                        "edge": f"{student}<-{teacher}", "student": student, "teacher": teacher,
                                        "overlap_topk": 0.9 - 0.01 * step, "sym_kl": 0.2, "delta_mean": -0.3,
                                        "opd_adv_mean": -0.03, "opd_loss": 0.1, "tokens": 64.0, "score_bytes": 64 * 4 * (1 + 2 * 8)})
    return records


def _run_dir(tmp_path: Path, with_eval: bool = True) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics()))
    if with_eval:
        (run / "eval.json").write_text(json.dumps(EVAL))
        (run / "warmup.json").write_text(json.dumps(
            {"steps": 600, "seconds": 41.2, "history": [{"step": 100, "pass_rate": {"addition": 0.05}}]}))
        (run / "timing.json").write_text(json.dumps({"train_seconds": 12.5, "total_seconds": 60.0}))
    return run


def _row(report: str, first_cell: str) -> list[str]:
    lines = [ln for ln in report.splitlines() if ln.startswith(f"| {first_cell} |")]
    assert lines, f"no table row for {first_cell}"
    return [c.strip() for c in lines[0].strip("|").split("|")]


def test_full_report(tmp_path):
    run = _run_dir(tmp_path)
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    assert "K=2 branches (add, rev)" in text and "topology `pair`" in text
    assert "2 cycles × (3 RL + 2 OPD steps)" in text and "add=0.1, rev=0.2" in text
    # greedy table: rows in order base, branches, merged; percentages with one decimal; average column
    assert _row(text, "base") == ["base", "41.0", "20.0", "30.5"]
    assert _row(text, "merged") == ["merged", "53.0", "18.5", "35.8"]
    order = [text.index(f"| {m} |") for m in ("base", "branch:add", "branch:rev", "merged")]
    assert order == sorted(order)
    assert "| model | addition | reversal | average |" in text
    assert "| 45.0 |" in text  # sampled: branch:rev reversal
    assert "merged > base on addition (+12.0 pts); not on reversal (-1.5 pts)" in text
    assert "Evaluation missing" not in text and "Missing" not in text
    for name in ("reward", "overlap", "sym_kl", "loss", "eval"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in text
    assert "## Warm-up" in text and "## Timing" in text


def test_diagnostics_and_branch_tables(tmp_path):
    text = write_report(_run_dir(tmp_path)).read_text()
    # edge add<-rev: OPD steps 4, 5, 9, 10 -> overlap 0.86 first, 0.80 last and min
    # 4 bytes for the sampled token, 8 for each of 16 support ids (int32 id + fp32 log-prob)
    assert _row(text, "`add<-rev`") == ["`add<-rev`", "4", "0.860", "0.800", "0.800", "0.200", "-0.300", "68.0"]
    # branch add: 10 steps, rewards at steps 1,2,3,6,7,8 -> first 10% = 0.1, last 10% = 0.8; one skipped step
    assert _row(text, "`add`") == ["`add`", "10", "0.100", "0.800", "1", "1000", "0.500"]
    assert _row(text, "`rev`")[4] == "0"


def test_merged_vs_base_sentence():
    models = {"base": {"greedy": {"a": 0.5, "b": 0.5, "c": 0.2}}, "merged": {"greedy": {"a": 0.4, "b": 0.5, "c": 0.1}}}
    expected = "Merged vs base (greedy): merged = base on b (+0.0 pts); merged < base on a (-10.0 pts), c (-10.0 pts)."
    assert merged_vs_base(models) == expected
    assert "cannot compare" in merged_vs_base({"base": models["base"]})


def test_metrics_only_run(tmp_path):
    run = _run_dir(tmp_path, with_eval=False)
    (run / "plots").mkdir()
    (run / "plots" / "eval.png").write_bytes(b"stale")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"type": "branch", "step": 11, "bra')  # killed mid-write
    text = write_report(run).read_text()
    assert "Evaluation missing" in text and "eval.json" in text
    assert "## Warm-up" not in text and "## Timing" not in text
    assert not (run / "plots" / "eval.png").exists() and "plots/eval.png" not in text
    assert (run / "plots" / "reward.png").exists() and (run / "plots" / "overlap.png").exists()


def test_empty_run_dir_and_truncated_metrics(tmp_path):
    text = write_report(tmp_path).read_text()
    assert "config.yaml missing" in text and "Evaluation missing" in text
    assert "No branch records" in text and not list((tmp_path / "plots").glob("*.png"))
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "edge", "step": 1}\n\n{"type": "branch", "st')
    assert load_metrics(path) == [{"type": "edge", "step": 1}]
    assert load_metrics(tmp_path / "absent.jsonl") == []


def test_deterministic(tmp_path):
    run = _run_dir(tmp_path)
    first = write_report(run).read_text()
    pngs = {p.name: p.read_bytes() for p in (run / "plots").glob("*.png")}
    assert write_report(run).read_text() == first
    assert {p.name: p.read_bytes() for p in (run / "plots").glob("*.png")} == pngs


def test_held_out_records_draw_a_curve_per_branch_and_capability(tmp_path):
    run = _run_dir(tmp_path)
    held_out = [{"type": "eval", "step": s, "branch": b, "greedy/addition": 0.1 * s, "greedy/reversal": 0.05 * s}
                for s in (0, 5, 10) for b in ("add", "rev")]
    with (run / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in held_out)
    text = write_report(run).read_text()
    assert "](plots/heldout.png)" in text and (run / "plots" / "heldout.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "plain").mkdir()
    assert "](plots/heldout.png)" not in write_report(_run_dir(tmp_path / "plain")).read_text()


def test_held_out_series_split_each_record_by_capability():
    from copd.reporting.run_report import _held_out_series

    series = _held_out_series([{"type": "eval", "step": 3, "branch": "add", "greedy/addition": 0.5, "greedy/reversal": 0.25}])
    assert series == {"add on addition": [{"step": 3, "accuracy": 0.5}], "add on reversal": [{"step": 3, "accuracy": 0.25}]}


def test_groups_pass_at_k_and_references_read_in_part_are_reported(tmp_path):
    run = _run_dir(tmp_path)
    scores = {"all": {"prompts": 4, "greedy": 0.5, "mean@2": 0.375, "pass@1": 0.375, "pass@2": 0.5},
              "groups": {"x": {"prompts": 2, "greedy": 1.0, "mean@2": 0.75, "pass@1": 0.75, "pass@2": 1.0}}}
    ev = {**EVAL, "settings": {"n": 2}, "models": {"base": {**EVAL["models"]["base"], "scores": {"addition": scores}}},
          "answers_read_in_part": {"addition": {"count": 1, "of": 4, "answer": "2^floor(n/2)", "read_as": "2"}}}
    (run / "eval.json").write_text(json.dumps(ev))
    text = write_report(run).read_text()
    assert "mean@2 and pass@k (unbiased estimator over 2 samples per prompt)" in text
    assert "| model | capability | group | prompts | greedy | mean@2 | pass@1 | pass@2 |" in text
    assert "| base | addition | all | 4 | 50.0 | 37.5 | 37.5 | 50.0 |" in text
    assert "| base | addition | x | 2 | 100.0 | 75.0 | 75.0 | 100.0 |" in text
    assert "reads 1 of 4 reference answers only in part (e.g. `2^floor(n/2)` is read as `2`)" in text


def test_one_sample_and_no_groups_add_no_detail_table(tmp_path):
    text = write_report(_run_dir(tmp_path)).read_text()
    assert "By group" not in text and "only in part" not in text
