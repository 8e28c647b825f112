"""What a registered verifier reads: the answer it takes from a completion, and how it reads the reference.

A reward alone cannot show whether the verifier read the model's answer right. The evaluation
records therefore carry, beside each reward, the answer the verifier extracted from the
completion and its reading of the reference. Verifiers given as `module:function` have no
reading (copd cannot know what user code extracts).

A reference that math-verify reads only in part is a silent source of false positives (it
parses `2^floor(n/2)*floor(n/2)!` as `2`, which any completion ending in 2 then matches);
`dropped_tokens` finds the names and numbers of the reference missing from its reading.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from copd.capabilities.verifiers import _as_float, _split_spec, parse_last_number
from copd.capabilities.verifiers_text import (
    _math_timeout,
    extract_choice,
    extract_regex,
    gold_letter,
    normalize_text,
    parse_gold,
    parse_prediction,
)


@dataclass(frozen=True)
class AnswerReading:
    """`completion(text, fields)`: the answer the verifier takes from a completion (None: it finds none);
    `reference(answer)`: how it reads the reference answer."""

    completion: Callable[..., str | None]
    reference: Callable[[str], str | None]


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


def _math_completion(text: str, **fields: Any) -> str | None:
    found = parse_prediction(text, _math_timeout())  # cached: the verifier has just parsed this completion
    return str(found[0]) if found else None


def _math_reference(answer: str) -> str | None:
    found = parse_gold(answer, _math_timeout())
    return str(found[0]) if found else None


def _regex_completion(text: str, answer_pattern: str | None = None, **fields: Any) -> str | None:
    return extract_regex(text, answer_pattern)


def _stripped(text: str, **fields: Any) -> str:
    return text.strip()


def _last_number(text: str, **fields: Any) -> str | None:
    return _number(parse_last_number(text))


def _choice(text: str, **fields: Any) -> str | None:
    return extract_choice(text)


def _normalized(text: str, **fields: Any) -> str:
    return normalize_text(text)


def _number_answer(answer: str) -> str | None:
    return _number(_as_float(answer))


# Named functions rather than lambdas, so a capability pickles (Ray ships them to its workers).
READINGS: dict[str, AnswerReading] = {
    "exact": AnswerReading(_stripped, str.strip),
    "numeric": AnswerReading(_last_number, _number_answer),
    "math": AnswerReading(_math_completion, _math_reference),
    "choice": AnswerReading(_choice, gold_letter),
    "normalized": AnswerReading(_normalized, normalize_text),
    "regex": AnswerReading(_regex_completion, str.strip),
}


def reading_for(spec: str) -> AnswerReading | None:
    """The reading of a registered verifier spec ("math", "numeric+format:0.2"); None for module:function."""
    return READINGS.get(_split_spec(spec)[0])


# Names and numbers; LaTeX commands (\frac, \lfloor) are spelling, not content.
_TOKENS = re.compile(r"\\[A-Za-z]+|[A-Za-z]+|\d+")


def dropped_tokens(answer: str, read: str | None) -> list[str]:
    """The names and numbers of `answer` that its reading `read` lost: empty when the reading kept them all."""
    if read is None:
        return []
    return [t for t in _TOKENS.findall(answer) if not t.startswith("\\") and t not in read]
