"""The cluster as one reconcile sees it: the model's Service and Deployment read from what the
watches have shown (the store), every write sent to the API server and its answer kept.

An informer's cache, on the watches kopf runs anyway. bench-operator's 200 models cost 1,135
reconciles; each read its Service and Deployment from the API server, 2,270 GETs beside the
kubectl apply being timed, on the same 2 cores. A read that the store cannot answer (before the
first watch event, or an object that is not ours) still goes to the API server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vllm_operator import reconcile
from vllm_operator.store import ModelState

Obj = Mapping[str, Any]


class CachedCluster:
    """A reconcile.Cluster for one model's reconcile, while the caller holds the model's turn."""

    def __init__(self, cluster: reconcile.Cluster, state: ModelState) -> None:
        self.cluster = cluster
        self.state = state

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        cached = self.state.children.get(kind) if kind in reconcile.CHILD_KINDS else None
        if cached is not None and cached["metadata"].get("name") == name:
            return cached
        return await self.cluster.get(kind, namespace, name)

    async def apply(self, manifest: Obj) -> Obj:
        result = await self.cluster.apply(manifest)
        self.state.see_child(result)
        return result

    async def create(self, manifest: Obj) -> bool:
        return await self.cluster.create(manifest)

    async def list_pods(self, namespace: str, selector: str) -> Sequence[Obj]:
        return await self.cluster.list_pods(namespace, selector)

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> Obj | None:
        # The written model, so that the next reconcile compares with what it wrote even if
        # the watch has not shown it yet (else it would write again and post the same Event).
        written = await self.cluster.write_status(namespace, name, status, previous)
        if written is not None:
            self.state.see(written)
        return written

    async def event(self, owner: Obj, kind: str, reason: str, message: str) -> None:
        await self.cluster.event(owner, kind, reason, message)

    async def patch_status(self, namespace: str, name: str, fields: Mapping[str, Any]) -> None:
        await self.cluster.patch_status(namespace, name, fields)

    async def scale(self, namespace: str, name: str, replicas: int, expect: int) -> bool:
        return await self.cluster.scale(namespace, name, replicas, expect)
