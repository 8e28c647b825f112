"""Turning one row of a user dataset (a dict of column -> value) into a Sample."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from copd.capabilities.capability import Sample
from copd.config.schema import RESERVED_FIELDS
from copd.errors import CopdError
from copd.multimodal.media import VideoSampling, check_image, check_video
from copd.multimodal.prompts import placeholder_problem

# Sample.fields are passed as keywords next to the positional arguments RESERVED_FIELDS of the
# verifier, so a field with one of these names would collide; such keys are left out of the fields.

AnswerCheck = Callable[[str], str | None]
# A check of the text a model reads (prompt and answer): None, or what is wrong, e.g. a character
# the tokenizer of a built tiny model cannot encode.
TextCheck = Callable[[str], str | None]


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut to `limit` characters, so an error about a huge cell stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FieldMap:
    """Which column feeds which part of a Sample (the capability's *_field and fields keys)."""

    prompt: str = "prompt"
    answer: str = "answer"
    system: str | None = None
    images: str | None = None
    videos: str | None = None
    # None: every column not mapped above (minus RESERVED_FIELDS) goes to the verifier.
    extra: tuple[str, ...] | None = None
    check: AnswerCheck | None = None
    text_check: TextCheck | None = None
    # How videos will be sampled: a video with fewer frames than its minimum fails at load.
    video_sampling: VideoSampling = VideoSampling()

    def columns(self) -> list[tuple[str, str]]:
        """(config key, column) for every column this map needs, in a stable order."""
        keys = [
            ("prompt_field", self.prompt),
            ("answer_field", self.answer),
            ("system_field", self.system),
            ("images_field", self.images),
            ("videos_field", self.videos),
            *(("fields", name) for name in self.extra or ()),
        ]
        return [(key, col) for key, col in keys if col is not None]

    def check_columns(self, columns: Iterable[str], where: str, noun: str = "columns") -> None:
        """A one-line error naming the first needed column that is absent, and those present."""
        present = list(columns)
        for key, col in self.columns():
            if col not in present:
                raise CopdError(
                    f'{where}: missing field "{col}" (key {key!r}); '
                    f"{noun}: {', '.join(present) or '(none)'}"
                )

    def to_sample(self, row: Mapping[str, Any], where: str, base: Path | None) -> Sample:
        """The Sample of one row; `base` is the folder relative media paths are resolved in."""
        self.check_columns(row, where, noun="the row has")
        prompt = row[self.prompt]
        if not isinstance(prompt, str):
            raise CopdError(
                f'{where}: field "{self.prompt}" must be a string, got {short_repr(prompt)}'
            )
        answer = answer_text(row[self.answer], where, self.answer)
        problem = self.check(answer) if self.check else None
        if problem:
            raise CopdError(f'{where}: field "{self.answer}" {answer!r} {problem}')
        for column, text in ((self.prompt, prompt), (self.answer, answer)):
            problem = self.text_check(text) if self.text_check else None
            if problem:
                raise CopdError(f'{where}: field "{column}": {problem}')
        images = self._media(row, self.images, where, base, check_image)
        videos = self._media(row, self.videos, where, base, lambda p: check_video(p, self.video_sampling))
        problem = placeholder_problem(prompt, len(images), len(videos))
        if problem:
            raise CopdError(f'{where}: field "{self.prompt}": {problem}')
        return Sample(prompt, answer, self._fields(row), system=self._system(row, where), images=images, videos=videos)

    def _fields(self, row: Mapping[str, Any]) -> dict[str, Any]:
        if self.extra is not None:
            return {name: row[name] for name in self.extra}
        skip = {self.prompt, self.answer, self.system, self.images, self.videos, *RESERVED_FIELDS}
        return {k: v for k, v in row.items() if k not in skip}

    def _system(self, row: Mapping[str, Any], where: str) -> str | None:
        if self.system is None:
            return None
        value = row[self.system]
        if value is None or isinstance(value, str):
            return value or None  # an empty cell means no system prompt
        raise CopdError(
            f'{where}: field "{self.system}" must be a string or null, got {short_repr(value)}'
        )

    @staticmethod
    def _media(
        row: Mapping[str, Any],
        column: str | None,
        where: str,
        base: Path | None,
        check: Callable[[str], None],
    ) -> tuple[str, ...]:
        """Resolved media paths, each checked now so a missing file fails before training."""
        if column is None or row[column] is None or row[column] == "":
            return ()
        value = row[column]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(p, str) and p for p in items):
            raise CopdError(
                f'{where}: field "{column}" must be a path or a list of paths, '
                f"got {short_repr(value)}"
            )
        paths = tuple(resolve_media(p, base) for p in items)
        for path in paths:
            if "://" in path:  # nothing downloads media; a URL would fail only once training reads it
                raise CopdError(f'{where}: field "{column}": {path} is a URL; copd reads local files, so download it '
                                "and give its path")
            try:
                check(path)
            except CopdError as exc:
                raise CopdError(f'{where}: field "{column}": {exc}') from None
        return paths


def resolve_media(path: str, base: Path | None) -> str:
    """A relative media path joined to `base`; absolute paths (and URLs, refused later) are kept as given."""
    if "://" in path or base is None:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def answer_text(value: Any, where: str, answer_field: str) -> str:
    """The reference answer as text: numbers are common answers (e.g. GSM8K-style)."""
    if isinstance(value, str):
        return value
    # bool is excluded on purpose: True is a number to Python but never a meant answer.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise CopdError(
        f'{where}: field "{answer_field}" must be a string or a number, got {short_repr(value)}'
    )
