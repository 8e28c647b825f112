"""Text verifiers (math, choice, normalized, regex) and the format reward.

They are registered by name in verifiers.py.

Each verifier is `(completion, answer, **fields) -> float in [0, 1]`.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from collections.abc import Callable
from typing import Any

from copd.capabilities.capability import Verifier
from copd.errors import CopdError

# ---------------------------------------------------------------------------------------- math

# math-verify bounds parsing/comparison with signal.alarm, which only works in the main thread
# (elsewhere it raises ValueError even with raise_on_error=False), so the timeout is off there.
MATH_TIMEOUT_SECONDS = 5


def require_math_verify() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """math_verify's (parse, verify), or a CopdError saying how to install it."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise CopdError(
            "verifier 'math' needs the math-verify package: "
            "pip install math-verify  (or: pip install copd[math])"
        ) from None
    return parse, verify


def _math_timeout() -> int | None:
    return MATH_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def parse_gold(answer: str, timeout: int | None = None) -> tuple[Any, ...]:
    """The reference answer parsed by math-verify; plain numbers/LaTeX are wrapped in $...$."""
    parse, _ = require_math_verify()
    text = answer.strip()
    gold = [] if "$" in text or "\\boxed" in text else parse(f"${text}$", parsing_timeout=timeout)
    return tuple(gold or parse(text, parsing_timeout=timeout))


@functools.lru_cache(maxsize=4096)
def parse_prediction(completion: str, timeout: int | None = None) -> tuple[Any, ...]:
    """A completion's final answer parsed by math-verify; cached, so the evaluation records' reading of
    what the verifier extracted (copd.capabilities.readings) does not parse the completion again."""
    parse, _ = require_math_verify()
    return tuple(parse(completion, parsing_timeout=timeout))


def math_answer(completion: str, answer: str, **fields: Any) -> float:
    """1 if math-verify finds the completion's final answer (\\boxed{}, "answer is", last
    expression) equal to the reference: 1/2 == 0.5 == \\frac{1}{2}, x^2+1 == 1+x^2, ..."""
    _, verify = require_math_verify()
    timeout = _math_timeout()
    gold = parse_gold(answer, timeout)
    pred = parse_prediction(completion, timeout)
    return 1.0 if gold and pred and verify(list(gold), list(pred), timeout_seconds=timeout) else 0.0


# ------------------------------------------------------------------------------ normalized text

_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_text(text: str) -> str:
    """SQuAD-style: lowercase, drop (unicode) punctuation and articles, collapse whitespace."""
    text = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalized(completion: str, answer: str, **fields: Any) -> float:
    return 1.0 if normalize_text(completion) == normalize_text(answer) else 0.0


# ------------------------------------------------------------------------------ multiple choice

LETTERS = "ABCDE"
_GOLD_LETTER = re.compile(rf"^\W*([{LETTERS}])\W*$", re.IGNORECASE)
# Tier 1: "the answer is B", "Answer: (B)", "answer is option **C**" (letters upper-case only).
_ANSWER_PHRASE = re.compile(
    rf"(?i:answer)(?:\s+is|\s*:)\s*(?:(?i:option)\s*)?[(\[*]*([{LETTERS}])(?![\w'])"
)
# Tier 2: "(B)", "[B]", "B)", "B." or a lone capital; "A" before a lower-case word is an article.
_LONE_LETTER = re.compile(rf"(?<![\w'])([(\[])?([{LETTERS}])(?![\w'])")
_ARTICLE_A = re.compile(r"\s+[a-z]")
_ANSWER_PREFIX = re.compile(r"^\W*(?:the\s+)?(?:final\s+)?answer(?:\s+is|\s*:)\s*", re.IGNORECASE)


def gold_letter(answer: str) -> str | None:
    match = _GOLD_LETTER.match(answer)
    return match.group(1).upper() if match else None


def extract_choice(completion: str) -> str | None:
    """The letter the completion picks: the last "answer is X", else the last lone letter."""
    phrases = _ANSWER_PHRASE.findall(completion)
    if phrases:
        return phrases[-1]
    letters = [
        m.group(2)
        for m in _LONE_LETTER.finditer(completion)
        if m.group(1) or m.group(2) != "A" or not _ARTICLE_A.match(completion, m.end())
    ]
    return letters[-1] if letters else None


def _option_texts(options: Any) -> dict[str, str]:
    if isinstance(options, dict):
        pairs = ((gold_letter(str(k)), v) for k, v in options.items())
        return {k: normalize_text(str(v)) for k, v in pairs if k}
    if isinstance(options, (list, tuple)):
        return {LETTERS[i]: normalize_text(str(v)) for i, v in enumerate(options[: len(LETTERS)])}
    return {}


def choice(completion: str, answer: str, options: Any = None, **fields: Any) -> float:
    """Multiple choice A-E. With a field `options` (list, or dict letter -> text), a last line
    that states an option's text picks that option; otherwise the letter is extracted."""
    want = gold_letter(answer)
    if want is None:
        return 0.0
    lines = [line for line in completion.splitlines() if line.strip()]
    if options is not None and lines:
        stated = normalize_text(_ANSWER_PREFIX.sub("", lines[-1]))
        picked = [k for k, text in _option_texts(options).items() if text and text == stated]
        if picked:
            return 1.0 if want in picked else 0.0
    return 1.0 if extract_choice(completion) == want else 0.0


# ------------------------------------------------------------------------------------- regex

DEFAULT_ANSWER_PATTERN = r"(?i)answer\s*:\s*(.*)"


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CopdError(f"invalid regular expression {pattern!r}: {exc}") from None


def extract_regex(completion: str, answer_pattern: str | None = None) -> str | None:
    """The first group (else the whole) of the last match of `answer_pattern` (default: the text
    after "answer:" on its line), stripped; None when nothing matches."""
    compiled = _compile(answer_pattern or DEFAULT_ANSWER_PATTERN)
    matches = list(compiled.finditer(completion))
    return (matches[-1].group(1 if compiled.groups else 0) or "").strip() if matches else None


def regex(completion: str, answer: str, answer_pattern: str | None = None, **fields: Any) -> float:
    """The answer `extract_regex` finds with `answer_pattern` (a sample field) must equal the
    reference, both stripped."""
    got = extract_regex(completion, answer_pattern)
    return 1.0 if got is not None and got == answer.strip() else 0.0


# ------------------------------------------------------------------------------------ format

DEFAULT_FORMAT = r"\\boxed\{\s*[^}\s]|(?i:answer)\s*:\s*\S"
DEFAULT_FORMAT_WEIGHT = 0.1


def format_reward(completion: str, pattern: str = DEFAULT_FORMAT) -> float:
    """1 if the completion contains `pattern` (default: a final-answer marker, \\boxed{...}
    or "answer: ..."), else 0."""
    return 1.0 if _compile(pattern).search(completion) else 0.0


def with_format(
    verifier: Verifier, weight: float = DEFAULT_FORMAT_WEIGHT, pattern: str = DEFAULT_FORMAT
) -> Verifier:
    """(1 - weight) * verifier + weight * format_reward. A verifier reward outside [0, 1] is
    passed through unchanged so that Capability.score still reports it."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise CopdError(f"format weight must be a number in [0, 1], got {weight!r}")
    _compile(pattern)

    @functools.wraps(verifier, updated=())  # copying __dict__ would freeze e.g. `.failures`
    def combined(completion: str, answer: str, **fields: Any) -> float:
        reward = float(verifier(completion, answer, **fields))
        if not 0.0 <= reward <= 1.0:
            return reward
        return min(1.0, (1 - weight) * reward + weight * format_reward(completion, pattern))

    return combined


TEXT_VERIFIERS: dict[str, Verifier] = {
    "math": math_answer,
    "choice": choice,
    "normalized": normalized,
    "regex": regex,
}

TEXT_ANSWER_CHECKS: dict[str, Callable[[str], str | None]] = {
    "math": lambda a: None if parse_gold(a, _math_timeout()) else "cannot be parsed by math-verify",
    "choice": lambda a: None if gold_letter(a) else f"is not a letter {LETTERS[0]}-{LETTERS[-1]}",
    "normalized": lambda a: None if normalize_text(a) else "is empty once normalised",
}
