"""Turning one capability entry of the user's config into a Capability."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from copd.errors import CopdError
from copd.tasks.builtin import BUILTIN_CAPABILITIES
from copd.tasks.core import Capability, did_you_mean
from copd.tasks.jsonl import read_jsonl, split_by_prompt
from copd.tasks.sources import FileSource
from copd.tasks.verifiers import ANSWER_CHECKS, resolve_verifier

# Optional keys of a JSONL capability, with their defaults and accepted types.
_JSONL_OPTIONS: dict[str, tuple[Any, type | tuple[type, ...]]] = {
    "test_path": (None, (str, type(None))),
    "test_ratio": (0.1, (int, float)),
    "verifier": ("exact", str),
    "prompt_field": ("prompt", str),
    "answer_field": ("answer", str),
    "split_seed": (0, int),
}


def load_capability(spec: Mapping[str, Any], base_dir: Path | None = None) -> Capability:
    """Build a capability from {"name", "builtin", **options} or {"name", "path", ...}.

    Relative paths are resolved against `base_dir` when given (the config file's folder),
    otherwise against the working directory.
    """
    if not isinstance(spec, Mapping):
        raise CopdError(f"a capability must be a mapping with a 'name' key, got {spec!r}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise CopdError(f"capability {dict(spec)!r}: key 'name' must be a non-empty string")
    bad = [k for k in spec if not isinstance(k, str)]
    if bad:
        raise CopdError(f"capability {name!r}: key {bad[0]!r} is not a string")
    kinds = [k for k in _LOADERS if k in spec]
    if len(kinds) != 1:
        raise CopdError(f"capability {name!r}: give exactly one of the keys 'builtin' or 'path'")
    return _LOADERS[kinds[0]](name, spec, base_dir)


def _load_builtin(name: str, spec: Mapping[str, Any], base_dir: Path | None) -> Capability:
    builtin = spec["builtin"]
    factory = BUILTIN_CAPABILITIES.get(builtin) if isinstance(builtin, str) else None
    if factory is None:
        raise CopdError(
            f"capability {name!r}: key 'builtin': unknown builtin {builtin!r}"
            f"{did_you_mean(builtin, BUILTIN_CAPABILITIES)}; known: "
            f"{', '.join(sorted(BUILTIN_CAPABILITIES))}"
        )
    options = {k: v for k, v in spec.items() if k not in ("name", "builtin")}
    try:
        capability = factory(**options)
    except CopdError as exc:
        raise CopdError(f"capability {name!r} (builtin {builtin!r}): {exc}") from None
    return dataclasses.replace(capability, name=name)


def _jsonl_options(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"name", "path", *_JSONL_OPTIONS}
    for key in spec:
        if key not in allowed:
            raise CopdError(
                f"capability {name!r}: unknown key {key!r}{did_you_mean(key, allowed)}"
            )
    opts = {k: spec.get(k, default) for k, (default, _) in _JSONL_OPTIONS.items()}
    opts["path"] = spec["path"]
    types = {"path": str, **{k: t for k, (_, t) in _JSONL_OPTIONS.items()}}
    for key, want in types.items():
        if not isinstance(opts[key], want) or isinstance(opts[key], bool):
            raise CopdError(f"capability {name!r}: key {key!r} has the wrong type: {opts[key]!r}")
    if opts["test_path"] is not None and "test_ratio" in spec:
        raise CopdError(f"capability {name!r}: give key 'test_path' or 'test_ratio', not both")
    if not 0 <= opts["test_ratio"] < 1:
        raise CopdError(
            f"capability {name!r}: key 'test_ratio' must be in [0, 1), got {opts['test_ratio']}"
        )
    return opts


def _load_jsonl(name: str, spec: Mapping[str, Any], base_dir: Path | None) -> Capability:
    opts = _jsonl_options(name, spec)
    try:
        verifier = resolve_verifier(opts["verifier"])
    except CopdError as exc:
        raise CopdError(f"capability {name!r}: key 'verifier': {exc}") from None
    check = ANSWER_CHECKS.get(opts["verifier"])
    fields = (opts["prompt_field"], opts["answer_field"], check)
    path = _resolve(opts["path"], base_dir)
    samples = read_jsonl(path, *fields)
    if opts["test_path"] is None:
        train, test = split_by_prompt(samples, opts["test_ratio"], opts["split_seed"], path)
    else:
        train, test = samples, read_jsonl(_resolve(opts["test_path"], base_dir), *fields)
    return Capability(name, verifier, FileSource(name, train, test))


def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


_LOADERS: dict[str, Callable[[str, Mapping[str, Any], Path | None], Capability]] = {
    "builtin": _load_builtin,
    "path": _load_jsonl,
}
