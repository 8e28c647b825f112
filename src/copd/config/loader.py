"""Load a Config from YAML plus `key.sub=value` overrides, with one-line errors.

Errors name the file, the YAML line when known, the dotted key, and for a mistyped key
the nearest valid key. A mistake in a value or key given as an override is blamed on the
command line (`command line: KEY=VALUE: ...`), not on the YAML line of that key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from copd.config.schema import Config, KeyProblem
from copd.errors import CopdError


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CopdError(f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise CopdError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise CopdError(f"{path}: the top level must be a mapping of sections")
    overridden = {apply_override(raw, item): item for item in overrides or []}
    return validate_config(raw, source=str(path), lines=_key_lines(text), overridden=overridden)


def validate_config(raw: dict[str, Any], source: str = "<config>", lines: dict | None = None,
                    overridden: dict[tuple, str] | None = None) -> Config:
    """`overridden` maps the key path of each command-line override to the override as typed."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise CopdError(describe_error(err, source, lines or {}, overridden=overridden)) from None


def apply_override(raw: dict[str, Any], item: str) -> tuple:
    """Apply `a.b.c=value` to the nested dict; list items are addressed by index (branches.0.beta).

    Returns the key path it set, list indices as ints, as the error locations of validation name it."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise CopdError(f"override {item!r} must look like key.sub=value")
    parts = key.split(".")
    node: Any = raw
    path: list[str | int] = []
    for i, part in enumerate(parts[:-1]):
        node, step = _child(node, part, parts[: i + 1])
        path.append(step)
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise CopdError(f"override key {key!r}: {'.'.join(parts[:-1])} is not a section")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as err:
        raise CopdError(f"command line: {item}: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
    if isinstance(node, list):
        index = _index(node, last, parts)
        node[index] = parsed
        return (*path, index)
    node[last] = parsed
    return (*path, last)


def _child(node: Any, part: str, trail: list[str]) -> tuple[Any, str | int]:
    """The section `part` of `node` (made when missing) and its step in the key path."""
    if isinstance(node, list):
        index = _index(node, part, trail)
        return node[index], index
    if not isinstance(node, dict):
        raise CopdError(f"override key {'.'.join(trail)!r}: {'.'.join(trail[:-1])} is not a section")
    return node.setdefault(part, {}), part


def _index(node: list, part: str, trail: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise CopdError(f"override key {'.'.join(trail)!r}: expected an index below {len(node)}")
    return int(part)


def error_location(error: dict) -> tuple:
    """Where a pydantic error points, extended by the key a KeyProblem names below it."""
    loc = tuple(error["loc"])
    problem = (error.get("ctx") or {}).get("error")
    return loc + problem.loc if isinstance(problem, KeyProblem) else loc


def describe_error(err: ValidationError, source: str, lines: dict | None = None, model: type[BaseModel] = Config,
                   overridden: dict[tuple, str] | None = None) -> str:
    """One line: `source:line: key: message` (or `command line: KEY=VALUE: ...` for an override's
    mistake), the nearest valid key for an unknown one."""
    lines = lines or {}
    first = err.errors()[0]
    loc = error_location(first)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    line = lines.get(loc) or lines.get(loc[:-1])
    where = f"{source}:{line}" if line else source
    override = _override_at(loc, overridden or {}, lines)
    if override is not None:
        where = f"command line: {override}"
    if first["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1], model)
        near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), near[0]])!r}?" if near else f"; valid keys: {', '.join(valid)}"
        return f"{where}: unknown key {dotted!r}{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"{where}: missing required key {dotted!r}"
    if override is not None and override.partition("=")[0] == dotted:
        return f"{where}: {message}"  # the override shows the key and the value already
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None or repr(given) in message else f" (got {given!r})"
    return f"{where}: {dotted}: {message}{shown}"


def _override_at(loc: tuple, overridden: dict[tuple, str], lines: dict) -> str | None:
    """The last override that set the key at `loc` or a section above it, or a key below it in a
    section the YAML file does not have (schedule.cycels.x=1 made `cycels`); None when the file is to blame."""
    found = None
    for path, item in overridden.items():
        if path == loc[: len(path)] or (loc and loc == path[: len(loc)] and loc not in lines):
            found = item
    return found


def _fields_at(loc: tuple, model: type[BaseModel] = Config) -> list[str]:
    """The valid field names of the config section at `loc` (list indices are skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        inner = _model_type(field.annotation)
        if inner is None:
            break
        model = inner
    return list(model.model_fields)


def _model_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_type(arg)
        if found is not None:
            return found
    return None


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path (with list indices) of a YAML document to its 1-based line."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    found: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                here = (*path, key_node.value)
                found[here] = key_node.start_mark.line + 1
                walk(value_node, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return found


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False))
