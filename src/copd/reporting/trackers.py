"""Experiment trackers (`run.report_to`): metrics.jsonl, the config and the report's plots, live.

Every record the driver writes to metrics.jsonl also goes to each tracker, as scalars
tagged `branch/<name>/<key>` or `edge/<student><-<teacher>/<key>` (overlap probes:
`probe/<edge>/<key>`) at the run's global step. The config goes in as hyper-parameters when
the run starts; at the end the eval scores (`eval/<model>/<greedy|sampled>/<capability>`)
and the plots of report.md (`plots/<name>`) follow, at the last step.

A tracker is a small class in TRACKERS; its package is an optional extra, checked before the
run folder is written. Each tracker writes inside the run directory (TensorBoard event files
in RUN/tensorboard, W&B's offline or online run in RUN/wandb); trackio keeps its own local
database (TRACKIO_DIR), as it does for any trackio user.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from copd.errors import CopdError

# Keys of a metrics.jsonl record that say where it belongs rather than what was measured.
LABEL_KEYS = ("step", "cycle", "phase", "type", "branch", "edge", "student", "teacher", "probe")


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: numeric values under the branch's or edge's prefix."""
    if record.get("type") == "branch":
        prefix = f"branch/{record['branch']}"
    elif record.get("type") == "edge":
        prefix = f"{'probe' if record.get('probe') else 'edge'}/{record['edge']}"
    elif record.get("type") == "eval":
        prefix = f"heldout/{record['branch']}"
    else:
        return {}
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if key not in LABEL_KEYS and _is_number(value)}


def eval_scalars(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """eval.json's scores as `eval/<model>/<decoding>/<capability>`."""
    return {f"eval/{model}/{decoding}/{capability}": float(value)
            for model, scores in evaluation.get("models", {}).items()
            for decoding in ("greedy", "sampled") for capability, value in scores.get(decoding, {}).items()}


def flat_hyperparameters(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `section.key` -> bool, int, float or str (lists and None as text):
    the value types every tracker's hyper-parameter table takes."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker is opened with."""

    run_dir: Path
    name: str  # the run directory's name
    project: str  # run.project
    config: dict  # the run's config as saved in config.yaml
    resume: bool
    run_id: str  # kept in RUN/trackers.json, so --resume continues the same tracker run


class TensorBoardTracker:
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, run: TrackedRun):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self._writer_class, self.log_dir = SummaryWriter, run.run_dir / "tensorboard"
        self.writer = SummaryWriter(str(self.log_dir))
        if not run.resume:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(run.config, sort_keys=False) + "```", 0)
            # hparams() gives the three summaries add_hparams writes, here into this run's own
            # event file instead of a sub-folder per call.
            for summary in hparams(flat_hyperparameters(run.config), {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def rewind(self, step: int) -> None:
        # A resumed run repeats the steps after its checkpoint: a writer opened with purge_step
        # makes TensorBoard drop the first attempt's events from there on.
        self.writer.close()
        self.writer = self._writer_class(str(self.log_dir), purge_step=step + 1)

    def images(self, plots: dict[str, Path], step: int) -> None:
        import matplotlib.image

        for name, path in plots.items():
            self.writer.add_image(f"plots/{name}", matplotlib.image.imread(path)[..., :3], step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbLikeTracker:
    """W&B, or trackio (the same init / log / finish calls). WANDB_MODE=offline keeps W&B local."""

    module = "wandb"

    def __init__(self, run: TrackedRun):
        self.lib = importlib.import_module(self.module)
        self.run = self.lib.init(**self.init_arguments(run))

    def init_arguments(self, run: TrackedRun) -> dict:
        return {"project": run.project, "name": run.name, "id": run.run_id, "dir": str(run.run_dir), "config": run.config,
                "resume": "allow"}

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def rewind(self, step: int) -> None:
        """Nothing to do: the tracker ignores steps below the last one logged, so the steps a resumed
        run repeats keep the values of the first attempt there."""

    def images(self, plots: dict[str, Path], step: int) -> None:
        self.run.log({f"plots/{name}": self.lib.Image(str(path)) for name, path in plots.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(WandbLikeTracker):
    """trackio's local dashboard (`trackio show --project PROJECT`)."""

    module = "trackio"

    def init_arguments(self, run: TrackedRun) -> dict:
        return {"project": run.project, "name": run.name, "config": run.config, "resume": "allow"}


@dataclass(frozen=True)
class TrackerSpec:
    module: str  # the package that must import
    extra: str  # pip install 'copd[extra]'
    open: Callable[[TrackedRun], Any]


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard", TensorBoardTracker),
    "wandb": TrackerSpec("wandb", "wandb", WandbLikeTracker),
    "trackio": TrackerSpec("trackio", "trackio", TrackioTracker),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_trackers(names: list[str]) -> None:
    """Each tracker of run.report_to must import: say which install is missing, before the run folder exists."""
    for name in names:
        spec = TRACKERS[name]
        if not installed(spec.module):
            raise CopdError(f"run.report_to: {name} needs the {spec.module} package; pip install 'copd[{spec.extra}]'")


class Trackers:
    """Every tracker of a run behind one call per event; with none, every call does nothing."""

    def __init__(self, trackers: list | None = None):
        self.trackers = trackers or []
        self.step = 0

    @classmethod
    def open(cls, names: list[str], run_dir: Path, project: str, config: dict, resume: bool) -> Trackers:
        if not names:
            return cls()
        check_trackers(names)
        saved = run_dir / "trackers.json"
        run_id = json.loads(saved.read_text())["run_id"] if resume and saved.is_file() else uuid.uuid4().hex[:12]
        saved.write_text(json.dumps({"run_id": run_id, "report_to": names}))
        run = TrackedRun(run_dir, run_dir.name, project, config, resume, run_id)
        return cls([TRACKERS[name].open(run) for name in names])

    def record(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl record."""
        scalars = scalars_of(record)
        self.step = max(self.step, int(record.get("step", 0)))
        if scalars:
            for tracker in self.trackers:
                tracker.log(scalars, int(record["step"]))

    def rewind(self, step: int) -> None:
        """A resumed run continues after `step`."""
        self.step = step
        for tracker in self.trackers:
            tracker.rewind(step)

    def results(self, run_dir: Path) -> None:
        """The end of a run: eval.json's scores and the report's plots, at the last step."""
        if not self.trackers:
            return
        path = run_dir / "eval.json"
        scores = eval_scalars(json.loads(path.read_text())) if path.is_file() else {}
        plots = {p.stem: p for p in sorted((run_dir / "plots").glob("*.png"))}
        for tracker in self.trackers:
            if scores:
                tracker.log(scores, self.step)
            if plots:
                tracker.images(plots, self.step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
