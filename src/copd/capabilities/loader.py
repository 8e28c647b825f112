"""Turning one capability entry of the user's config into a Capability."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from copd.errors import CopdError
from copd.capabilities.builtin import BUILTIN_CAPABILITIES
from copd.capabilities.core import Capability, did_you_mean
from copd.capabilities.rows import RESERVED_FIELDS, FieldMap
from copd.capabilities.sources import FileSource
from copd.capabilities.tables import read_splits
from copd.capabilities.verifiers import ANSWER_CHECKS, resolve_verifier

_STR_OR_NONE = (str, type(None))
# Optional keys of a file (`path`) or `dataset` capability, with defaults and accepted types.
_DATA_OPTIONS: dict[str, tuple[Any, type | tuple[type, ...]]] = {
    "test_path": (None, _STR_OR_NONE),
    "test_ratio": (0.1, (int, float)),
    "verifier": ("exact", str),
    "prompt_field": ("prompt", str),
    "answer_field": ("answer", str),
    "system_field": (None, _STR_OR_NONE),
    "images_field": (None, _STR_OR_NONE),
    "videos_field": (None, _STR_OR_NONE),
    "fields": (None, (list, type(None))),
    "split_seed": (0, int),
}
# Keys only a `dataset` source has: a single file has no configs or named splits.
_DATASET_OPTIONS: dict[str, tuple[Any, type | tuple[type, ...]]] = {
    "dataset_config": (None, _STR_OR_NONE),
    "split": ("train", str),
    "test_split": (None, _STR_OR_NONE),
}


def load_capability(spec: Mapping[str, Any], base_dir: Path | None = None) -> Capability:
    """Build a capability from {"name", "builtin", **options}, {"name", "path", ...} or
    {"name", "dataset", ...} (a `datasets.load_dataset` source).

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
        raise CopdError(
            f"capability {name!r}: give exactly one of the keys 'builtin', 'path' or 'dataset'"
        )
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


def _data_options(name: str, spec: Mapping[str, Any], kind: str) -> dict[str, Any]:
    own = {**_DATA_OPTIONS, **(_DATASET_OPTIONS if kind == "dataset" else {})}
    allowed = {"name", kind, *own}
    for key in spec:
        if key in _DATASET_OPTIONS and key not in allowed:
            raise CopdError(
                f"capability {name!r}: key {key!r} needs key 'dataset' instead of 'path' "
                "(a file has no configs or splits)"
            )
        if key not in allowed:
            raise CopdError(
                f"capability {name!r}: unknown key {key!r}{did_you_mean(key, allowed)}"
            )
    opts = {k: spec.get(k, default) for k, (default, _) in own.items()}
    opts[kind] = spec[kind]
    types = {kind: str, **{k: t for k, (_, t) in own.items()}}
    for key, want in types.items():
        if not isinstance(opts[key], want) or isinstance(opts[key], bool):
            raise CopdError(f"capability {name!r}: key {key!r} has the wrong type: {opts[key]!r}")
        if opts[key] == "":
            raise CopdError(f"capability {name!r}: key {key!r} is empty")
    _check_fields(name, opts["fields"])
    given = [k for k in ("test_path", "test_split", "test_ratio") if spec.get(k) is not None]
    if len(given) > 1:
        raise CopdError(f"capability {name!r}: give key {given[0]!r} or {given[1]!r}, not both")
    if not 0 <= opts["test_ratio"] < 1:
        raise CopdError(
            f"capability {name!r}: key 'test_ratio' must be in [0, 1), got {opts['test_ratio']}"
        )
    return opts


def _check_fields(name: str, fields: list[Any] | None) -> None:
    for item in fields or []:
        if not isinstance(item, str) or not item:
            raise CopdError(
                f"capability {name!r}: key 'fields' must be a list of column names, got {item!r}"
            )
        if item in RESERVED_FIELDS:
            raise CopdError(
                f"capability {name!r}: key 'fields': {item!r} is reserved (the verifier is "
                f"called as verifier(completion, answer, **fields))"
            )


def _load_data(name: str, spec: Mapping[str, Any], base_dir: Path | None) -> Capability:
    kind = "path" if "path" in spec else "dataset"
    opts = _data_options(name, spec, kind)
    try:
        verifier = resolve_verifier(opts["verifier"])
    except CopdError as exc:
        raise CopdError(f"capability {name!r}: key 'verifier': {exc}") from None
    fields = FieldMap(
        prompt=opts["prompt_field"],
        answer=opts["answer_field"],
        system=opts["system_field"],
        images=opts["images_field"],
        videos=opts["videos_field"],
        extra=None if opts["fields"] is None else tuple(opts["fields"]),
        check=ANSWER_CHECKS.get(opts["verifier"]),
    )
    train, test = read_splits(name, kind, opts, fields, base_dir)
    return Capability(name, verifier, FileSource(name, train, test))


_LOADERS: dict[str, Callable[[str, Mapping[str, Any], Path | None], Capability]] = {
    "builtin": _load_builtin,
    "path": _load_data,
    "dataset": _load_data,
}

def capability_spec(cap) -> dict:
    """The plain dict `load_capability` reads, from a typed CapabilityConfig."""
    if cap.builtin is not None:
        return {"name": cap.name, "builtin": cap.builtin, **cap.options}
    # Unset optional keys are left out; `split` only applies to a `dataset` source.
    spec = cap.model_dump(exclude={"builtin", "options"}, exclude_none=True)
    if cap.dataset is None:
        spec.pop("split")
    if cap.test_path is not None or cap.test_split is not None:
        spec.pop("test_ratio")
    return spec
