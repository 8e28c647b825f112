"""Experiment trackers (run.report_to): what a record becomes, the config key, missing installs,
TensorBoard through a crash and --resume, and a real run into TensorBoard, trackio and W&B (offline)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from copd.config.loader import load_config
from copd.config.schema import TRACKER_NAMES
from copd.errors import CopdError
from copd.reporting import trackers as trackers_module
from copd.reporting.trackers import TRACKERS, Trackers, check_trackers, eval_scalars, flat_hyperparameters, scalars_of
from tests.cli.test_main import fails, write_config
from tests.driver.test_trainer import make_trainer, records
from tests.extras import reason, require

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def test_a_branch_record_becomes_numeric_scalars_under_its_prefix():
    record = {"step": 3, "cycle": 1, "phase": "rl+opd", "type": "branch", "branch": "sort", "loss": 0.5, "reward": 1,
              "reward/sort": 0.25, "skipped": False, "note": "x", "grad_norm": math.nan}
    assert scalars_of(record) == {"branch/sort/loss": 0.5, "branch/sort/reward": 1.0, "branch/sort/reward/sort": 0.25}


def test_edge_and_probe_records_use_the_edge_label():
    edge = {"step": 4, "type": "edge", "edge": "rev<-sort", "student": "rev", "teacher": "sort", "overlap_topk": 0.75, "score_bytes": 320}
    assert scalars_of(edge) == {"edge/rev<-sort/overlap_topk": 0.75, "edge/rev<-sort/score_bytes": 320.0}
    assert scalars_of({**edge, "probe": True}) == {"probe/rev<-sort/overlap_topk": 0.75, "probe/rev<-sort/score_bytes": 320.0}
    assert scalars_of({"type": "other", "x": 1.0}) == {}


def test_a_held_out_record_goes_under_its_branch():
    record = {"step": 6, "type": "eval", "branch": "sort", "greedy/sort": 0.5, "greedy/reversal": 0.0}
    assert scalars_of(record) == {"heldout/sort/greedy/sort": 0.5, "heldout/sort/greedy/reversal": 0.0}


def test_eval_scores_and_hyperparameters_flatten():
    ev = {"samples": 8, "models": {"base": {"greedy": {"sort": 0.5}, "sampled": {"sort": 0.25}}, "merged": {"greedy": {"sort": 1.0}}}}
    assert eval_scalars(ev) == {"eval/base/greedy/sort": 0.5, "eval/base/sampled/sort": 0.25, "eval/merged/greedy/sort": 1.0}
    config = {"rl": {"eps_low": 0.2, "advantage": "grpo"}, "run": {"report_to": ["tensorboard"], "threads": None, "seed": 0},
              "capabilities": [{"name": "a"}], "lora": {}}
    assert flat_hyperparameters(config) == {"rl.eps_low": 0.2, "rl.advantage": "grpo", "run.report_to": '["tensorboard"]',
                                            "run.threads": "null", "run.seed": 0, "capabilities": '[{"name": "a"}]', "lora": "{}"}


def test_every_tracker_name_of_the_config_has_a_tracker():
    assert tuple(TRACKERS) == TRACKER_NAMES


@pytest.mark.parametrize("value, expected", [("wandb", ["wandb"]), ("none", []), ("[tensorboard, trackio]", ["tensorboard", "trackio"])])
def test_report_to_takes_a_name_a_list_or_none(tmp_path, value, expected):
    assert load_config(write_config(tmp_path), [f"run.report_to={value}"]).run.report_to == expected


def test_an_unknown_tracker_is_one_line_naming_the_key(tmp_path, capsys):
    err = fails(capsys, ["train", str(write_config(tmp_path)), "run.report_to=[tensorbord]", "--quiet"])
    assert "run.report_to" in err and "did you mean 'tensorboard'" in err


def test_a_missing_tracker_package_names_the_install_before_the_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trackers_module, "installed", lambda module: module != "wandb")
    with pytest.raises(CopdError, match=r"run.report_to: wandb needs the wandb package; pip install 'copd\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])
    err = fails(capsys, ["train", str(write_config(tmp_path)), "run.report_to=wandb", "--quiet"])
    assert "pip install 'copd[wandb]'" in err and not (tmp_path / "run").exists()


class Recorder:
    """A tracker that remembers every call (registered in place of a real one)."""

    calls: ClassVar[list] = []

    def __init__(self, run):
        Recorder.calls.append(("open", run.run_id, run.resume))

    def log(self, scalars, step):
        Recorder.calls.append(("log", step, scalars))

    def rewind(self, step):
        Recorder.calls.append(("rewind", step))

    def images(self, plots, step):
        Recorder.calls.append(("images", step, sorted(plots)))

    def close(self):
        Recorder.calls.append(("close",))


def test_a_resumed_run_keeps_its_tracker_run_id(tmp_path, monkeypatch):
    monkeypatch.setitem(TRACKERS, "wandb", trackers_module.TrackerSpec("json", "wandb", Recorder))
    Recorder.calls = []
    Trackers.open(["wandb"], tmp_path, "copd", {}, resume=False)
    Trackers.open(["wandb"], tmp_path, "copd", {}, resume=True)
    (_first, id1, r1), (_second, id2, r2) = Recorder.calls
    assert id1 == id2 and (r1, r2) == (False, True) and json.loads((tmp_path / "trackers.json").read_text())["run_id"] == id1
    Trackers.open(["wandb"], tmp_path, "copd", {}, resume=False)
    assert Recorder.calls[-1][1] != id1  # a new run is a new tracker run


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_scalars(recs) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list] = {}
    for record in recs:
        for tag, value in scalars_of(record).items():
            found.setdefault(tag, []).append((record["step"], pytest.approx(value)))
    return found


@pytest.mark.parametrize("crash_after", [1, 6])  # before the first checkpoint, after it
def test_tensorboard_after_a_crash_and_resume_holds_exactly_the_records_of_metrics_jsonl(tmp_path, crash_after):
    require("tensorboard")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    opened = Trackers.open(["tensorboard"], run_dir, "copd", {"run": {"seed": 7}}, resume=False)
    broken, _ = make_trainer(tmp_path, "run", policy_kw={"rev": {"crash_after": crash_after}}, trackers=opened)
    with pytest.raises(RuntimeError, match="simulated crash"):
        broken.run()
    opened.close()
    reopened = Trackers.open(["tensorboard"], run_dir, "copd", {"run": {"seed": 7}}, resume=True)
    resumed, _ = make_trainer(tmp_path, "run", trackers=reopened)
    resumed.run(resume=True)
    reopened.close()
    recs = records(run_dir)
    assert max(r["step"] for r in recs) == 8 and tensorboard_scalars(run_dir / "tensorboard") == expected_scalars(recs)


def test_a_real_run_reaches_tensorboard_trackio_and_wandb_offline(tmp_path, monkeypatch):
    for package in ("tensorboard", "trackio", "wandb"):
        if importlib.util.find_spec(package) is None:  # not imported here: trackio reads TRACKIO_DIR when it is
            pytest.skip(reason(package))
    run_dir, trackio_dir = tmp_path / "run", tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(trackio_dir))
    overrides = ["warmup.enabled=false", "schedule.cycles=1", "schedule.rl_steps=1", "schedule.opd_steps=1", "eval.samples=4",
                 "rl.prompts_per_step=2", "opd.prompts_per_step=2", "run.threads=1", f"run.out={run_dir}",
                 "run.report_to=[tensorboard, trackio, wandb]", "run.project=copd-test"]
    env = {**os.environ, "WANDB_MODE": "offline", "TRACKIO_DIR": str(trackio_dir), "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, "-m", "copd.cli", "train", str(DEMO), *overrides, "--quiet"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    recs, plots = records(run_dir), sorted(p.stem for p in (run_dir / "plots").glob("*.png"))
    final_step = max(r["step"] for r in recs)
    scores = eval_scalars(json.loads((run_dir / "eval.json").read_text()))
    # TensorBoard: every record at its step, the eval scores at the last step, the plots, the config.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    expected = {**expected_scalars(recs), **{tag: [(final_step, pytest.approx(v))] for tag, v in scores.items()}}
    assert tensorboard_scalars(run_dir / "tensorboard") == expected
    assert sorted(events.Tags()["images"]) == [f"plots/{name}" for name in plots] and "eval" in plots
    assert "config/text_summary" in events.Tags()["tensors"]
    # trackio: the same scalars, the config, the plots as images (read with trackio's own storage).
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("copd-test", "run")
    logged = {}
    for row in logs:
        for key, value in row.items():
            if isinstance(value, float):
                logged.setdefault(key, []).append((row["step"], pytest.approx(value)))
    assert logged == expected
    assert {k for row in logs for k in row if k.startswith("plots/")} == {f"plots/{name}" for name in plots}
    assert SQLiteStorage.get_run_config("copd-test", "run")["rl"]["eps_high"] == 0.28
    # W&B offline: one run, named by trackers.json, with the plots in its media.
    run_id = json.loads((run_dir / "trackers.json").read_text())["run_id"]
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
    assert sorted({p.name.split("_")[0] for p in (offline / "files" / "media" / "images" / "plots").glob("*.png")}) == \
        sorted(name.split("_")[0] for name in plots)
