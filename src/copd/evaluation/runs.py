"""Which copd run a model folder lies in, so a model saved by a run is scored and compared the way the run
itself scores it: its capability names, held-out splits, generation settings and prompt options.

A run directory is recognised by its config.yaml (as `copd merge RUN` and `copd train --resume RUN` read it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

RUN_CONFIG = "config.yaml"


def run_candidates(folder: Path) -> list[Path]:
    """The folders that would be `folder`'s run, nearest first, for the places a run writes models to:
    RUN itself, RUN/NAME (base, final, merged-METHOD), RUN/branches/NAME, RUN/checkpoints/CYCLE/branches/NAME."""
    up = [folder, *folder.parents]
    found = up[:2]
    if len(up) > 2 and up[1].name == "branches":
        found.append(up[2])
        if len(up) > 4 and up[3].name == "checkpoints":
            found.append(up[4])
    return found


def enclosing_run(folder: str | Path) -> Path | None:
    """The run directory holding `folder` (or `folder` itself when it is one), resolved; None outside any run."""
    resolved = Path(folder).expanduser().resolve()
    return next((run for run in run_candidates(resolved) if (run / RUN_CONFIG).is_file()), None)


def find_run(folders: Iterable[str | Path]) -> Path | None:
    """The run holding the first of `folders` that lies inside one."""
    return next((run for run in map(enclosing_run, folders) if run is not None), None)


def load_run_config(run_dir: Path | None):
    """The run's config (None for no run): its capabilities, eval and sampling settings and model options."""
    from copd.config.loader import load_config

    return load_config(run_dir / RUN_CONFIG) if run_dir is not None else None


def describe_run(run_dir: Path, run_config) -> str:
    """One line: the run a model folder was resolved against, and what of it applies."""
    names = ", ".join(cap.name for cap in run_config.capabilities)
    return (f"run: {run_dir} (task names are its capabilities {names}, on their held-out splits; "
            "its generation settings are the defaults, its prompt options apply)")
