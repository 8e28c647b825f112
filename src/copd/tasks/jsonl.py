"""Reading user JSONL datasets and splitting them into disjoint train/test parts."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from copd.errors import CopdError
from copd.tasks.core import Sample

# Sample.fields are passed as keywords next to these positional arguments of the verifier,
# so a field with one of these names would collide; such keys are left out of the fields.
RESERVED_FIELDS = ("completion", "answer")

AnswerCheck = Callable[[str], str | None]


def read_jsonl(
    path: Path, prompt_field: str, answer_field: str, check: AnswerCheck | None = None
) -> list[Sample]:
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
                samples.append(_parse_line(line, where, prompt_field, answer_field, check))
    if not samples:
        raise CopdError(f"{path}: no samples (the file is empty)")
    return samples


def _parse_line(
    line: str, where: str, prompt_field: str, answer_field: str, check: AnswerCheck | None
) -> Sample:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CopdError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise CopdError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in (prompt_field, answer_field):
        if key not in obj:
            raise CopdError(f'{where}: missing field "{key}"')
    prompt = obj[prompt_field]
    if not isinstance(prompt, str):
        raise CopdError(f'{where}: field "{prompt_field}" must be a string, got {prompt!r}')
    answer = _answer_text(obj[answer_field], where, answer_field)
    problem = check(answer) if check else None
    if problem:
        raise CopdError(f'{where}: field "{answer_field}" {answer!r} {problem}')
    skip = {prompt_field, answer_field, *RESERVED_FIELDS}
    return Sample(prompt, answer, {k: v for k, v in obj.items() if k not in skip})


def _answer_text(value: Any, where: str, answer_field: str) -> str:
    # Numbers are common answers in JSON (e.g. GSM8K-style); bool is excluded on purpose.
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise CopdError(
        f'{where}: field "{answer_field}" must be a string or a number, got {value!r}'
    )


def split_by_prompt(
    samples: list[Sample], ratio: float, seed: int, path: Path
) -> tuple[list[Sample], list[Sample]]:
    """Hold out `ratio` of the distinct prompts; duplicates of a prompt stay on one side."""
    if ratio == 0:
        return list(samples), []
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    random.Random(seed).shuffle(prompts)
    n_test = max(1, round(ratio * len(prompts)))
    if n_test >= len(prompts):
        raise CopdError(
            f"{path}: only {len(prompts)} distinct prompt(s), too few to hold out "
            f"test_ratio={ratio} and keep training data; add samples or set test_path"
        )
    held_out = set(prompts[:n_test])
    train = [s for s in samples if s.prompt not in held_out]
    test = [s for s in samples if s.prompt in held_out]
    return train, test
