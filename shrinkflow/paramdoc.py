"""The params reference (docs/params.md), generated from the schema's descriptions."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from schemas.params import Params


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.is_required():
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`"


def _variants(annotation: Any) -> list[type[BaseModel]]:
    """The models inside a (possibly Annotated / Union) annotation."""
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found += _variants(arg)
    return found


def _rows(model: type[BaseModel], prefix: str, out: list[str], seen: set[str]) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        subs = _variants(field.annotation)
        doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        if subs and not (len(subs) == 1 and key in seen):
            if len(subs) > 1:
                out.append(f"| `{key}` | one of the variants below | | {doc} |")
            else:
                out.append(f"| `{key}` | section | | {doc} |")
            for sub in subs:
                tag = next((f for f in ("method", "source", "arch", "name", "mode") if f in sub.model_fields), None)
                label = f"{key} ({tag}: {sub.model_fields[tag].annotation.__args__[0]})" if tag and len(subs) > 1 else key
                seen.add(label)
                if len(subs) > 1:
                    out.append(f"| *{label}* | | | |")
                _rows(sub, f"{key}.", out, seen)
        else:
            out.append(f"| `{key}` | | {_default(field)} | {doc} |")


def params_reference() -> str:
    """Markdown table of every params.yaml key with its default and description."""
    out = [
        "# params.yaml reference",
        "",
        "Generated from the schema (`shrinkflow params-doc`); the same text is in `shrinkflow schema`.",
        "Keys of a variant apply when its `method` / `source` / `arch` / `name` is chosen.",
        "",
        "| key | kind | default | description |",
        "|---|---|---|---|",
    ]
    _rows(Params, "", out, set())
    return "\n".join(out) + "\n"
