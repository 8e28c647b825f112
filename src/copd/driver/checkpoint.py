"""Cycle checkpoints: written aside, then renamed into place, so a crash never leaves half of one.

A checkpoint can still be damaged afterwards (a disk that filled up while copying a run, a
truncated download). Resuming checks every file of the newest checkpoint before loading it
and falls back to the one before it (run.keep_checkpoints keeps two by default).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from copd.backends.roles import Learner
from copd.driver.run_state import RunState
from copd.errors import CopdError

PREFIX = "cycle_"


def save_checkpoint(run_dir: Path, cycle: int, policies: dict[str, Learner], state: RunState, keep: int) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"{PREFIX}{cycle:04d}"
    tmp = root / f".tmp-{PREFIX}{cycle:04d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for name, policy in policies.items():
        policy.save_checkpoint(tmp / "branches" / name)
    (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic on one filesystem: the checkpoint appears whole or not at all
    _prune(root, keep)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Every finished checkpoint of the run, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob(f"{PREFIX}*") if (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(folder: Path, policies: dict[str, Learner]) -> RunState:
    """Load every policy's weights and optimizer state; a damaged file is a CopdError naming it."""
    problem = damage(folder, policies)
    if problem is None:
        for name, policy in policies.items():
            try:
                policy.load_checkpoint(folder / "branches" / name)
            except Exception as exc:
                problem = f"{folder / 'branches' / name}: cannot load it ({type(exc).__name__}: {_first_line(exc)})"
                break
    if problem is not None:
        raise CopdError(f"damaged checkpoint: {problem}")
    return RunState.from_json(json.loads((folder / "state.json").read_text()))


def load_latest_intact(run_dir: Path, policies: dict[str, Learner], log: Callable[[str], None] = print) -> tuple[Path, RunState] | None:
    """(folder, state) of the newest checkpoint that loads, after loading it into `policies`.

    A damaged newer checkpoint is skipped with one line to `log`; None when the run has no
    checkpoint yet; a CopdError naming the damaged file when none is intact.
    """
    found = checkpoints(run_dir)
    skipped: list[str] = []
    for folder in reversed(found):
        try:
            state = load_checkpoint(folder, policies)
        except CopdError as err:
            skipped.append(str(err).removeprefix("damaged checkpoint: "))
            continue
        if skipped:
            older = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            log(f"skipped a damaged checkpoint{older}: {skipped[0]}; resuming from {folder} instead")
        return folder, state
    if skipped:
        raise CopdError(_none_intact(skipped))
    return None


def check_resumable(run_dir: Path, branches: list[str]) -> None:
    """Before a resumed run touches anything: some checkpoint must look whole, if there are any."""
    found = checkpoints(run_dir)
    problems = [damage(folder, branches) for folder in reversed(found)]
    if found and all(problems):
        raise CopdError(_none_intact(problems))


def _none_intact(problems: list) -> str:
    """One line for a run whose every checkpoint is damaged (newest first): the newest one's file."""
    more = len(problems) - 1
    older = "" if not more else "; the older one is damaged too" if more == 1 else f"; the {more} older ones are damaged too"
    return f"no intact checkpoint to resume from: {problems[0]}{older}"


def damage(folder: Path, branches: Iterable[str] = ()) -> str | None:
    """'FILE: what is wrong' for the first damaged file of a checkpoint, None when all look whole.

    Checks structure, not values: state.json parses and has the trainer's keys, each
    safetensors file holds every byte its header promises, each torch file is a complete
    zip archive (torch.save's format). Truncation, the usual damage, fails all three.
    """
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{state_path}: not readable JSON ({_first_line(exc)})"
    missing = [k for k in RunState.REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        return f"{state_path}: missing key {missing[0]!r}"
    for name in branches:
        if not (folder / "branches" / name).is_dir():
            return f"{folder / 'branches' / name}: missing"
    for path in sorted((folder / "branches").rglob("*")):
        problem = _file_damage(path) if path.is_file() else None
        if problem:
            return f"{path}: {problem}"
    return None


def _file_damage(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return _safetensors_damage(path)
    if path.suffix in (".pt", ".pth"):
        try:
            with zipfile.ZipFile(path) as archive:
                if not archive.namelist():
                    return "an empty archive"
        except (OSError, zipfile.BadZipFile) as exc:
            return f"not a complete torch file ({_first_line(exc)})"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return f"not readable JSON ({_first_line(exc)})"
    return None


def _safetensors_damage(path: Path) -> str | None:
    """safetensors layout: 8-byte little-endian header length, a JSON header, then the tensor bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated ({size} bytes, no header)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"truncated ({size} bytes, the header alone needs {8 + length})"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            return "unreadable header"
    entries = [entry for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)]
    ends = [entry["data_offsets"][1] for entry in entries if "data_offsets" in entry]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"truncated ({size} of {needed} bytes)"
    return None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _prune(root: Path, keep: int) -> None:
    done = sorted(root.glob(f"{PREFIX}*"))
    for old in done[:-keep]:
        shutil.rmtree(old)
