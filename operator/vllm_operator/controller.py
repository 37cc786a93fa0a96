"""Reconciles on kopf's events: a model's own changes and its children's, one turn per model
(store.Store), a burst of child events coalesced. The scrape loop is `monitor`, the adapter
calls `adapters`, the autoscaler `autoscaler`; all share this controller's store."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping
from typing import Any

from vllm_operator import k8s, metrics, reconcile, render
from vllm_operator.api import SpecError
from vllm_operator.cache import CachedCluster
from vllm_operator.settings import OperatorSettings
from vllm_operator.store import Key, ModelState, Store

log = logging.getLogger(__name__)
Obj = Mapping[str, Any]

# How long a model's child events gather before the one reconcile they share. A new model's
# children change ~8 times on their way to Ready (Deployment and Service added, the
# Deployment's status, each pod's), and each event used to cost a reconcile: 1,608 for 200
# models in bench-operator. The status shows a child's change this much later.
CHILD_SETTLE_SECONDS = 0.5
# A child's reconcile (status from the children) waits while reconciles of models' own changes
# (children to create or change) are under way, at most this long. 200 models applied at once
# are a stream of spec reconciles; status reconciles between them only slow the API server
# that is creating the rest (and each waiting model's events keep gathering meanwhile).
SPEC_FIRST_SECONDS = 10.0
# After a failed reconcile of a model's own change, the next attempt waits this long (seconds,
# by failures in a row; the last repeats), unless the failure names its own delay.
RETRY_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


def retry_delay(failures: int) -> float:
    """The wait after a failure, with `failures` failures in a row before it: RETRY_BACKOFF's
    entry of that index, its last one from then on."""
    return RETRY_BACKOFF[min(failures, len(RETRY_BACKOFF) - 1)]


class Controller:
    """Reconciles models on their own changes and on changes of the objects they own; owns the
    store of what the operator knows about each model."""

    def __init__(
        self,
        cluster: reconcile.Cluster,
        settings: OperatorSettings,
        child_settle_seconds: float = CHILD_SETTLE_SECONDS,
        spec_first_seconds: float = SPEC_FIRST_SECONDS,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.store = Store()
        self.child_settle_seconds = child_settle_seconds
        self.spec_first_seconds = spec_first_seconds
        # Models whose child events are gathering (touched on the event loop only).
        self._settling: set[Key] = set()
        # Reconciles of models' own changes waiting or running, and an Event set when none is.
        self._spec_work = 0
        self._no_spec_work = asyncio.Event()
        self._no_spec_work.set()
        # A model's next attempt after a failure or a plan's retry, one at most per model.
        self._retries: dict[Key, asyncio.Task[None]] = {}
        # Status reconciles that spec reconciles asked for (status_soon), until they end.
        self._soon: set[asyncio.Task[None]] = set()

    # ---- a model's own changes -----------------------------------------------------------

    def seen(self, body: Obj) -> bool:
        """A model's watch event: keep its body; True when its spec is new to this process (the
        first event of it, or a new generation), which a reconcile must act on.

        kopf's create/update handlers would do the same, at the price of an annotation patch
        (its diff-base) on every model they handle: a write and a watch event each, 200 of
        them while bench-operator's 200 models are applied.
        """
        state = self.remember(body)
        generation = body["metadata"].get("generation")
        if state.spec_generation == generation:
            return False
        state.spec_generation = generation
        return True

    async def on_spec(self, namespace: str, name: str) -> reconcile.Plan | None:
        """Reconcile a model's new spec now, and again later while it fails or its plan asks to
        (a transient API error's delay, a name conflict's, else RETRY_BACKOFF). A later change
        replaces a pending retry."""
        key = (namespace, name)
        self._cancel_retry(key)
        return await self._attempt(key, 0)

    async def _attempt(self, key: Key, failures: int) -> reconcile.Plan | None:
        plan = None
        try:
            plan = await self.on_model(*key)
        except k8s.TransientError as exc:
            delay, why = exc.delay, str(exc)
        except Exception as exc:
            delay, why = retry_delay(failures), f"{type(exc).__name__}: {exc}"
            await self._report(key, why)
        else:
            if plan is None or plan.retry is None:
                return plan
            delay, why = plan.retry
        log.warning("reconcile of %s/%s again in %.0fs: %s", *key, delay, why)
        self._retries[key] = asyncio.create_task(self._retry(key, delay, failures + 1))
        return plan

    async def _report(self, key: Key, why: str) -> None:
        """A Warning Event on the model for a failed reconcile; none if that fails too."""
        state = self.store.get(key)
        if state is None or state.body is None:
            return
        try:
            await self.cluster.event(state.body, "Warning", "ReconcileFailed", why[:1024])
        except Exception as exc:
            log.warning("no Event for %s/%s: %s", *key, exc)

    async def _retry(self, key: Key, delay: float, failures: int) -> None:
        await asyncio.sleep(delay)
        self._retries.pop(key, None)  # this task: a new failure schedules another
        await self._attempt(key, failures)

    def _cancel_retry(self, key: Key) -> None:
        task = self._retries.pop(key, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        """Cancel every pending retry and status reconcile (the operator is stopping)."""
        for key in list(self._retries):
            self._cancel_retry(key)
        for task in list(self._soon):
            task.cancel()

    # ---- watch-driven reconciles ---------------------------------------------------------

    async def on_model(self, namespace: str, name: str, coalesce: bool = False) -> reconcile.Plan | None:
        """Reconcile from the newest the watches have shown of the model and its children (see
        `cache`), which is how each trigger's change reaches it; with `coalesce`, not at all if
        a reconcile of the model is already waiting (Store.turn). Other models' reconciles run
        while this one awaits the API server."""
        spec = not coalesce
        if spec:
            self._spec_work += 1
            self._no_spec_work.clear()
        try:
            async with self.store.turn((namespace, name), coalesce) as turn:
                if not turn:
                    metrics.COALESCED.inc()
                    return None
                with metrics.RECONCILE_SECONDS.time():
                    try:
                        plan = await self._reconcile((namespace, name), status_later=spec)
                    except Exception:
                        metrics.RECONCILES.labels("error").inc()
                        raise
        finally:
            if spec:
                self._spec_work -= 1
                if not self._spec_work:
                    self._no_spec_work.set()
        metrics.RECONCILES.labels("ok" if plan is not None else "gone").inc()
        if plan is not None:
            count_writes(plan)
        return plan

    async def _reconcile(self, key: Key, status_later: bool = False) -> reconcile.Plan | None:
        """One reconcile; the caller holds the model's turn. With `status_later` (a model's own
        change), one that applies children leaves the status to a status reconcile soon, which
        waits while other models' changes are reconciled: 200 models applied at once get their
        children first and their status after, rather than each a status write between."""
        state = self.store.get(key)
        obj = state.body if state is not None else None
        if state is None or obj is None:  # not seen on the watch yet: read it
            obj = await self.cluster.get("VLLMModel", *key)
            if obj is None:
                self.forget(key)
                return None
            state = self.remember(obj)
        cluster = CachedCluster(self.cluster, state)
        try:
            plan, observed = await reconcile.reconcile(
                cluster, obj, self.settings, state.health, status_later=status_later
            )
        except k8s.APIForbiddenError as exc:
            if "being terminated" in exc.message:
                return None  # the namespace is going away, and the model with it
            raise
        except k8s.APIInvalidError as exc:
            # The API server refused a child built from free-form fields (env, resources,
            # affinity ...): that is the user's spec, recorded like any invalid spec.
            error = SpecError([f"the API server refused a child: {exc.message or exc.reason}"])
            plan = reconcile.plan_invalid(obj, error, reconcile.utcnow())
            await reconcile.execute(cluster, obj, plan)
            return plan
        if observed is not None:
            state.observed = observed
        if plan.status_later:
            self.status_soon(key)
        return plan

    def status_soon(self, key: Key) -> None:
        """Reconcile the model's status soon, as a child's event would (see `on_child`), and
        again while that fails (RETRY_BACKOFF): the spec reconcile that asked for it wrote none."""
        task = asyncio.create_task(self._status(key))
        self._soon.add(task)
        task.add_done_callback(self._soon.discard)

    async def _status(self, key: Key) -> None:
        for failures in itertools.count():
            try:
                await self._settled(key)
                return
            except Exception as exc:
                delay = retry_delay(failures)
                log.warning("status of %s/%s again in %.0fs: %s: %s", *key, delay, type(exc).__name__, exc)
            await asyncio.sleep(delay)
            if key not in self.store:
                return

    async def on_child(self, child: Obj, gone: bool = False) -> reconcile.Plan | None:
        """A Deployment, Service or Pod of ours changed (or is `gone`): keep it (see `cache`),
        and reconcile its model once the burst has settled and no reconcile of a model's own
        change is under way (`spec_first_seconds` at most). Events of the model's children
        until then share that reconcile (None for them): it reads after all of their changes.
        An event after it has started opens another."""
        meta = child.get("metadata") or {}
        name = (meta.get("labels") or {}).get(render.INSTANCE_LABEL)
        if not name or not meta.get("namespace"):
            return None
        key = (meta["namespace"], name)
        self.store.state(key).see_child(child, gone)
        return await self._settled(key)

    async def _settled(self, key: Key) -> reconcile.Plan | None:
        if key in self._settling:
            metrics.COALESCED.inc()
            return None
        self._settling.add(key)
        try:
            await asyncio.sleep(self.child_settle_seconds)
            if self._spec_work:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._no_spec_work.wait(), self.spec_first_seconds)
        finally:
            self._settling.discard(key)
        return await self.on_model(*key, True)

    def remember(self, body: Obj) -> ModelState:
        """Keep the latest body of a model (reconciles and scrape rounds read it); its state."""
        meta = body["metadata"]
        state = self.store.state((meta["namespace"], meta["name"]))
        state.see(body)
        return state

    def forget(self, key: Key) -> None:
        self._cancel_retry(key)
        self.store.forget(key)


def count_writes(plan: reconcile.Plan) -> None:
    for manifest in plan.apply:
        metrics.APPLIES.labels(manifest["kind"]).inc()
    metrics.STATUS_WRITES.inc(plan.status is not None)
    for kind, _, _ in plan.events:
        metrics.EVENTS.labels(kind).inc()
