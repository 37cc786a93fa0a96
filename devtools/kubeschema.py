"""Validate manifests against the Kubernetes OpenAPI v3 schemas of the pinned release, offline.

The schemas ship inside the k8s.io/kubernetes Go module (api/openapi-spec/v3), which the
control-plane build downloads anyway; unknown fields are refused, as `kubectl --validate=strict` does.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

from devtools import toolchain, versions


@functools.cache
def spec_dir() -> Path:
    """The openapi-spec/v3 folder of the pinned Kubernetes, downloading the module if needed."""
    return toolchain.module_dir("k8s.io/kubernetes", versions.KUBERNETES) / "api" / "openapi-spec" / "v3"


def _file_for(api_version: str) -> str:
    if api_version == "v1":
        return "api__v1_openapi.json"
    group, version = api_version.split("/")
    return f"apis__{group}__{version}_openapi.json"


def _strict(schemas: dict[str, Any]) -> dict[str, Any]:
    for schema in schemas.values():
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    return schemas


@functools.cache
def _document(api_version: str) -> dict[str, Any]:
    document = json.loads((spec_dir() / _file_for(api_version)).read_text())
    _strict(document["components"]["schemas"])
    return document  # type: ignore[no-any-return]


def validate(manifest: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when `manifest` is not a valid object of its kind."""
    api_version, kind = manifest["apiVersion"], manifest["kind"]
    document = _document(api_version)
    group = "core" if "/" not in api_version else api_version.split("/")[0]
    version = api_version.split("/")[-1]
    matches = [
        name
        for name, schema in document["components"]["schemas"].items()
        if {"group": "" if group == "core" else group, "version": version, "kind": kind}
        in schema.get("x-kubernetes-group-version-kind", [])
    ]
    if not matches:
        raise LookupError(f"no schema for {api_version} {kind}")
    registry = Registry().with_resource("urn:k8s", Resource.opaque(document))
    schema = {"$ref": f"urn:k8s#/components/schemas/{matches[0]}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(manifest)
