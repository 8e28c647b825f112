"""Cycle checkpoints: written aside, then renamed into place, so a crash never leaves half of one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from copd.backends.roles import Policy

PREFIX = "cycle_"


def save_checkpoint(run_dir: Path, cycle: int, policies: dict[str, Policy], state: dict, keep: int) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"{PREFIX}{cycle:04d}"
    tmp = root / f".tmp-{PREFIX}{cycle:04d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for name, policy in policies.items():
        policy.save_checkpoint(tmp / "branches" / name)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one filesystem: the checkpoint appears whole or not at all
    _prune(root, keep)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in (run_dir / "checkpoints").glob(f"{PREFIX}*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(folder: Path, policies: dict[str, Policy]) -> dict:
    for name, policy in policies.items():
        policy.load_checkpoint(folder / "branches" / name)
    return json.loads((folder / "state.json").read_text())


def _prune(root: Path, keep: int) -> None:
    done = sorted(root.glob(f"{PREFIX}*"))
    for old in done[:-keep]:
        shutil.rmtree(old)
