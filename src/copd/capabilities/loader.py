"""Turning one capability of the config (a typed CapabilityConfig) into a Capability.

CapabilityConfig (copd.config.schema) is the one schema of a capability: every key, its type,
default and the rules between keys are declared there. A plain dict is validated through it,
so `copd eval --tasks file.jsonl`, tests and run configs all get the same checks and errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from copd.capabilities.builtin import BUILTIN_CAPABILITIES
from copd.capabilities.capability import Capability, did_you_mean
from copd.capabilities.prompt_sources import FileSource
from copd.capabilities.readings import reading_for
from copd.capabilities.rows import FieldMap, TextCheck
from copd.capabilities.tables import read_splits
from copd.capabilities.verifiers import ANSWER_CHECKS, resolve_verifier
from copd.config.loader import error_location
from copd.config.schema import CapabilityConfig
from copd.errors import CopdError
from copd.multimodal.media import VideoSampling

# Training prompts a built-in generates for text_check, beside its whole test split.
GENERATED_CHECKS = 200


def load_capability(spec: CapabilityConfig | Mapping[str, Any], base_dir: Path | None = None,
                    video_sampling: VideoSampling | None = None, text_check: TextCheck | None = None) -> Capability:
    """Build a capability from a CapabilityConfig, or from a dict of its keys
    ({"name", "builtin", **options}, {"name", "path", ...} or {"name", "dataset", ...}).

    Relative paths are resolved against `base_dir` when given (the config file's folder),
    otherwise against the working directory; a `module:function` verifier missing from sys.path
    is looked for there too. Every video of a data file is checked against `video_sampling`
    (the run's model.vision), so one too short fails now. `text_check` (the model's, e.g. the
    alphabet of a built tiny model) is applied to every prompt and answer of a data file, naming
    its row, and to a built-in's test split and GENERATED_CHECKS of its training prompts.
    """
    cap = spec if isinstance(spec, CapabilityConfig) else capability_config(spec)
    if cap.builtin is not None:
        capability = _load_builtin(cap)
        if text_check is not None:
            _check_generated(capability, cap, text_check)
        return capability
    return _load_data(cap, base_dir, video_sampling or VideoSampling(), text_check)


def capability_config(spec: Mapping[str, Any]) -> CapabilityConfig:
    """A dict validated through CapabilityConfig; a built-in's options may sit beside its keys."""
    if not isinstance(spec, Mapping):
        raise CopdError(f"a capability must be a mapping with a 'name' key, got {spec!r}")
    name = spec.get("name")
    label = f"capability {name!r}" if isinstance(name, str) and name else "capability"
    bad = [k for k in spec if not isinstance(k, str)]
    if bad:
        raise CopdError(f"{label}: key {bad[0]!r} is not a string")
    raw = dict(spec)
    if "builtin" in raw and isinstance(raw.get("options", {}), Mapping):
        beside = {k: raw.pop(k) for k in list(raw) if k not in CapabilityConfig.model_fields}
        if beside:
            raw["options"] = {**raw.get("options", {}), **beside}
    try:
        return CapabilityConfig.model_validate(raw)
    except ValidationError as err:
        raise CopdError(_describe(err, label)) from None


def _describe(err: ValidationError, label: str) -> str:
    first = err.errors()[0]
    loc = error_location(first)
    key = ".".join(str(p) for p in loc)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{label}: unknown key {key!r}{did_you_mean(key, CapabilityConfig.model_fields)}"
    if first["type"] == "missing":
        return f"{label}: missing required key {key!r}"
    if message.startswith("capability "):  # the model's own rules name the capability already
        return message
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None or repr(given) in message else f" (got {given!r})"
    return f"{label}: key {key!r}: {message}{shown}" if key else f"{label}: {message}"


def _load_builtin(cap: CapabilityConfig) -> Capability:
    factory = BUILTIN_CAPABILITIES.get(cap.builtin)
    if factory is None:
        raise CopdError(
            f"capability {cap.name!r}: key 'builtin': unknown builtin {cap.builtin!r}"
            f"{did_you_mean(cap.builtin, BUILTIN_CAPABILITIES)}; known: "
            f"{', '.join(sorted(BUILTIN_CAPABILITIES))}"
        )
    try:
        capability = factory(**cap.options)
    except CopdError as exc:
        raise CopdError(f"capability {cap.name!r} (builtin {cap.builtin!r}): {exc}") from None
    return dataclasses.replace(capability, name=cap.name)


def _check_generated(capability: Capability, cap: CapabilityConfig, text_check: TextCheck) -> None:
    """A built-in's prompts and answers against the model's text check (media tasks are left to the modality check)."""
    probe = capability.test_set(1) or capability.train_sampler(0).draw(1)
    if probe[0].images or probe[0].videos:
        return
    for sample in capability.test_set() + capability.train_sampler(0).draw(GENERATED_CHECKS):
        for part, text in (("prompt", sample.prompt), ("answer", sample.answer)):
            problem = text_check(text)
            if problem:
                options = f"options {cap.options}" if cap.options else "its default options"
                raise CopdError(f"capability {cap.name!r}: key 'options': the built-in {cap.builtin!r} with {options} "
                                f"generates the {part} {text!r}: {problem}")


def _load_data(cap: CapabilityConfig, base_dir: Path | None, video_sampling: VideoSampling,
               text_check: TextCheck | None = None) -> Capability:
    try:
        verifier = resolve_verifier(cap.verifier, base_dir)
    except CopdError as exc:
        raise CopdError(f"capability {cap.name!r}: key 'verifier': {exc}") from None
    fields = FieldMap(
        prompt=cap.prompt_field,
        answer=cap.answer_field,
        system=cap.system_field,
        images=cap.images_field,
        videos=cap.videos_field,
        extra=None if cap.fields is None else tuple(cap.fields),
        check=ANSWER_CHECKS.get(cap.verifier),
        text_check=text_check,
        video_sampling=video_sampling,
    )
    train, test = read_splits(cap, fields, base_dir)
    return Capability(cap.name, verifier, FileSource(cap.name, train, test), reading_for(cap.verifier))
