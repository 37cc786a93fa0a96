"""The README's resource field table, generated from the models in `api`."""

from __future__ import annotations

import types
import typing
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from vllm_operator.api import VLLMModelSpec

BEGIN = "<!-- BEGIN GENERATED FIELDS (vllm-operator docs) -->"
END = "<!-- END GENERATED FIELDS -->"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The resource model inside an annotation (Optional[X], list[X] ...), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _type_name(args[0])
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "object"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    builtin = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return builtin.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined or value is None or value in ("", [], {}):
        return ""
    if isinstance(value, BaseModel):
        return ""
    return f"`{value}`"


def rows(model: type[BaseModel], prefix: str = "spec") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        doc = " ".join((field.description or "").split()).replace("|", "\\|")
        out.append(f"| `{path}` | {_type_name(field.annotation)} | {_default(field)} | {doc} |")
        nested = _model_of(field.annotation)
        if nested is not None:
            suffix = "[]" if get_origin(field.annotation) is list else ""
            out.extend(rows(nested, path + suffix))
    return out


def field_table() -> str:
    header = ["| field | type | default | description |", "|---|---|---|---|"]
    return "\n".join([BEGIN, *header, *rows(VLLMModelSpec), END])


def splice(readme: str) -> str:
    """README text with the generated table put between its markers."""
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    return readme[:start] + field_table() + readme[end:]
