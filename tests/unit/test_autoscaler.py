"""The operator's autoscaling loop (autoscaler.py) with its edges faked: the router's demand and
park, and the API server's scale, status and Event writes. The planner itself is in
test_autoscale.py; here, what the loop writes and when."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from tests.unit.test_reconcile import FakeCluster, model
from vllm_operator.autoscaler import Autoscaler
from vllm_operator.controller import Controller
from vllm_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(router_url="http://router:8000", router_token="t", admin_key="k")
KEY = ("team-a", "llama")


class ScalingCluster(FakeCluster):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.scales: list[tuple[int, int]] = []
        self.patches: list[dict[str, Any]] = []

    async def scale(self, namespace: str, name: str, replicas: int, expect: int) -> bool:
        if self.model["spec"]["replicas"] != expect:
            return False
        self.scales.append((expect, replicas))
        self.model["spec"]["replicas"] = replicas
        return True

    async def patch_status(self, namespace: str, name: str, fields: Mapping[str, Any]) -> None:
        self.patches.append(dict(fields))

    async def event(self, owner: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))


class Router:
    """The router's side: demand, and a park that is granted or refused."""

    def __init__(self, grant: bool, in_flight: int = 0) -> None:
        self.grant, self.in_flight, self.parks = grant, in_flight, 0

    async def router_demand(self, url: str) -> Any:
        entry = {"namespace": KEY[0], "resource": KEY[1], "inFlight": self.in_flight, "requests": 5}
        return {"models": {"llama": entry}}

    async def park(self, url: str, namespace: str, name: str, idle: int, token: str) -> tuple[bool, str]:
        self.parks += 1
        return (True, "") if self.grant else (False, "the router answered 403: parking needs a router token")


def loop(grant: bool, seconds: int, in_flight: int = 0, replicas: int = 1) -> tuple[ScalingCluster, Router]:
    body = model(replicas=replicas, autoscaling={"minReplicas": 0, "maxReplicas": 2, "idleSeconds": 10,
                                                  "scaleDownDelaySeconds": 0})  # fmt: skip
    cluster = ScalingCluster(body)
    controller = Controller(cluster, SETTINGS)
    controller.remember(body)
    now = [100.0]
    router = Router(grant, in_flight)
    autoscaler = Autoscaler(controller, router, clock=lambda: now[0])  # type: ignore[arg-type]

    async def run() -> None:
        for _ in range(seconds):
            await autoscaler.tick()
            now[0] += 1.0

    asyncio.run(run())
    return cluster, router


def test_idle_goes_to_zero_through_a_granted_park_with_one_write_and_an_event() -> None:
    cluster, router = loop(grant=True, seconds=15)
    assert router.parks == 1
    assert cluster.scales == [(1, 0)]
    assert [e[1] for e in cluster.events] == ["Scaled"] and "1 -> 0: idle for" in cluster.events[0][2]
    last = cluster.patches[-1]["autoscaling"]
    assert last["desiredReplicas"] == 0 and last["decisions"][-1]["toReplicas"] == 0


def test_a_refused_park_writes_no_zero_and_says_why_in_the_status() -> None:
    cluster, router = loop(grant=False, seconds=15)
    assert router.parks == 1  # then the idle time starts over
    assert cluster.scales == [] and cluster.events == []
    reasons = [p["autoscaling"]["reason"] for p in cluster.patches]
    assert any(r.startswith("scale to zero aborted: the router answered 403") for r in reasons), reasons


def test_requests_held_at_zero_are_woken_by_the_operator_when_the_router_did_not() -> None:
    cluster, _ = loop(grant=True, seconds=8, in_flight=3, replicas=0)
    assert cluster.scales == [(0, 1)]
    assert "requests held at zero" in cluster.events[0][2]
