"""Built-in procedural capabilities: tiny, exactly verifiable tasks for small char-level models."""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from copd.capabilities.capability import Capability, Sample, merge_options
from copd.capabilities.prompt_sources import ProceduralSource
from copd.capabilities.readings import READINGS
from copd.capabilities.verifiers import exact
from copd.errors import CopdError

# Every character a built-in prompt or answer may contain; the char tokenizer is built from it.
CHAR_ALPHABET = string.digits + string.ascii_lowercase + "+=:? "

# Options every built-in accepts.
COMMON_DEFAULTS: dict[str, Any] = {"test_size": 200}


def _addition(rng: random.Random, o: dict[str, Any]) -> Sample:
    hi = 10 ** o["digits"] - 1
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    return Sample(f"{a}+{b}=", str(a + b))


def _word(rng: random.Random, o: dict[str, Any]) -> str:
    length = rng.randint(o["min_len"], o["max_len"])
    return "".join(rng.choice(o["letters"]) for _ in range(length))


def _reversal(rng: random.Random, o: dict[str, Any]) -> Sample:
    word = _word(rng, o)
    return Sample(f"rev:{word}=", word[::-1])


def _sort(rng: random.Random, o: dict[str, Any]) -> Sample:
    word = _word(rng, o)
    return Sample(f"sort:{word}=", "".join(sorted(word)))


def _count(rng: random.Random, o: dict[str, Any]) -> Sample:
    letter = rng.choice(o["letters"])
    word = _word(rng, o)
    return Sample(f"count {letter}:{word}=", str(word.count(letter)))


def _check_digits(o: dict[str, Any]) -> None:
    if o["digits"] < 1:
        raise CopdError(f"option 'digits' must be >= 1, got {o['digits']}")


def _check_word(o: dict[str, Any]) -> None:
    letters = o["letters"]
    # Letters must stay inside CHAR_ALPHABET, and no separator characters may sneak into words.
    if not letters or not set(letters) <= set(string.ascii_lowercase):
        raise CopdError(f"option 'letters' must be non-empty lowercase a-z, got {letters!r}")
    if not 1 <= o["min_len"] <= o["max_len"]:
        raise CopdError(
            f"options 'min_len'/'max_len' need 1 <= min_len <= max_len, "
            f"got {o['min_len']}/{o['max_len']}"
        )


@dataclass(frozen=True)
class _Kind:
    defaults: dict[str, Any]
    generate: Callable[[random.Random, dict[str, Any]], Sample]
    check: Callable[[dict[str, Any]], None]


_KINDS: dict[str, _Kind] = {
    "addition": _Kind({"digits": 2}, _addition, _check_digits),
    "reversal": _Kind({"min_len": 3, "max_len": 5, "letters": "abcdef"}, _reversal, _check_word),
    "sort": _Kind({"min_len": 3, "max_len": 5, "letters": "abcdef"}, _sort, _check_word),
    "count": _Kind({"min_len": 4, "max_len": 8, "letters": "abcd"}, _count, _check_word),
}


def _options(kind: _Kind, given: dict[str, Any]) -> dict[str, Any]:
    """Merge user options over the defaults, rejecting unknown keys and wrong types."""
    opts = merge_options({**COMMON_DEFAULTS, **kind.defaults}, given)
    if opts["test_size"] < 1:
        raise CopdError(f"option 'test_size' must be >= 1, got {opts['test_size']}")
    kind.check(opts)
    return opts


def _factory(name: str, kind: _Kind) -> Callable[..., Capability]:
    def make(**options: Any) -> Capability:
        opts = _options(kind, options)
        generate = functools.partial(kind.generate, o=opts)
        return Capability(name, exact, ProceduralSource(name, generate, opts["test_size"]), READINGS["exact"])

    make.__name__ = f"make_{name}"
    return make


BUILTIN_CAPABILITIES: dict[str, Callable[..., Capability]] = {
    name: _factory(name, kind) for name, kind in _KINDS.items()
}

# Natural-language tasks for pretrained models (not limited to CHAR_ALPHABET).
from copd.capabilities.language import LANGUAGE_CAPABILITIES  # noqa: E402

BUILTIN_CAPABILITIES.update(LANGUAGE_CAPABILITIES)

# Image and video tasks for vision-language models.
from copd.capabilities.visual import VISUAL_CAPABILITIES  # noqa: E402

BUILTIN_CAPABILITIES.update(VISUAL_CAPABILITIES)
