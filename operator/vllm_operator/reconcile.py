"""One reconcile of a VLLMModel: plan from what is observed, then execute the few writes needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from vllm_operator import render, status, throughput
from vllm_operator.api import SpecError, VLLMModelSpec, VLLMModelStatus, dump, parse_spec, parse_status
from vllm_operator.settings import OperatorSettings

Obj = Mapping[str, Any]
CHILD_KINDS = ("Service", "Deployment")
"""A model's children, in render.children's order."""
# A foreign object blocking a child is not watched (it lacks our labels): look again this often.
CONFLICT_RETRY = 30.0


class Cluster(Protocol):
    """The I/O a reconcile needs, as coroutines on the operator's one event loop;
    `vllm_operator.k8s` implements it against the API server."""

    async def get(self, kind: str, namespace: str, name: str) -> Obj | None: ...

    async def apply(self, manifest: Obj) -> Obj: ...

    async def create(self, manifest: Obj) -> bool:
        """Create an object unless one of that name exists (then False); never reads or changes one."""
        ...

    async def list_pods(self, namespace: str, selector: str) -> Sequence[Obj]: ...

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> Obj | None:
        """Write the status (a merge patch from `previous`): the model as written, if known."""
        ...

    async def event(self, owner: Obj, kind: str, reason: str, message: str) -> None: ...

    async def patch_status(self, namespace: str, name: str, fields: Mapping[str, Any]) -> None:
        """Merge `fields` into the status and leave its other keys alone (the autoscaler's part)."""
        ...

    async def scale(self, namespace: str, name: str, replicas: int, expect: int) -> bool:
        """Set spec.replicas through the scale subresource if it is `expect` now; else False."""
        ...


OWN_WRITER = ("autoscaling",)
"""Status keys another writer (the autoscaler) owns: a reconcile's status write leaves them be."""


@dataclass(frozen=True)
class Plan:
    """What one reconcile will do."""

    apply: list[dict[str, Any]] = field(default_factory=list)
    create: list[dict[str, Any]] = field(default_factory=list)
    """Objects created once and never changed (a LoRA model's admin-token Secret)."""
    status: VLLMModelStatus | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)
    retry: tuple[float, str] | None = None
    """Reconcile again after this many seconds, and why: what blocks it is not watched."""
    status_later: bool = False
    """Children were applied and the status (with its Events) is left to a reconcile soon."""


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ref_of(obj: Obj) -> render.ModelRef:
    meta = obj["metadata"]
    return render.ModelRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def plan_children(desired: Sequence[dict[str, Any]], observed: Sequence[Obj | None]) -> Plan:
    """Children to apply: those missing or drifted from what we render, with one Event for
    those created ("created Service llama and Deployment llama") and one for those updated."""
    apply: list[dict[str, Any]] = []
    done: dict[str, list[str]] = {"Created": [], "Updated": []}
    for manifest, current in zip(desired, observed, strict=True):
        if current is None or not render.is_subset(manifest, current):
            apply.append(manifest)
            done["Created" if current is None else "Updated"].append(
                f"{manifest['kind']} {manifest['metadata']['name']}"
            )
    events = [("Normal", why, f"{why.lower()} {' and '.join(what)}") for why, what in done.items() if what]
    return Plan(apply=apply, events=events)


def plan_invalid(obj: Obj, error: SpecError, now: str) -> Plan:
    """Record a refused spec once: a condition, and an Event only when the message is new."""
    previous = parse_status(obj.get("status"))
    generation = int(obj["metadata"].get("generation") or 0)
    new = status.invalid(previous, generation=generation, problems=error.problems, now=now)
    before = status.condition(previous, "SpecValid")
    after = status.condition(new, "SpecValid")
    events = []
    if before is None or after is None or (before.status, before.message) != (after.status, after.message):
        events.append(("Warning", "InvalidSpec", str(error)))
    return Plan(status=None if status.same(previous, new) else new, events=events)


def plan_rollout(
    ref: render.ModelRef, spec: VLLMModelSpec, settings: OperatorSettings, current: Sequence[Obj | None]
) -> Plan:
    """Children to apply, without rolling pods for a change of LoRA adapters alone.

    Running pods keep the adapters they started with in their args; the scrape loop
    hot-loads the rest. When the pods roll for another reason, they start with all of them.
    A new s3:// or gs:// adapter is such a reason: only a pod's init step downloads it.
    """
    started_with = render.static_adapters(current[1])
    if started_with is not None and not render.unfetched_adapters(spec, started_with):
        pinned = render.children(ref, render.with_adapters(spec, started_with), settings)
        plan = plan_children(pinned, current)
        if not any(m["kind"] == "Deployment" for m in plan.apply):
            return plan
    return plan_children(render.children(ref, spec, settings), current)


def foreign(current: Sequence[Obj | None], uid: str) -> list[str]:
    """Objects with our children's names that this model does not own ("Service tiny").

    They are never adopted: applying over one would take it over (a forced server-side apply
    adds our owner reference), and deleting the model would then let the garbage collector
    delete somebody else's object.
    """
    taken = []
    for child in current:
        if child is None:
            continue
        owners = (child.get("metadata") or {}).get("ownerReferences") or []
        if not any(owner.get("uid") == uid for owner in owners):
            taken.append(f"{child.get('kind', 'object')} {child['metadata']['name']}")
    return taken


def plan_conflict(obj: Obj, taken: Sequence[str], now: str) -> Plan:
    """Record that the children's names are taken: a condition, and an Event when new."""
    previous = parse_status(obj.get("status"))
    generation = int(obj["metadata"].get("generation") or 0)
    message = (
        f"{' and '.join(taken)} already exist{'s' if len(taken) == 1 else ''} in namespace "
        f"{obj['metadata']['namespace']} and {'is' if len(taken) == 1 else 'are'} not owned by this "
        "VLLMModel; the operator will not take over or change them: delete or rename them, "
        "or give the model another name"
    )
    new = status.conflict(previous, generation=generation, message=message, now=now)
    before = status.condition(previous, "Degraded")
    events = []
    if before is None or (before.reason, before.message) != ("NameConflict", message):
        events.append(("Warning", "NameConflict", message))
    why = f"{', '.join(taken)} not owned by this model"
    return Plan(
        status=None if status.same(previous, new) else new, events=events, retry=(CONFLICT_RETRY, why)
    )


def plan_admin_secret(
    ref: render.ModelRef, spec: VLLMModelSpec, settings: OperatorSettings, children: Plan, pods: Sequence[Obj]
) -> list[dict[str, Any]]:
    """The admin-token Secret of a LoRA model, to create when its Deployment is applied or when
    a pod cannot start for want of it (it was deleted): the operator may not read Secrets, so
    these are the moments it knows the Secret is needed."""
    if spec.lora is None:
        return []
    secret = render.admin_secret(ref, settings)
    name = secret["metadata"]["name"]
    missing = any(name in why for _, why in status.crashing_pods(pods))
    if missing or any(m["kind"] == "Deployment" for m in children.apply):
        return [secret]
    return []


@dataclass(frozen=True)
class Observed:
    """The children a status is computed from, kept so that scrape rounds need no reads."""

    deployment: Obj | None
    pods: Sequence[Obj]


async def reconcile(
    cluster: Cluster,
    obj: Obj,
    settings: OperatorSettings,
    health: throughput.Aggregate | None = None,
    now: Callable[[], str] = utcnow,
    status_later: bool = False,
) -> tuple[Plan, Observed | None]:
    """Bring the children in line with the spec and the status in line with the children; with
    `status_later`, a reconcile that applies children stops there (Plan.status_later), and the
    caller runs another soon, which their changes would bring anyway."""
    meta = obj["metadata"]
    if meta.get("deletionTimestamp"):
        return Plan(), None
    try:
        spec = parse_spec(obj.get("spec"))
    except SpecError as error:
        plan = plan_invalid(obj, error, now())
        await execute(cluster, obj, plan)
        return plan, None

    ref = ref_of(obj)
    # Same order as render.children: Service, then Deployment.
    current = list(await asyncio.gather(*(cluster.get(k, ref.namespace, ref.name) for k in CHILD_KINDS)))
    taken = foreign(current, ref.uid)
    if taken:
        plan = plan_conflict(obj, taken, now())
        await execute(cluster, obj, plan)
        return plan, None
    children_plan = plan_rollout(ref, spec, settings, current)
    create = plan_admin_secret(ref, spec, settings, children_plan, [])
    for manifest in create:
        await cluster.create(manifest)  # before the Deployment, whose pods read it
    applied = {m["kind"]: await cluster.apply(m) for m in children_plan.apply}
    if applied and status_later:
        plan = Plan(apply=children_plan.apply, create=create, events=children_plan.events, status_later=True)
        await execute(cluster, obj, plan)
        return plan, None
    # The applied object is the newest; status needs its generation and rollout state.
    deployment = applied.get("Deployment") or current[1]
    # A Deployment created just now has no pods yet; their events bring the next reconcile.
    new_deployment = current[1] is None and "Deployment" in applied
    pods = [] if new_deployment else await cluster.list_pods(ref.namespace, render.selector_string(ref.name))
    observed = Observed(deployment, pods)
    if not create:
        create = plan_admin_secret(ref, spec, settings, Plan(), observed.pods)
        for manifest in create:
            await cluster.create(manifest)

    previous = parse_status(obj.get("status"))
    new = desired_status(obj, spec, observed, health, settings, now())
    plan = Plan(
        apply=children_plan.apply,
        create=create,
        status=None if status.same(previous, new) else new,
        events=children_plan.events + transition_events(previous, new),
    )
    await execute(cluster, obj, plan)
    return plan, observed


def desired_status(
    obj: Obj,
    spec: VLLMModelSpec,
    observed: Observed,
    health: throughput.Aggregate | None,
    settings: OperatorSettings,
    now: str,
) -> VLLMModelStatus:
    """The whole status of a valid model: rollout state, pod health and throughput."""
    ref = ref_of(obj)
    generation = int(obj["metadata"].get("generation") or 0)
    new = status.observed(
        parse_status(obj.get("status")),
        generation=generation,
        desired_replicas=spec.replicas,
        deployment=observed.deployment,
        pods=observed.pods,
        endpoint=render.endpoint(ref, settings),
        selector=render.selector_string(ref.name),
        now=now,
        unhealthy=health.unhealthy if health else None,
    )
    if health is None:
        return new
    conditions = new.conditions
    if health.adapters_ready is not None:
        conditions = status.set_condition(conditions, "AdaptersReady", health.adapters_ready, generation, now)
    return new.model_copy(
        update={
            "metrics": health.metrics,
            "pods": health.pods,
            "lora_adapters": health.adapters,
            "conditions": conditions,
            "routing": health.routing,
        }
    )


def plan_scrape(
    obj: Obj,
    spec: VLLMModelSpec,
    observed: Observed,
    health: throughput.Aggregate,
    settings: OperatorSettings,
    now: str,
    events: Sequence[tuple[str, str, str]] = (),
) -> Plan:
    """After a scrape round: a status write only when the figures moved meaningfully."""
    previous = parse_status(obj.get("status"))
    new = desired_status(obj, spec, observed, health, settings, now)
    if not throughput.worth_writing(previous, new, settings.rate_hysteresis):
        return Plan(events=list(events))
    return Plan(status=new, events=transition_events(previous, new) + list(events))


def transition_events(previous: VLLMModelStatus, new: VLLMModelStatus) -> list[tuple[str, str, str]]:
    """Events for phase changes users care about."""
    if previous.phase == new.phase or new.phase is None:
        return []
    ready = status.condition(new, "Ready")
    degraded = status.condition(new, "Degraded")
    if new.phase == "Ready":
        return [("Normal", "Ready", ready.message if ready else "ready")]
    if new.phase in ("Degraded", "Pending") and degraded is not None and degraded.status == "True":
        return [("Warning", degraded.reason, degraded.message)]
    return []


async def execute(cluster: Cluster, obj: Obj, plan: Plan) -> None:
    """Write a plan's status and events; its children were applied first, by `reconcile`."""
    meta = obj["metadata"]
    if plan.status is not None:
        new = {k: v for k, v in dump(plan.status).items() if k not in OWN_WRITER}
        previous = {k: v for k, v in (obj.get("status") or {}).items() if k not in OWN_WRITER}
        await cluster.write_status(meta["namespace"], meta["name"], new, previous)
    for kind, reason, message in plan.events:
        await cluster.event(obj, kind, reason, message)
