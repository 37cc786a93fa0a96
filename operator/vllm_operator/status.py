"""Pure status computation: observed children and pods become phase, counts and conditions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_operator.api import (
    Condition,
    ConditionStatus,
    ConditionType,
    Phase,
    VLLMModelStatus,
)

Obj = Mapping[str, Any]
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Verdict:
    """What the observed state means, before it becomes conditions."""

    phase: Phase
    ready: tuple[ConditionStatus, str, str]
    progressing: tuple[ConditionStatus, str, str]
    degraded: tuple[ConditionStatus, str, str]


def _get(obj: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return default
        obj = obj[key]
    return obj


def _pod_condition(pod: Obj, kind: str) -> Obj | None:
    for condition in _get(pod, "status", "conditions", default=[]) or []:
        if condition.get("type") == kind:
            return condition  # type: ignore[no-any-return]
    return None


def unschedulable_pods(pods: Sequence[Obj]) -> list[tuple[str, str]]:
    """(pod name, scheduler message) of pods the scheduler could not place."""
    stuck = []
    for pod in pods:
        scheduled = _pod_condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            stuck.append((_get(pod, "metadata", "name", default="?"), scheduled.get("message", "")))
    return stuck


def crashing_pods(pods: Sequence[Obj]) -> list[tuple[str, str]]:
    """(pod name, reason) of pods whose server container keeps failing."""
    failing = []
    bad_reasons = {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
    }
    for pod in pods:
        for container in _get(pod, "status", "containerStatuses", default=[]) or []:
            reason = _get(container, "state", "waiting", "reason")
            if reason in bad_reasons:
                message = _get(container, "state", "waiting", "message", default="") or ""
                failing.append((_get(pod, "metadata", "name", default="?"), f"{reason} {message}".strip()))
    return failing


def stalled_rollout(deployment: Obj) -> tuple[str, str] | None:
    """(reason, message) when the Deployment itself says its pods cannot be made or its rollout
    ran out of time: a ResourceQuota or Pod Security refusal shows only here, as no pod exists.
    """
    for condition in _get(deployment, "status", "conditions", default=[]) or []:
        kind, value = condition.get("type"), condition.get("status")
        if (kind == "ReplicaFailure" and value == "True") or (
            kind == "Progressing"
            and value == "False"
            and condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            reason = str(condition.get("reason") or kind)
            return reason, f"{reason}: {condition.get('message') or ''}".strip().rstrip(":")
    return None


def unready_pods(pods: Sequence[Obj]) -> list[tuple[str, str]]:
    """(pod name, why) of pods that are not Ready: a restarted container's last exit, what a
    container waits for, or that it is still starting. Pods being deleted are left out."""
    unready = []
    for pod in pods:
        ready = _pod_condition(pod, "Ready")
        if _get(pod, "metadata", "deletionTimestamp") or (ready and ready.get("status") == "True"):
            continue
        why = "not ready"
        for container in _get(pod, "status", "containerStatuses", default=[]) or []:
            name = container.get("name", "?")
            last = _get(container, "lastState", "terminated")
            waiting = _get(container, "state", "waiting", "reason")
            if last:
                code, reason = last.get("exitCode", "?"), last.get("reason", "")
                why = f"container {name} restarted after exit {code} ({reason})"
            elif waiting:
                why = f"container {name} {waiting}"
            elif _get(container, "state", "running") is not None and not container.get("ready"):
                why = f"container {name} starting"
            else:
                continue
            break
        unready.append((_get(pod, "metadata", "name", default="?"), why))
    return unready


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def judge(
    desired_replicas: int,
    deployment: Obj | None,
    pods: Sequence[Obj],
    generation: int,
    unhealthy: Mapping[str, str] | None = None,
) -> Verdict:
    """Phase and the three rollout conditions from the Deployment, its pods and their scrapes.

    `unhealthy` maps ready pods whose /health or /metrics failed to the reason: they do not
    count as ready, whatever their readiness probe last said.
    """
    unhealthy = unhealthy or {}
    if deployment is None:
        waiting: tuple[ConditionStatus, str, str] = ("False", "DeploymentMissing", "creating the Deployment")
        return Verdict("Pending", waiting, ("True", "Creating", "creating the Deployment"), _no("AsExpected"))
    status = deployment.get("status") or {}
    ready = max(0, int(status.get("readyReplicas") or 0) - len(unhealthy))
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    current_spec = int(_get(deployment, "metadata", "generation", default=0)) <= int(
        status.get("observedGeneration") or 0
    )
    rolled_out = current_spec and updated >= desired_replicas and total <= desired_replicas
    stuck = unschedulable_pods(pods)
    crashing = crashing_pods(pods)
    stalled = stalled_rollout(deployment)

    if desired_replicas == 0:
        message = "scaled to zero replicas"
        return Verdict("Ready", ("True", "ScaledToZero", message), _no("ScaledToZero"), _no("ScaledToZero"))

    if crashing:
        text = _clip("; ".join(f"pod {name}: {why}" for name, why in crashing))
        degraded: tuple[ConditionStatus, str, str] = ("True", "PodsFailing", text)
    elif stalled:
        degraded = ("True", stalled[0], _clip(stalled[1]))
    elif unhealthy:
        text = _clip("; ".join(f"pod {name} is unhealthy: {why}" for name, why in sorted(unhealthy.items())))
        degraded = ("True", "PodsUnhealthy", text)
    elif stuck:
        text = _clip("; ".join(f"pod {name} cannot be scheduled: {why}" for name, why in stuck))
        degraded = ("True", "Unschedulable", text)
    elif 0 < ready < desired_replicas and rolled_out:
        named = "".join(f"; pod {name}: {why}" for name, why in unready_pods(pods))
        degraded = (
            "True",
            "ReplicasUnavailable",
            _clip(f"{ready} of {desired_replicas} replicas are ready{named}"),
        )
    else:
        degraded = _no("AsExpected")

    if rolled_out and ready >= desired_replicas:
        counts = f"{ready}/{desired_replicas} replicas ready"
        return Verdict("Ready", ("True", "ReplicasReady", counts), _no("RolloutComplete"), degraded)

    progress_message = f"{updated} of {desired_replicas} replicas updated, {ready} ready"
    progressing: tuple[ConditionStatus, str, str] = ("True", "RollingOut", progress_message)
    if stuck:
        progressing = ("False", "Unschedulable", degraded[2])
    elif stalled:
        progressing = ("False", *stalled)
    not_ready: tuple[ConditionStatus, str, str] = (
        "False",
        "Unschedulable" if stuck else "PodsUnhealthy" if unhealthy else "ReplicasNotReady",
        degraded[2] if stuck or unhealthy else f"{ready}/{desired_replicas} replicas ready",
    )
    if crashing or stalled:
        phase: Phase = "Degraded"
    elif ready > 0:
        phase = "Degraded" if degraded[0] == "True" else "Progressing"
    elif stuck:
        phase = "Pending"
    else:
        phase = "Progressing"
    return Verdict(phase, not_ready, progressing, degraded)


def _no(reason: str) -> tuple[ConditionStatus, str, str]:
    return ("False", reason, "")


def set_condition(
    conditions: Sequence[Condition],
    kind: ConditionType,
    value: tuple[ConditionStatus, str, str],
    generation: int,
    now: str,
) -> list[Condition]:
    """Conditions with `kind` set; the transition time moves only when the status flips."""
    status, reason, message = value
    previous = next((c for c in conditions if c.type == kind), None)
    since = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    kept = [c for c in conditions if c.type != kind]
    return sorted([*kept, updated], key=lambda c: c.type)


def observed(
    previous: VLLMModelStatus,
    *,
    generation: int,
    desired_replicas: int,
    deployment: Obj | None,
    pods: Sequence[Obj],
    endpoint: str,
    selector: str,
    now: str,
    unhealthy: Mapping[str, str] | None = None,
) -> VLLMModelStatus:
    """Status for a valid spec from what the cluster shows."""
    verdict = judge(desired_replicas, deployment, pods, generation, unhealthy)
    conditions = list(previous.conditions)
    for kind, value in (
        ("SpecValid", ("True", "Valid", "")),
        ("Ready", verdict.ready),
        ("Progressing", verdict.progressing),
        ("Degraded", verdict.degraded),
    ):
        conditions = set_condition(conditions, kind, value, generation, now)  # type: ignore[arg-type]
    ready = max(0, int(_get(deployment, "status", "readyReplicas", default=0) or 0) - len(unhealthy or {}))
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "phase": verdict.phase,
            "replicas": desired_replicas,
            "ready_replicas": ready,
            "ready": f"{ready}/{desired_replicas}",
            "selector": selector,
            "endpoint": endpoint,
            "conditions": conditions,
        }
    )


def invalid(
    previous: VLLMModelStatus, *, generation: int, problems: Sequence[str], now: str
) -> VLLMModelStatus:
    """Status for a spec the operator refuses: SpecValid=False and phase Failed."""
    message = _clip("; ".join(problems))
    conditions = set_condition(
        previous.conditions, "SpecValid", ("False", "InvalidSpec", message), generation, now
    )
    conditions = set_condition(
        conditions,
        "Ready",
        ("False", "InvalidSpec", "fix the spec: see SpecValid"),
        generation,
        now,
    )
    return previous.model_copy(
        update={"observed_generation": generation, "phase": "Failed", "conditions": conditions}
    )


def conflict(previous: VLLMModelStatus, *, generation: int, message: str, now: str) -> VLLMModelStatus:
    """Status for a model whose children's names are taken by objects it does not own."""
    conditions = set_condition(
        previous.conditions, "Ready", ("False", "NameConflict", _clip(message)), generation, now
    )
    conditions = set_condition(
        conditions, "Degraded", ("True", "NameConflict", _clip(message)), generation, now
    )
    return previous.model_copy(
        update={"observed_generation": generation, "phase": "Failed", "conditions": conditions}
    )


def condition(status: VLLMModelStatus, kind: ConditionType) -> Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def same(a: VLLMModelStatus, b: VLLMModelStatus) -> bool:
    """Whether writing `b` over `a` would change anything."""
    return a.model_dump() == b.model_dump()
