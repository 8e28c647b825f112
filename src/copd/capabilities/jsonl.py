"""Reading user JSONL datasets and splitting them into disjoint train/test parts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from copd.capabilities.capability import Sample
from copd.capabilities.rows import RESERVED_FIELDS, FieldMap
from copd.errors import CopdError

__all__ = ["RESERVED_FIELDS", "parse_object", "read_jsonl", "split_by_prompt"]


def read_jsonl(path: Path, fields: FieldMap) -> list[Sample]:
    """All samples of a JSONL file; blank lines are skipped, every problem names file:line."""
    if not path.exists():
        raise CopdError(f"{path}: file not found")
    if not path.is_file():
        raise CopdError(f"{path}: not a file")
    samples = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CopdError(f"{where}: not valid UTF-8") from None
            if line.strip():
                samples.append(fields.to_sample(parse_object(line, where), where, path.parent))
    if not samples:
        raise CopdError(f"{path}: no samples (the file is empty)")
    return samples


def parse_object(text: str, where: str) -> dict[str, Any]:
    """One JSON object, or a one-line error naming `where`."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CopdError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise CopdError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def split_by_prompt(
    samples: list[Sample], ratio: float, seed: int, path: Path | str
) -> tuple[list[Sample], list[Sample]]:
    """Hold out `ratio` of the distinct prompts; duplicates of a prompt stay on one side.

    A prompt is identified by its text and media, so image questions that share a wording
    ("What is shown?") are still split one by one.
    """
    if ratio == 0:
        return list(samples), []
    keys = list(dict.fromkeys(_split_key(s) for s in samples))
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(ratio * len(keys)))
    if n_test >= len(keys):
        raise CopdError(
            f"{path}: only {len(keys)} distinct prompt(s), too few to hold out "
            f"test_ratio={ratio} and keep training data; add samples, or give a test file "
            "or split"
        )
    held_out = set(keys[:n_test])
    train = [s for s in samples if _split_key(s) not in held_out]
    test = [s for s in samples if _split_key(s) in held_out]
    return train, test


def _split_key(sample: Sample) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    return sample.prompt, sample.images, sample.videos
