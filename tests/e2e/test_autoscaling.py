"""Autoscaling end to end on the local cluster: the operator's decisions, the router holding
requests while a model wakes from zero, and the race at the idle deadline.

Real operator and router processes, real API server; kwok pods answered by fake vLLM pods
(devtools/autoscaling.py). Windows and delays are shortened so that each behaviour shows in
seconds; bench/autoscale_bench.py runs the same scenarios at the defaults and prints figures.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.autoscaling import (
    Stack,
    autoscaled,
    burst,
    chat,
    cold_wake,
    idle_deadline,
    operator_restart,
    square_wave,
    step_up,
)
from devtools.cluster import LocalCluster, wait_until
from devtools.operator_process import OperatorProcess

pytestmark = [pytest.mark.cluster]


@pytest.fixture(scope="module")
def stack(
    cluster: LocalCluster, operator: OperatorProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The session's operator makes way for one that autoscales this namespace with the router."""
    namespace = f"autoscale-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(namespace)
    operator.stop()
    running = Stack(cluster, namespace, Path(tmp_path_factory.mktemp("autoscale"))).start()
    try:
        yield running
    finally:
        running.stop()
        operator.start()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_fifty_requests_wake_a_model_at_zero_with_one_write(stack: Stack) -> None:
    figures = cold_wake(stack, "sleepy", count=50)
    assert figures["failed"] == 0, figures
    assert figures["writes"] == 1 and figures["replicas"] == [1], figures
    # Held requests go out as soon as the pod is Ready: none waits for a poll.
    assert figures["first_byte_after_ready_s"] < 2.0, figures
    # The status follows the Deployment's (a reconcile after its event), which may come after
    # the router saw the pod Ready and sent the held requests (CI once read 0 here).
    wait_until(
        lambda: stack.status("sleepy").get("readyReplicas") == 1,
        "status.readyReplicas to show the woken pod",
        timeout=15,
        interval=0.2,
    )

    # The router's write is recorded by the operator like its own: status and an Event.
    def woken() -> bool:
        decisions = stack.status("sleepy").get("autoscaling", {}).get("decisions", [])
        return any(d["reason"].startswith("woken by the router") for d in decisions)

    wait_until(woken, "the wake-up in status.autoscaling", timeout=10, interval=0.2)


def test_a_held_stream_gets_keepalives_then_its_tokens(stack: Stack) -> None:
    """A streamed request to a model at zero: the head and SSE comments while it wakes (the
    fake pod is Ready within ~1 s, so the keep-alive interval is not reached: the stream is the
    pod's own), and the whole stream once a pod is there."""
    stack.apply(autoscaled("streamy", 0, minReplicas=0, maxReplicas=1, idleSeconds=3600))
    answer = chat(stack.router.url, "streamy", stream=True)
    assert answer.status == 200
    assert answer.body.rstrip().endswith("data: [DONE]"), answer.body
    assert '"pod"' in answer.body


def test_a_step_of_load_scales_up_at_once(stack: Stack) -> None:
    figures = step_up(stack, "steppy", target=2, factor=4)
    assert figures["failed"] == 0, figures
    assert figures["decision_after_step_s"] is not None and figures["replicas"][0] > 1, figures
    assert "in flight for 2 per replica" in figures["reason"], figures  # the decision says why


def test_a_square_wave_moves_replicas_once_and_never_down_inside_the_delay(stack: Stack) -> None:
    figures = square_wave(
        stack,
        "wavy",
        period=12,
        cycles=3,
        high=6,
        minReplicas=1,
        maxReplicas=4,
        targetInFlight=2,
        stableWindowSeconds=6,
        panicWindowSeconds=2,
        scaleDownDelaySeconds=20,
    )
    assert figures["failed"] == 0, figures
    assert figures["scale_downs_inside_delay"] == [], figures
    assert all(changes <= 2 for changes in figures["changes_per_cycle"]), figures  # minReplicas + 1
    assert any(r > 1 for _, r in figures["writes"]), figures


@pytest.mark.parametrize("offset", [None, 0.0], ids=["at-the-park", "at-the-deadline"])
def test_requests_at_the_idle_deadline_are_never_lost(stack: Stack, offset: float | None) -> None:
    """The moment the router grants the park the operator is about to write 0: a burst then is
    held (not sent to the pod about to stop) and wakes the model. At the deadline itself it
    aborts the scale to zero or is held. Either way no request is lost, none is in flight at a
    pod when the replicas turn 0, and once quiet the model goes to zero."""
    figures = idle_deadline(stack, f"idler-{offset is None}".lower(), idle=10, count=100, offset=offset)
    print(figures)
    assert figures["failed"] == 0, figures
    assert figures["in_flight_at_zero"] and all(n == 0 for n in figures["in_flight_at_zero"]), figures
    assert figures["replicas"][-1] == 0, figures
    assert figures["decisions"][-1].startswith("idle for"), figures


def test_restarts_never_lose_a_decision_or_a_held_request(stack: Stack) -> None:
    figures = operator_restart(stack, "sturdy")
    assert not figures["went_back"] and figures["replicas_seen"][-1] >= figures["replicas_at_restart"], (
        figures
    )
    assert figures["requests"] and figures["failed"] == 0, figures

    # The router restarted with a model at zero: it knows the model at once, holds, wakes it.
    stack.apply(autoscaled("dozy", 0, minReplicas=0, maxReplicas=1, idleSeconds=3600))
    stack.router.stop()
    stack.router.start()
    assert "dozy" in stack.routed()
    answers = burst(stack.router.url, "dozy", 10)
    assert [a.status for a in answers] == [200] * 10
    assert [r for _, r in stack.timeline.writes("dozy")] == [1]


def test_the_router_refuses_to_park_without_its_token(stack: Stack) -> None:
    body = {"namespace": stack.namespace, "resource": "sleepy", "idleSeconds": 0}
    url = f"{stack.router.url}/router/park"
    assert httpx.post(url, json=body, timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(url, json=body, headers=wrong, timeout=5).status_code == 401
