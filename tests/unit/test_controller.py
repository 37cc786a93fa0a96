"""Controller: a burst of a model's child events costs one reconcile, which runs after all of
them; an event after the window gets a reconcile of its own; a model's own change is reconciled
once per generation and retried while it fails."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes
import pytest

from tests.unit.test_reconcile import FakeCluster, model
from vllm_operator import controller as controller_module
from vllm_operator import k8s, reconcile
from vllm_operator.controller import Controller
from vllm_operator.render import INSTANCE_LABEL
from vllm_operator.settings import OperatorSettings

SETTLE = 0.2


class CountingController(Controller):
    """Records each reconcile (model, time) instead of talking to an API server."""

    def __init__(self) -> None:
        super().__init__(None, OperatorSettings(), child_settle_seconds=SETTLE)  # type: ignore[arg-type]
        self.calls: list[tuple[str, str, float]] = []

    async def on_model(self, namespace: str, name: str, coalesce: bool = False) -> reconcile.Plan | None:
        self.calls.append((namespace, name, time.monotonic()))
        await asyncio.sleep(0.05)  # a reconcile takes a while: events may arrive during it
        return None


def child(model: str, kind: str = "Pod") -> dict[str, Any]:
    return {"kind": kind, "metadata": {"namespace": "ns", "labels": {INSTANCE_LABEL: model}}}


async def test_a_burst_of_one_models_child_events_costs_one_reconcile_after_the_last() -> None:
    controller = CountingController()
    started = time.monotonic()
    first = asyncio.create_task(controller.on_child(child("a", "Deployment")))
    rest = []
    for kind in ("Service", "Pod", "Pod", "Deployment", "Pod"):
        await asyncio.sleep(0.02)
        rest.append(asyncio.create_task(controller.on_child(child("a", kind))))
    last_event = time.monotonic()
    await asyncio.gather(first, *rest)
    assert [c[:2] for c in controller.calls] == [("ns", "a")]
    assert controller.calls[0][2] >= last_event  # it read after every event of the burst
    assert controller.calls[0][2] - started >= SETTLE


async def test_each_model_gets_its_own_reconcile() -> None:
    controller = CountingController()
    await asyncio.gather(*(controller.on_child(child(m)) for m in ("a", "b", "a", "c", "b")))
    assert sorted(c[1] for c in controller.calls) == ["a", "b", "c"]


async def test_an_event_after_the_window_gets_a_reconcile_of_its_own() -> None:
    controller = CountingController()
    await controller.on_child(child("a"))
    await controller.on_child(child("a"))
    assert [c[1] for c in controller.calls] == ["a", "a"]


async def test_an_event_during_the_reconcile_is_not_lost() -> None:
    """The reconcile may have read before that event's change: it must get a later one."""
    controller = CountingController()
    first = asyncio.create_task(controller.on_child(child("a")))
    await asyncio.sleep(SETTLE + 0.02)  # the window closed; the reconcile is running
    await controller.on_child(child("a", "Deployment"))
    await first
    assert len(controller.calls) == 2 and controller.calls[1][2] > controller.calls[0][2]


async def test_objects_that_are_not_a_models_children_are_ignored() -> None:
    controller = CountingController()
    assert await controller.on_child({"metadata": {"namespace": "ns", "labels": {}}}) is None
    assert await controller.on_child({"metadata": {"labels": {INSTANCE_LABEL: "a"}}}) is None
    assert controller.calls == []


class SlowModelServer(http.server.BaseHTTPRequestHandler):
    """An API server on which model `slow` takes until `release` is set to read, and every other
    model is gone (404): enough for a reconcile to start and to end."""

    release = threading.Event()

    def do_GET(self) -> None:
        if self.path.endswith("/vllmmodels/slow"):
            self.release.wait(10)
        body = json.dumps({"kind": "Status", "code": 404, "reason": "NotFound", "message": "gone"}).encode()
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


async def test_a_slow_api_call_of_one_model_does_not_hold_up_another_models_reconcile() -> None:
    """One event loop, no worker threads: while one model's reconcile awaits a slow API server,
    another model's reconcile runs to its end (the old sync layer blocked whatever thread it
    ran on, and only kopf's 8 workers kept the others going)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowModelServer)
    SlowModelServer.release.clear()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        async with k8s.KubeCluster(config) as cluster:
            controller = Controller(cluster, OperatorSettings())
            slow = asyncio.create_task(controller.on_model("ns", "slow"))
            await asyncio.sleep(0.1)  # its GET is in flight
            assert await asyncio.wait_for(controller.on_model("ns", "fast"), 2) is None
            assert not slow.done()
            SlowModelServer.release.set()
            assert await asyncio.wait_for(slow, 5) is None
    finally:
        SlowModelServer.release.set()
        server.shutdown()
        thread.join()
        server.server_close()


class TimedController(Controller):
    """Records when each reconcile starts and ends (model, start, end); a reconcile of model
    `spec` takes `spec_seconds`, the others none."""

    def __init__(self, spec_seconds: float, spec_first_seconds: float = 10.0) -> None:
        super().__init__(
            None,  # type: ignore[arg-type]
            OperatorSettings(),
            child_settle_seconds=SETTLE,
            spec_first_seconds=spec_first_seconds,
        )
        self.spec_seconds = spec_seconds
        self.runs: list[tuple[str, float, float]] = []

    async def _reconcile(self, key: tuple[str, str], status_later: bool = False) -> reconcile.Plan | None:
        started = time.monotonic()
        await asyncio.sleep(self.spec_seconds if key[1] == "spec" else 0)
        self.runs.append((key[1], started, time.monotonic()))
        return None


async def test_a_childs_reconcile_waits_while_a_models_own_change_is_reconciled() -> None:
    """Status from children waits for children to be created: 200 models applied at once are
    created first, and their status reconciles do not slow the API server meanwhile."""
    controller = TimedController(spec_seconds=SETTLE * 3)
    spec = asyncio.create_task(controller.on_model("ns", "spec"))
    await controller.on_child(child("a"))
    await spec
    runs = {name: (start, end) for name, start, end in controller.runs}
    assert runs["a"][0] >= runs["spec"][1]


async def test_a_childs_reconcile_waits_for_spec_work_only_so_long() -> None:
    controller = TimedController(spec_seconds=5, spec_first_seconds=SETTLE)
    spec = asyncio.create_task(controller.on_model("ns", "spec"))
    started = time.monotonic()
    await asyncio.wait_for(controller.on_child(child("a")), 2)
    assert time.monotonic() - started < 1 and not spec.done()
    spec.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await spec


def model_event(generation: int, status: dict[str, Any] | None = None) -> dict[str, Any]:
    body = model()
    body["metadata"]["generation"] = generation
    return {**body, "status": status or {}}


def test_a_models_event_brings_a_reconcile_only_for_a_spec_new_to_the_process() -> None:
    controller = Controller(None, OperatorSettings())  # type: ignore[arg-type]
    assert controller.seen(model_event(1))  # the first event of it (also the listing at start)
    assert not controller.seen(model_event(1, {"phase": "Ready"}))  # a status write
    assert controller.seen(model_event(2))  # a new spec
    controller.forget(("team-a", "llama"))
    assert controller.seen(model_event(2))  # deleted and created again


class FlakyCluster(FakeCluster):
    """Refuses the first `failures` applies with `error`."""

    def __init__(self, failures: int, error: Exception) -> None:
        super().__init__(model())
        self.failures, self.error = failures, error
        self.reads = 0

    async def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.reads += 1
        return await super().get(kind, namespace, name)

    async def apply(self, manifest: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.failures:
            self.failures -= 1
            raise self.error
        return await super().apply(manifest)


async def wait_for(predicate: Callable[[], bool], seconds: float = 3) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.01)


async def test_a_failed_reconcile_is_retried_until_it_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller_module, "RETRY_BACKOFF", (0.05, 0.1))
    cluster = FlakyCluster(2, RuntimeError("the API server refused"))
    controller = Controller(cluster, OperatorSettings())
    controller.seen(cluster.model)
    assert await controller.on_spec("team-a", "llama") is None
    await wait_for(lambda: cluster.applied == ["Service", "Deployment"])
    # Each failure is on the model, as kopf's handler failures were.
    assert [e[1] for e in cluster.events if e[0] == "Warning"] == ["ReconcileFailed"] * 2
    assert "refused" in cluster.events[0][2]


async def test_a_transient_error_is_retried_after_its_own_delay() -> None:
    cluster = FlakyCluster(1, k8s.TransientError("API server busy", delay=0.05))
    controller = Controller(cluster, OperatorSettings())
    controller.seen(cluster.model)
    await controller.on_spec("team-a", "llama")
    await wait_for(lambda: cluster.applied == ["Service", "Deployment"])
    assert not [e for e in cluster.events if e[0] == "Warning"]


async def test_a_deleted_model_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller_module, "RETRY_BACKOFF", (0.05,))
    cluster = FlakyCluster(1, RuntimeError("refused"))
    controller = Controller(cluster, OperatorSettings())
    controller.seen(cluster.model)
    await controller.on_spec("team-a", "llama")
    reads = cluster.reads
    controller.forget(("team-a", "llama"))
    await asyncio.sleep(0.2)
    assert cluster.applied == [] and cluster.reads == reads  # no attempt after the deletion


async def test_a_spec_reconcile_that_applied_children_leaves_the_status_to_one_soon() -> None:
    """No child event needed: the status follows even if the apply changed nothing (a drift the
    API server normalises away brings no watch event)."""
    cluster = FakeCluster(model())
    controller = Controller(cluster, OperatorSettings(), child_settle_seconds=SETTLE)
    controller.remember(cluster.model)
    plan = await controller.on_model("team-a", "llama")
    assert plan is not None and plan.status_later and plan.status is None
    assert cluster.applied == ["Service", "Deployment"] and cluster.status_writes == []
    assert [e[1] for e in cluster.events] == ["Created"]
    await wait_for(lambda: len(cluster.status_writes) == 1)
    assert cluster.status_writes[0]["observedGeneration"] == 1


async def test_a_spec_reconcile_that_applies_nothing_writes_the_status_itself() -> None:
    cluster = FakeCluster(model())
    controller = Controller(cluster, OperatorSettings(), child_settle_seconds=60)
    controller.remember(cluster.model)
    await controller.on_model("team-a", "llama", coalesce=True)  # children and status
    cluster.model["metadata"]["generation"] = 2  # a change that touches no child
    controller.remember(cluster.model)
    plan = await controller.on_model("team-a", "llama")
    assert plan is not None and not plan.status_later
    assert [w["observedGeneration"] for w in cluster.status_writes] == [1, 2]


class FailingStatusCluster(FakeCluster):
    """Refuses the first `failures` status writes."""

    def __init__(self, failures: int) -> None:
        super().__init__(model())
        self.failures = failures

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> None:
        if self.failures:
            self.failures -= 1
            raise k8s.APIServerError(500, "InternalError", "etcd is away")
        await super().write_status(namespace, name, status, previous)


async def test_the_status_a_spec_reconcile_left_is_retried_until_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(controller_module, "RETRY_BACKOFF", (0.05,))
    cluster = FailingStatusCluster(2)
    controller = Controller(cluster, OperatorSettings(), child_settle_seconds=0.01)
    controller.remember(cluster.model)
    await controller.on_model("team-a", "llama")
    await wait_for(lambda: len(cluster.status_writes) == 1)
    assert cluster.failures == 0
