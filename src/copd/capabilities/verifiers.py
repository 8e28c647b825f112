"""Reward functions: verifier(completion, answer, **fields) -> float in [0, 1].

A capability's `verifier:` string is one of
  NAME               a registry verifier: exact, numeric, math (needs math-verify), choice,
                     normalized, regex (sample field `answer_pattern`); see verifiers_text.py
  module:function    a user function: the module is imported from sys.path, else from the
                     config file's folder, else from the working directory; sample fields it
                     does not declare are dropped
  SPEC+format        SPEC mixed with a format reward: (1 - W) * SPEC + W * [the completion has
  SPEC+format:W      a final-answer marker, \\boxed{...} or "answer: ..."], W = 0.1 by default
e.g. "math+format", "exact+format:0.2", "my_rewards:score+format". A verifier that raises
scores 0.0 instead of stopping training (see safe_verifier); a reward outside [0, 1] is
still an error in Capability.score.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import math
import re
import sys
from collections.abc import Callable
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any

from copd.capabilities.capability import Verifier, did_you_mean
from copd.capabilities.verifiers_text import (
    DEFAULT_FORMAT_WEIGHT,
    TEXT_ANSWER_CHECKS,
    TEXT_VERIFIERS,
    require_math_verify,
    with_format,
)
from copd.errors import CopdError

logger = logging.getLogger("copd.verifiers")

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


VERIFIERS: dict[str, Verifier] = {"exact": exact, "numeric": numeric, **TEXT_VERIFIERS}
# Checked when a verifier is resolved, so that a missing package is a config error.
_REQUIREMENTS: dict[str, Callable[[], object]] = {"math": require_math_verify}


class _ChecksBySpec(dict[str, Callable[[str], str | None]]):
    """Looks a spec up by its base name, so "numeric+format:0.2" keeps the numeric check."""

    def get(self, spec: Any, default: Any = None) -> Any:
        return super().get(_split_spec(spec)[0], default) if isinstance(spec, str) else default


# Load-time checks of a dataset's answers, per verifier, so that a bad answer is reported with
# its file and line instead of silently scoring 0 during training. None means "answer is fine".
ANSWER_CHECKS: dict[str, Callable[[str], str | None]] = _ChecksBySpec(
    numeric=lambda a: None if _as_float(a) is not None else "is not a number",
    **TEXT_ANSWER_CHECKS,
)


class SafeVerifier:
    """A verifier whose exceptions score 0.0: counted in `.failures`, the first one logged with
    its traceback (logger "copd.verifiers"). Out-of-range rewards are returned unchanged."""

    def __init__(self, fn: Verifier, name: str) -> None:
        functools.update_wrapper(self, fn)
        self.fn, self.name, self.failures = fn, name, 0

    def __call__(self, completion: str, answer: str, **fields: Any) -> float:
        try:
            return float(self.fn(completion, answer, **fields))
        except Exception:
            self.failures += 1
            if self.failures == 1:
                logger.warning(
                    "verifier %r raised; scoring 0.0 (later failures are only counted)",
                    self.name,
                    exc_info=True,
                )
            return 0.0


def safe_verifier(fn: Verifier, name: str) -> SafeVerifier:
    return SafeVerifier(fn, name)


def resolve_verifier(spec: str, config_dir: Path | None = None) -> Verifier:
    """A verifier spec (see the module docstring), wrapped by safe_verifier.

    A `module:function` module that sys.path lacks is looked for in `config_dir` (the folder of
    the config file that names it), then in the working directory."""
    if not isinstance(spec, str):
        raise CopdError(f"verifier must be a string, got {spec!r}")
    base, modifier = _split_spec(spec)
    verifier = safe_verifier(_resolve_base(base, config_dir), base)
    return verifier if modifier is None else with_format(verifier, _format_weight(spec, modifier))


def _split_spec(spec: str) -> tuple[str, str | None]:
    """ "math+format:0.2" -> ("math", "format:0.2"); "math" -> ("math", None)."""
    base, plus, modifier = spec.rpartition("+")
    return (base, modifier) if plus else (spec, None)


def _format_weight(spec: str, modifier: str) -> float:
    name, colon, value = modifier.partition(":")
    if name != "format":
        raise CopdError(
            f"verifier {spec!r}: unknown modifier {name!r}{did_you_mean(name, ['format'])}; "
            "expected NAME+format or NAME+format:WEIGHT"
        )
    if not colon:
        return DEFAULT_FORMAT_WEIGHT
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not 0 <= weight <= 1:
        raise CopdError(f"verifier {spec!r}: format weight must be in [0, 1], got {value!r}")
    return weight


def _resolve_base(spec: str, config_dir: Path | None) -> Verifier:
    if ":" in spec:
        return _import_verifier(spec, config_dir)
    if spec in VERIFIERS:
        if spec in _REQUIREMENTS:
            _REQUIREMENTS[spec]()
        return VERIFIERS[spec]
    raise CopdError(
        f"unknown verifier {spec!r}{did_you_mean(spec, VERIFIERS)}; use one of "
        f"{', '.join(sorted(VERIFIERS))}, 'module:function', optionally followed by '+format'"
    )


def _import_verifier(spec: str, config_dir: Path | None) -> Verifier:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise CopdError(f"verifier {spec!r}: expected the form 'module:function'")
    folders = _user_folders(config_dir)
    try:
        module = _import_user_module(module_name, [path for path, _ in folders])
    except ModuleNotFoundError as exc:
        if not _names_the_module(exc, module_name):  # the module was found, something it imports was not
            raise CopdError(f"verifier {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
        raise CopdError(f"verifier {spec!r}: cannot import module {module_name!r}: {_not_found(exc.name, folders)}") from None
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


def _user_folders(config_dir: Path | None) -> list[tuple[Path, str]]:
    """Where a user module missing from sys.path is looked for, labelled for errors: the config's folder, the working directory."""
    folders = [(Path(config_dir).resolve(), "the config's folder")] if config_dir is not None else []
    cwd = Path.cwd().resolve()
    return folders + ([(cwd, "the working directory")] if cwd not in [path for path, _ in folders] else [])


def _import_user_module(module_name: str, folders: list[Path]) -> Any:
    """importlib.import_module, falling back to the first of `folders` that holds the top-level
    package or module. That folder is on sys.path only while the module imports (its own imports
    of sibling modules resolve there too); a package keeps finding its submodules through its __path__."""
    top = module_name.split(".")[0]
    if top in sys.modules or importlib.util.find_spec(top) is not None:
        return importlib.import_module(module_name)
    importlib.invalidate_caches()  # a module written since the last import (its folder's listing is cached)
    folder = next((f for f in folders if PathFinder.find_spec(top, [str(f)]) is not None), None)
    if folder is None:
        raise ModuleNotFoundError(f"No module named {top!r}", name=top)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(folder))


def _not_found(missing: str, folders: list[tuple[Path, str]]) -> str:
    """Where copd looked for a missing module, or where the package that lacks it lives."""
    parent, _, leaf = missing.rpartition(".")
    if parent:
        folder = next(iter(getattr(sys.modules.get(parent), "__path__", None) or []), "?")
        return f"package {parent!r} ({folder}) has no module {leaf!r}"
    looked = ", ".join(f"{label} {path}" for path, label in folders)
    return f"no module {missing!r} in {looked} or on sys.path; put it in {folders[0][1]}, or add its folder to PYTHONPATH"


def _names_the_module(exc: ModuleNotFoundError, module_name: str) -> bool:
    """Whether the missing module is `module_name` or a package above it (not one it imports)."""
    parts = module_name.split(".")
    return exc.name in {".".join(parts[: i + 1]) for i in range(len(parts))}


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
