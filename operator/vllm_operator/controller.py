"""Reconciles on kopf's events: a model's own changes and its children's, one turn per model
(store.Store), a burst of child events coalesced. The scrape loop is `monitor`, the adapter
calls `adapters`, the autoscaler `autoscaler`; all share this controller's store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from vllm_operator import k8s, metrics, reconcile, render
from vllm_operator.api import SpecError
from vllm_operator.settings import OperatorSettings
from vllm_operator.store import Key, Store

log = logging.getLogger(__name__)
Obj = Mapping[str, Any]

# How long a model's child events gather before the one reconcile they share. A new model's
# children change ~8 times on their way to Ready (Deployment and Service added, the
# Deployment's status, each pod's), and each event used to cost a reconcile: 1,608 for 200
# models in bench-operator. The status shows a child's change this much later.
CHILD_SETTLE_SECONDS = 0.5


class Controller:
    """Reconciles models on their own changes and on changes of the objects they own; owns the
    store of what the operator knows about each model."""

    def __init__(
        self,
        cluster: reconcile.Cluster,
        settings: OperatorSettings,
        child_settle_seconds: float = CHILD_SETTLE_SECONDS,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.store = Store()
        self.child_settle_seconds = child_settle_seconds
        # Models whose child events are gathering (touched on the event loop only).
        self._settling: set[Key] = set()

    # ---- watch-driven reconciles ---------------------------------------------------------

    async def on_model(self, namespace: str, name: str, coalesce: bool = False) -> reconcile.Plan | None:
        """Reconcile from a fresh read, so that concurrent triggers never act on stale objects;
        with `coalesce`, not at all if a reconcile of the model is already waiting (Store.turn).
        Other models' reconciles run while this one awaits the API server."""
        async with self.store.turn((namespace, name), coalesce) as turn:
            if not turn:
                metrics.COALESCED.inc()
                return None
            with metrics.RECONCILE_SECONDS.time():
                try:
                    plan = await self._reconcile((namespace, name))
                except Exception:
                    metrics.RECONCILES.labels("error").inc()
                    raise
        metrics.RECONCILES.labels("ok" if plan is not None else "gone").inc()
        if plan is not None:
            count_writes(plan)
        return plan

    async def _reconcile(self, key: Key) -> reconcile.Plan | None:
        """One reconcile; the caller holds the model's turn."""
        obj = await self.cluster.get("VLLMModel", *key)
        if obj is None:
            self.forget(key)
            return None
        known = self.store.get(key)
        health = known.health if known is not None else None
        try:
            plan, observed = await reconcile.reconcile(self.cluster, obj, self.settings, health)
        except k8s.APIForbiddenError as exc:
            if "being terminated" in exc.message:
                return None  # the namespace is going away, and the model with it
            raise
        except k8s.APIInvalidError as exc:
            # The API server refused a child built from free-form fields (env, resources,
            # affinity ...): that is the user's spec, recorded like any invalid spec.
            error = SpecError([f"the API server refused a child: {exc.message or exc.reason}"])
            plan = reconcile.plan_invalid(obj, error, reconcile.utcnow())
            await reconcile.execute(self.cluster, obj, plan)
            return plan
        if observed is not None:
            self.store.state(key).observed = observed
        return plan

    async def on_child(self, child: Obj) -> reconcile.Plan | None:
        """A Deployment, Service or Pod of ours changed: reconcile its model once the burst has
        settled. Events of the model's children within `child_settle_seconds` of the first share
        that reconcile (None for them): it reads after all of their changes, since a watch
        event comes after its change is stored. An event after the window opens its own."""
        meta = child.get("metadata") or {}
        name = (meta.get("labels") or {}).get(render.INSTANCE_LABEL)
        if not name or not meta.get("namespace"):
            return None
        key = (meta["namespace"], name)
        if key in self._settling:
            metrics.COALESCED.inc()
            return None
        self._settling.add(key)
        try:
            await asyncio.sleep(self.child_settle_seconds)
        finally:
            self._settling.discard(key)
        return await self.on_model(*key, True)

    def remember(self, body: Obj) -> None:
        """Keep the latest body of a model from the watch, so scrape rounds need no reads."""
        meta = body["metadata"]
        self.store.state((meta["namespace"], meta["name"])).body = body

    def forget(self, key: Key) -> None:
        self.store.forget(key)


def count_writes(plan: reconcile.Plan) -> None:
    for manifest in plan.apply:
        metrics.APPLIES.labels(manifest["kind"]).inc()
    metrics.STATUS_WRITES.inc(plan.status is not None)
    for kind, _, _ in plan.events:
        metrics.EVENTS.labels(kind).inc()
