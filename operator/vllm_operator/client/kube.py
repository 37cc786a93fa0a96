"""Find a VLLMModel's endpoint and served model name through the Kubernetes API."""

from __future__ import annotations

import json
from typing import Any

GROUP_VERSION = "serving.vllm-operator.io/v1alpha1"


def parse_ref(ref: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` (or `NAME`, in namespace default)."""
    ns, _, name = ref.rpartition("/")
    if not name or "/" in ns:
        raise ValueError(f"--model-ref {ref!r}: expected NAMESPACE/NAME")
    return ns or "default", name


def target_of(obj: dict[str, Any]) -> tuple[str, str]:
    """(base URL, served model name) of a VLLMModel object; refuses one without an endpoint."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    endpoint = status.get("endpoint")
    if not endpoint:
        raise ValueError(
            f"VLLMModel {meta.get('namespace')}/{meta.get('name')} has no "
            f"status.endpoint yet (phase {status.get('phase', 'unknown')})"
        )
    model = (obj.get("spec") or {}).get("servedModelName") or meta.get("name")
    return str(endpoint), str(model)


def read_vllmmodel(namespace: str, name: str) -> dict[str, Any]:
    """GET the VLLMModel with KUBECONFIG (or the in-cluster config); ValueError when it cannot."""
    from kubernetes import client, config

    try:
        try:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException as exc:
        raise ValueError(f"--model-ref needs KUBECONFIG or an in-cluster config: {exc}") from None
    path = f"/apis/{GROUP_VERSION}/namespaces/{namespace}/vllmmodels/{name}"
    with client.ApiClient() as api:
        _, url, headers, _, _ = api.param_serialize(
            "GET", path, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
        )
        try:
            response = api.call_api("GET", url, header_params=headers)
            response.read()
        except Exception as exc:  # urllib3 errors: no API server there
            raise ValueError(f"VLLMModel {namespace}/{name}: cannot reach the API server: {exc}") from None
    if not 200 <= response.status <= 299:
        raise ValueError(f"VLLMModel {namespace}/{name}: {response.status} {response.reason}")
    obj: dict[str, Any] = json.loads(response.data)
    return obj
