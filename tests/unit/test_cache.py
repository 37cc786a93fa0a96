"""The reconcile's reads come from what the watches showed (cache.CachedCluster over the store):
no GET for a model or a child the watch has shown, a stale watch event never takes the store
back, and a status the operator wrote is what the next reconcile compares with."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from typing import Any

from tests.unit.test_reconcile import FakeCluster, model
from vllm_operator.controller import Controller
from vllm_operator.settings import OperatorSettings
from vllm_operator.store import ModelState

SETTINGS = OperatorSettings(admin_key="test-admin-key")
KEY = ("team-a", "llama")


class CountingCluster(FakeCluster):
    """Counts reads; the model's status write answers with the model as written, as the API
    server does, and gives each written object a growing resourceVersion."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.gets: Counter[str] = Counter()
        self.lists = 0
        self.version = 100

    def _next(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        return obj

    async def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.gets[kind] += 1
        return self.model if kind == "VLLMModel" else self.objects.get(kind)

    async def apply(self, manifest: Mapping[str, Any]) -> Mapping[str, Any]:
        return self._next(dict(await super().apply(manifest)))

    async def list_pods(self, namespace: str, selector: str) -> list[Mapping[str, Any]]:
        self.lists += 1
        return list(self.pods)

    async def write_status(  # type: ignore[override]
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        await super().write_status(namespace, name, status, previous)
        return self._next(copy.deepcopy(self.model))


def labelled(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A child as its watch event shows it (kopf passes only labelled children on)."""
    return copy.deepcopy(dict(obj))


async def test_a_reconcile_reads_nothing_the_watches_have_shown() -> None:
    cluster = CountingCluster(model())
    controller = Controller(cluster, SETTINGS, child_settle_seconds=0)
    controller.remember(copy.deepcopy(cluster.model))
    await controller.on_model(*KEY)
    # A new model: its children are not on the watches yet, and a Deployment created just now
    # has no pods to list.
    assert cluster.gets == {"Service": 1, "Deployment": 1} and cluster.lists == 0
    assert cluster.applied == ["Service", "Deployment"]
    for kind in ("Service", "Deployment"):
        await controller.on_child(labelled(cluster.objects[kind]))
    # Two reconciles from the children's events: no GET, one pod list each, nothing written.
    assert cluster.gets == {"Service": 1, "Deployment": 1} and cluster.lists == 2
    assert cluster.applied == ["Service", "Deployment"] and len(cluster.status_writes) == 1


async def test_a_model_unknown_to_the_store_is_read() -> None:
    cluster = CountingCluster(model())
    controller = Controller(cluster, SETTINGS)
    await controller.on_model(*KEY)
    assert cluster.gets["VLLMModel"] == 1 and cluster.applied == ["Service", "Deployment"]


async def test_the_status_written_is_what_the_next_reconcile_compares_with() -> None:
    """The watch has not shown the write yet: the next reconcile must neither write it again nor
    post its Events again."""
    cluster = CountingCluster(model())
    controller = Controller(cluster, SETTINGS)
    controller.remember(copy.deepcopy(cluster.model))  # no status yet
    await controller.on_model(*KEY)  # the spec: children applied, the status left for later
    await controller.on_model(*KEY, coalesce=True)  # the status
    writes, events = len(cluster.status_writes), list(cluster.events)
    await controller.on_model(*KEY, coalesce=True)
    assert len(cluster.status_writes) == writes == 1 and cluster.events == events


def versioned(kind: str, version: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": "llama", "resourceVersion": version}, **extra}


def test_a_stale_watch_event_never_takes_the_store_back() -> None:
    state = ModelState()
    state.see_child(versioned("Deployment", "20", spec={"replicas": 2}))
    state.see_child(versioned("Deployment", "9", spec={"replicas": 1}))  # behind our own apply
    assert state.children["Deployment"]["spec"] == {"replicas": 2}
    state.see_child(versioned("Deployment", "9"), gone=True)  # an older object's deletion
    assert "Deployment" in state.children
    state.see_child(versioned("Deployment", "21"), gone=True)
    assert "Deployment" not in state.children
    state.see(versioned("VLLMModel", "30", status={"phase": "Ready"}))
    state.see(versioned("VLLMModel", "29", status={"phase": "Pending"}))
    assert state.body is not None and state.body["status"] == {"phase": "Ready"}
    state.see_child(versioned("Pod", "40"))  # pods are listed, not cached
    assert state.children == {}


async def test_an_object_that_is_not_ours_is_read_every_time() -> None:
    """Somebody else's Service of the model's name never comes through our watches: each
    reconcile reads it from the API server, so its removal is seen."""
    cluster = CountingCluster(model())
    cluster.objects["Service"] = {"kind": "Service", "metadata": {"name": "llama", "namespace": "team-a"}}
    controller = Controller(cluster, SETTINGS)
    controller.remember(copy.deepcopy(cluster.model))
    first = await controller.on_model(*KEY)
    assert first is not None and first.retry is not None  # a name conflict, retried later
    del cluster.objects["Service"]
    await controller.on_model(*KEY)
    assert cluster.gets["Service"] == 2 and cluster.applied == ["Service", "Deployment"]
