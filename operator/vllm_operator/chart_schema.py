"""The Helm chart's JSON schema of its `settings` values, generated from `OperatorSettings`.

The chart turns each key `fooBar` under `settings` into the variable VLLM_OPERATOR_FOO_BAR
(templates/deployment.yaml: `snakecase | upper`), which `OperatorSettings.from_env` reads. With
the schema generated from the same fields, `helm install` refuses a value with the bounds and
patterns the operator would apply when it starts, and the two cannot disagree.
"""

from __future__ import annotations

import json
import re
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.alias_generators import to_camel, to_snake
from pydantic.fields import FieldInfo

from vllm_operator.api import ContainerResources
from vllm_operator.settings import OperatorSettings

# Set by the chart itself, never under `settings` (templates/deployment.yaml): the router's
# Service URL, and the router token and admin key from the generated Secret.
CHART_OWNED = frozenset({"router_url", "router_token", "admin_key"})

# Kubernetes' resource.Quantity ("500m", "1Gi", "1e3"), looser than api.QUANTITY_PATTERN, which
# is for sizes only; the same as the schema of the chart's own `resources` values.
RESOURCE_QUANTITY_PATTERN = r"^[+]?[0-9.]+([eE][-+]?[0-9]+)?(m|[KMGTPE]i?|k)?$"

# Keywords of pydantic's schema of a plain field that draft-07 reads the same way, in the order
# they are written. Anything else (anyOf for an Optional, $ref for a model ...) is refused, not
# passed on half-right.
_KEYWORDS = (
    "type",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
)
_DROPPED = {"title", "default", "description"}
# `^(Always|IfNotPresent|Never)$`: a choice of plain words, written as an enum so that Helm's
# message lists the allowed values (a field is a str with a pattern for from_env's sake).
_WORD_CHOICE = re.compile(r"\^\((?P<words>[A-Za-z0-9]+(\|[A-Za-z0-9]+)*)\)\$")


def container_resources_schema() -> dict[str, Any]:
    """A container's `resources`: requests and limits map a resource name to a quantity.

    The keys are those `api.ContainerResources` accepts; the quantities are checked here because
    the operator passes them to the API server unchecked.
    """

    def quantities() -> dict[str, Any]:
        quantity = [
            {"type": "string", "pattern": RESOURCE_QUANTITY_PATTERN},
            {"type": "number", "minimum": 0},
        ]
        return {"type": "object", "additionalProperties": {"anyOf": quantity}}

    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "requests": quantities(),
            "limits": quantities(),
            "claims": {"type": "array", "items": {"type": "object"}},
        },
    }


def _is_container_resources(field: FieldInfo) -> bool:
    annotated = list(get_args(ContainerResources))  # [dict[str, Any], its validator]
    return [field.annotation, *field.metadata] == annotated


def _description(field: FieldInfo) -> str:
    """The field's docstring on one line (pydantic keeps a multi-line docstring's breaks)."""
    return " ".join((field.description or "").split())


def _field_schema(name: str, field: FieldInfo, generated: dict[str, Any]) -> dict[str, Any]:
    """One key's schema from pydantic's schema of the field (`generated`), in draft-07 terms."""
    if _is_container_resources(field):
        out = container_resources_schema()
    else:
        unknown = set(generated) - set(_KEYWORDS) - _DROPPED
        if unknown or "type" not in generated:
            raise ValueError(
                f"{name}: the chart's schema cannot express {sorted(unknown) or 'an untyped field'}; "
                "give the field a plain type (str, int, float, bool) or teach chart_schema its schema"
            )
        schema = dict(generated)
        choice = _WORD_CHOICE.fullmatch(schema.get("pattern", ""))
        if choice and "enum" not in schema:
            schema["enum"] = choice["words"].split("|")
            del schema["pattern"]
        out = {key: schema[key] for key in _KEYWORDS if key in schema}
    description = _description(field)
    if description:
        out["description"] = description
    return out


def settings_values_schema(model: type[BaseModel] = OperatorSettings) -> dict[str, Any]:
    """The draft-07 schema of the chart's `settings`: one camelCase key per field of `model`.

    Fields in CHART_OWNED are left out, so `additionalProperties: false` refuses them.
    """
    generated = model.model_json_schema(mode="validation")["properties"]
    properties: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name in CHART_OWNED:
            continue
        key = to_camel(name)
        # The chart spells the variable with Helm's `snakecase`; a name that does not come back
        # from its camelCase key (a digit, a double underscore) would be set under another name.
        if to_snake(key) != name:
            raise ValueError(f"{name}: its chart key {key!r} does not map back to it")
        properties[key] = _field_schema(name, field, generated[name])
    return {"type": "object", "additionalProperties": False, "properties": properties}


def splice(text: str) -> str:
    """The text of values.schema.json with `properties.settings` regenerated.

    The rest is kept as parsed; the file is written as `json.dumps(indent=2)` plus a newline,
    which is its committed format, so nothing else changes byte for byte.
    """
    schema = json.loads(text)
    schema["properties"]["settings"] = settings_values_schema()
    return json.dumps(schema, indent=2) + "\n"
