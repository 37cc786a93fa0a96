"""Keeps the routing table current: list, then watch, VLLMModels and their pods (the Kubernetes edge).

One asyncio task per (kind, namespace), on the router's event loop, runs list-then-watch; every
change rebuilds the table (a pure function of what is known) and publishes it. A watch that
ends is resumed from its last resourceVersion; one whose version expired (410) lists again.
The router reports ready once every stream has listed once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vllm_operator import render
from vllm_operator.k8s import APIError, APIGoneError, KubeCluster, TransientError
from vllm_operator.router import table
from vllm_operator.router.table import PodInfo

log = logging.getLogger(__name__)

POD_SELECTOR = f"{render.NAME_LABEL}=vllm,{render.MANAGED_BY_LABEL}=vllm-operator"
RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)


class Watcher:
    def __init__(
        self,
        cluster: KubeCluster,
        namespaces: Sequence[str | None],
        selector: str,
        publish: Callable[[table.Table, bool], None],
    ) -> None:
        """`namespaces`: the namespaces to serve, or `[None]` for all; `selector`: of the VLLMModels;
        `publish(table, ready)` is called on the event loop with every new table."""
        self.cluster = cluster
        self.namespaces = namespaces
        self.selector = selector
        self.publish = publish
        self.models: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.pods: dict[tuple[str, str], PodInfo] = {}
        self.synced: set[tuple[str, str | None]] = set()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the watches on the running loop."""
        for namespace in self.namespaces:
            for kind in ("VLLMModel", "Pod"):
                self.tasks.append(
                    asyncio.create_task(self._run(kind, namespace), name=f"watch-{kind}-{namespace or 'all'}")
                )

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()

    def _key(self, obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return str(meta.get("namespace", "")), str(meta.get("name", ""))

    def _replace(self, kind: str, namespace: str | None, items: list[dict[str, Any]]) -> None:
        # No await in here (nor in _apply): the other watches see the maps whole, without a lock.
        store: dict[tuple[str, str], Any] = self.models if kind == "VLLMModel" else self.pods
        for key in [k for k in store if namespace is None or k[0] == namespace]:
            del store[key]
        for item in items:
            self._put(kind, item)
        self.synced.add((kind, namespace))
        self._publish()

    def _put(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = self._key(obj)
        if kind == "VLLMModel":
            self.models[key] = obj
            return
        info = table.pod_info(obj)
        if info is None:
            self.pods.pop(key, None)
        else:
            self.pods[key] = info

    def _apply(self, kind: str, kind_of_event: str, obj: Mapping[str, Any]) -> None:
        if kind_of_event == "DELETED":
            (self.models if kind == "VLLMModel" else self.pods).pop(self._key(obj), None)
        else:
            self._put(kind, obj)
        self._publish()

    def _publish(self) -> None:
        ready = len(self.synced) == 2 * len(self.namespaces)
        self.publish(table.build(self.models.values(), self.pods.values()), ready)

    async def _run(self, kind: str, namespace: str | None) -> None:
        selector = self.selector if kind == "VLLMModel" else POD_SELECTOR
        failures = 0
        version = ""
        while True:  # until cancelled (stop)
            try:
                if not version:
                    items, version = await self.cluster.list(kind, namespace, selector)
                    self._replace(kind, namespace, items)
                async for event, obj in self.cluster.watch(kind, namespace, selector, version):
                    version = str((obj.get("metadata") or {}).get("resourceVersion", version))
                    if event != "BOOKMARK":  # a bookmark only moves the version on
                        self._apply(kind, event, obj)
                    failures = 0
            except APIGoneError:
                version = ""  # expired: list again
                continue
            except APIError as error:
                failures += 1
                log.warning("watching %s in %s: %s", kind, namespace or "all namespaces", error)
                version = "" if error.status in (401, 403, 404) else version
            except (TransientError, OSError, ValueError) as error:
                failures += 1
                log.warning("watching %s in %s: %s", kind, namespace or "all namespaces", error)
            except Exception as error:  # a watch task must never die silently
                failures += 1
                log.exception("watching %s in %s failed: %s", kind, namespace or "all namespaces", error)
                version = ""
            if failures:
                await asyncio.sleep(RETRY_SECONDS[min(failures, len(RETRY_SECONDS)) - 1])
