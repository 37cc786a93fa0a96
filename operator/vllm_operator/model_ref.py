"""`vllm-operator bench --model-ref`: a VLLMModel's endpoint and served model name, read
through the Kubernetes API (the client distribution has no Kubernetes client)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

GROUP_VERSION = "serving.vllm-operator.io/v1alpha1"
T = TypeVar("T")


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


def run_sync(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`main()` to its end on a loop of its own, for a synchronous caller. `bench load` resolves
    its --model-ref from inside its own running loop, where asyncio.run is refused: there, the
    loop runs on a helper thread while the caller waits (as it waited for the old sync client)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


def read_vllmmodel(namespace: str, name: str) -> dict[str, Any]:
    """GET the VLLMModel through `vllm_operator.k8s`; ValueError when it cannot."""
    from vllm_operator import k8s

    try:
        configuration = k8s.load_config()
    except k8s.ConfigError as exc:
        raise ValueError(f"--model-ref needs KUBECONFIG or an in-cluster config: {exc}") from None

    async def get() -> dict[str, Any] | None:
        async with k8s.KubeCluster(configuration) as cluster:
            return await cluster.get("VLLMModel", namespace, name)

    try:
        obj = run_sync(get)
    except k8s.TransientError as exc:
        raise ValueError(f"VLLMModel {namespace}/{name}: cannot reach the API server: {exc}") from None
    except k8s.APIError as exc:
        raise ValueError(f"VLLMModel {namespace}/{name}: {exc}") from None
    if obj is None:
        raise ValueError(f"VLLMModel {namespace}/{name}: 404 Not Found")
    return obj


def resolve(ref: str) -> tuple[str, str]:
    """`NAMESPACE/NAME` -> (base URL, served model name); ValueError naming what is missing."""
    namespace, name = parse_ref(ref)
    return target_of(read_vllmmodel(namespace, name))
