"""Reward functions: verifier(completion, answer, **fields) -> float in [0, 1]."""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

from copd.errors import CopdError
from copd.tasks.core import Verifier, did_you_mean

# Thousands separators ("1,234.5") are accepted; "1,2,3" reads as separate numbers.
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def exact(completion: str, answer: str, **fields: Any) -> float:
    return 1.0 if completion.strip() == answer.strip() else 0.0


def parse_last_number(text: str) -> float | None:
    """The last number written in `text` (models tend to state the answer last), or None."""
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


def _as_float(text: str) -> float | None:
    try:
        return float(text.strip().replace(",", ""))
    except ValueError:
        return None


def numeric(completion: str, answer: str, **fields: Any) -> float:
    got, want = parse_last_number(completion), _as_float(answer)
    if got is None or want is None:
        return 0.0
    return 1.0 if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9) else 0.0


VERIFIERS: dict[str, Verifier] = {"exact": exact, "numeric": numeric}

# Load-time checks of a dataset's answers, per verifier, so that a bad answer is reported with
# its file and line instead of silently scoring 0 during training. None means "answer is fine".
ANSWER_CHECKS: dict[str, Callable[[str], str | None]] = {
    "numeric": lambda a: None if _as_float(a) is not None else "is not a number",
}


def resolve_verifier(spec: str) -> Verifier:
    """A registry name ("exact", "numeric") or "module:function" importable from sys.path."""
    if not isinstance(spec, str):
        raise CopdError(f"verifier must be a string, got {spec!r}")
    if ":" not in spec:
        if spec in VERIFIERS:
            return VERIFIERS[spec]
        raise CopdError(
            f"unknown verifier {spec!r}{did_you_mean(spec, VERIFIERS)}; use one of "
            f"{', '.join(sorted(VERIFIERS))} or 'module:function'"
        )
    return _import_verifier(spec)


def _import_verifier(spec: str) -> Verifier:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise CopdError(f"verifier {spec!r}: expected the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is a config problem
        raise CopdError(
            f"verifier {spec!r}: cannot import module {module_name!r} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise CopdError(
            f"verifier {spec!r}: module {module_name!r} has no attribute {attr!r}"
            f"{did_you_mean(attr, names)}"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise CopdError(f"verifier {spec!r}: {attr!r} is a {type(fn).__name__}, not callable")
    return _tolerate_extra_fields(fn)


def _tolerate_extra_fields(fn: Callable[..., Any]) -> Verifier:
    """Drop sample fields the user function does not declare, so datasets may carry extras."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass through untouched
        return fn
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn
    accepted = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }

    @functools.wraps(fn)
    def wrapper(completion: str, answer: str, **fields: Any) -> float:
        return fn(completion, answer, **{k: v for k, v in fields.items() if k in accepted})

    return wrapper
