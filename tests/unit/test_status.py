"""Status from observed state, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_operator import status
from vllm_operator.api import VLLMModelStatus


def deployment(
    ready: int = 0,
    updated: int = 0,
    replicas: int = 0,
    generation: int = 1,
    seen: int = 1,
    conditions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "replicas": replicas,
            "observedGeneration": seen,
            "conditions": conditions or [],
        },
    }


QUOTA = {
    "type": "ReplicaFailure",
    "status": "True",
    "reason": "FailedCreate",
    "message": 'pods "tiny-1" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1',
}
DEADLINE = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": 'ReplicaSet "tiny-1" has timed out progressing.',
}


def pod(name: str, *, unschedulable: str = "", waiting: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "status": {"conditions": [], "containerStatuses": []},
    }
    if unschedulable:
        body["status"]["conditions"].append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        )
    if waiting:
        body["status"]["containerStatuses"].append(
            {"state": {"waiting": {"reason": waiting, "message": "boom"}}}
        )
    return body


GPU_MSG = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."

CASES: list[tuple[str, int, Any, list[Any], str, str, str, str]] = [
    # name, desired, deployment, pods, phase, Ready, Progressing, Degraded
    ("no deployment yet", 1, None, [], "Pending", "False", "True", "False"),
    ("all ready", 2, deployment(2, 2, 2), [pod("a"), pod("b")], "Ready", "True", "False", "False"),
    (
        "starting",
        2,
        deployment(0, 2, 2),
        [pod("a"), pod("b")],
        "Progressing",
        "False",
        "True",
        "False",
    ),
    (
        "half ready after rollout",
        2,
        deployment(1, 2, 2),
        [pod("a"), pod("b")],
        "Degraded",
        "False",
        "True",
        "True",
    ),
    ("rolling, one ready", 2, deployment(2, 1, 3), [], "Progressing", "False", "True", "False"),
    (
        "stale observed generation",
        1,
        deployment(1, 1, 1, generation=2, seen=1),
        [],
        "Progressing",
        "False",
        "True",
        "False",
    ),
    (
        "gpus do not fit",
        1,
        deployment(0, 1, 1),
        [pod("a", unschedulable=GPU_MSG)],
        "Pending",
        "False",
        "False",
        "True",
    ),
    (
        "crash loop",
        1,
        deployment(0, 1, 1),
        [pod("a", waiting="CrashLoopBackOff")],
        "Degraded",
        "False",
        "True",
        "True",
    ),
    ("scaled to zero", 0, deployment(0, 0, 0), [], "Ready", "True", "False", "False"),
    (
        "quota refuses pods",
        1,
        deployment(0, 0, 0, conditions=[QUOTA]),
        [],
        "Degraded",
        "False",
        "False",
        "True",
    ),
    (
        "rollout deadline",
        2,
        deployment(1, 1, 2, conditions=[DEADLINE]),
        [],
        "Degraded",
        "False",
        "False",
        "True",
    ),
]


@pytest.mark.parametrize(
    ("case", "desired", "dep", "pods", "phase", "ready", "progressing", "degraded"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_judge(
    case: str,
    desired: int,
    dep: Any,
    pods: list[Any],
    phase: str,
    ready: str,
    progressing: str,
    degraded: str,
) -> None:
    verdict = status.judge(desired, dep, pods, generation=1)
    assert verdict.phase == phase
    assert (verdict.ready[0], verdict.progressing[0], verdict.degraded[0]) == (
        ready,
        progressing,
        degraded,
    )


def test_unschedulable_message_names_pod_and_reason() -> None:
    verdict = status.judge(1, deployment(0, 1, 1), [pod("big-0", unschedulable=GPU_MSG)], 1)
    assert "big-0" in verdict.degraded[2] and "Insufficient nvidia.com/gpu" in verdict.degraded[2]
    assert verdict.ready[1] == "Unschedulable"


def observe(previous: VLLMModelStatus, dep: Any, now: str, generation: int = 1) -> VLLMModelStatus:
    return status.observed(
        previous,
        generation=generation,
        desired_replicas=1,
        deployment=dep,
        pods=[],
        endpoint="http://m.ns.svc:8000/v1",
        selector="a=b",
        now=now,
    )


def test_observed_fills_counts_and_endpoint() -> None:
    s = observe(VLLMModelStatus(), deployment(1, 1, 1), "2026-01-01T00:00:00Z")
    assert (s.phase, s.replicas, s.ready_replicas, s.ready) == ("Ready", 1, 1, "1/1")
    assert s.endpoint == "http://m.ns.svc:8000/v1"
    assert {c.type for c in s.conditions} == {"Ready", "Progressing", "Degraded", "SpecValid"}


def test_transition_time_moves_only_on_flip() -> None:
    first = observe(VLLMModelStatus(), deployment(0, 1, 1), "t1")
    same = observe(first, deployment(0, 1, 1), "t2")
    assert status.same(first, same)
    flipped = observe(same, deployment(1, 1, 1), "t3")
    ready = status.condition(flipped, "Ready")
    spec_valid = status.condition(flipped, "SpecValid")
    assert ready is not None and ready.last_transition_time == "t3"
    assert spec_valid is not None and spec_valid.last_transition_time == "t1"


def test_invalid_sets_spec_valid_false_and_failed() -> None:
    s = status.invalid(VLLMModelStatus(), generation=4, problems=["spec.dtype: bad"], now="t")
    cond = status.condition(s, "SpecValid")
    assert cond is not None and (cond.status, cond.reason, cond.message) == (
        "False",
        "InvalidSpec",
        "spec.dtype: bad",
    )
    assert s.phase == "Failed" and s.observed_generation == 4


def test_metrics_survive_a_rollout_status_update() -> None:
    from vllm_operator.api import Metrics

    before = VLLMModelStatus(metrics=Metrics(generation_tokens_per_second=5.0))
    after = observe(before, deployment(1, 1, 1), "t")
    assert after.metrics is not None and after.metrics.generation_tokens_per_second == 5.0


def restarted(name: str, ready: bool) -> dict[str, Any]:
    """A pod whose server container was killed once (exit 137) and restarted."""
    return {
        "metadata": {"name": name},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {
                    "name": "vllm",
                    "ready": ready,
                    "restartCount": 1,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    "lastState": {"terminated": {"exitCode": 137, "reason": "Error"}},
                }
            ],
        },
    }


UNREADY_CASES: list[tuple[str, dict[str, Any], list[tuple[str, str]]]] = [
    ("ready", restarted("a", ready=True), []),
    (
        "killed and restarting",
        restarted("a", ready=False),
        [("a", "container vllm restarted after exit 137 (Error)")],
    ),
    ("waiting", pod("b", waiting="ContainerCreating"), [("b", "container ? ContainerCreating")]),
    (
        "starting",
        {
            "metadata": {"name": "c"},
            "status": {"containerStatuses": [{"name": "vllm", "ready": False, "state": {"running": {}}}]},
        },
        [("c", "container vllm starting")],
    ),
    ("being deleted", {"metadata": {"name": "d", "deletionTimestamp": "2026-01-01"}, "status": {}}, []),
    ("no status yet", {"metadata": {"name": "e"}}, [("e", "not ready")]),
]


@pytest.mark.parametrize(("case", "body", "expected"), UNREADY_CASES, ids=[c[0] for c in UNREADY_CASES])
def test_unready_pods(case: str, body: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert status.unready_pods([body]) == expected


def test_replicas_unavailable_names_the_pod_and_its_last_exit() -> None:
    pods = [restarted("a", ready=True), restarted("b", ready=False)]
    verdict = status.judge(2, deployment(1, 2, 2), pods, 1)
    assert verdict.degraded[:2] == ("True", "ReplicasUnavailable")
    assert verdict.degraded[2] == (
        "1 of 2 replicas are ready; pod b: container vllm restarted after exit 137 (Error)"
    )


@pytest.mark.parametrize(
    ("condition", "reason", "quoted"),
    [(QUOTA, "FailedCreate", "exceeded quota"), (DEADLINE, "ProgressDeadlineExceeded", "timed out")],
)
def test_a_stalled_rollout_is_degraded_with_the_deployment_message(
    condition: dict[str, str], reason: str, quoted: str
) -> None:
    verdict = status.judge(1, deployment(0, 0, 0, conditions=[condition]), [], 1)
    assert verdict.degraded[:2] == ("True", reason)
    assert quoted in verdict.degraded[2]
