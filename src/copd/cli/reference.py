"""The config reference page of the docs, generated from the config models (the single source of truth).

`python -m copd.cli.reference [PAGE]` rewrites the part of PAGE (default: docs/config-reference.md,
the page of the documentation site) between the markers; a test fails when the page is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from copd.config.loader import _model_type
from copd.config.schema import Config

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"
PAGE = "docs/config-reference.md"


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{value}`"
    return "required" if field.default is PydanticUndefined else f"`{field.default}`"


def _type_name(annotation) -> str:
    if get_origin(annotation) is Literal:
        return " / ".join(map(str, get_args(annotation)))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("Literal", "one of ")


def _row(*cells: str) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def registered() -> dict[str, str]:
    """Keys whose names are kept in a registry above the config: the names, read from the registry itself."""
    from copd.capabilities.verifiers import VERIFIERS

    return {"capabilities.verifier": f"registered: {', '.join(VERIFIERS)}"}


def config_reference() -> str:
    lines, listed = [], registered()
    for section, field in Config.model_fields.items():
        model = _model_type(field.annotation)
        kind = "list of" if "list" in str(field.annotation) else "section"
        lines += [f"**`{section}`** ({kind} {model.__name__})" + (f": {model.__doc__.strip()}" if model.__doc__ else ""), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, sub in model.model_fields.items():
            inner = _model_type(sub.annotation)
            if inner is not None:
                for leaf, leaf_field in inner.model_fields.items():
                    lines.append(_row(f"`{section}.{name}.{leaf}`", _type_name(leaf_field.annotation), _default(leaf_field),
                                      leaf_field.description or ""))
                continue
            meaning = "; ".join(part for part in (sub.description, listed.get(f"{section}.{name}")) if part)
            lines.append(_row(f"`{section}.{name}`", _type_name(sub.annotation), _default(sub), meaning))
        lines.append("")
    return "\n".join(lines)


def update_page(path: Path) -> bool:
    """Rewrite the reference between the markers; True when the file changed."""
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n{config_reference()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    print("updated" if update_page(Path(sys.argv[1] if len(sys.argv) > 1 else PAGE)) else "up to date")
