"""Glue between kopf's events and `reconcile`: one lock per model, caches, and the scrape loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_operator import k8s, lora, metrics, reconcile, render, throughput
from vllm_operator.api import ConditionStatus, RoutingStatus, SpecError, VLLMModelSpec, parse_spec
from vllm_operator.scrape import Scraper, Target, targets_of
from vllm_operator.settings import OperatorSettings
from vllm_operator.store import Key, ModelState, Store

log = logging.getLogger(__name__)
Obj = Mapping[str, Any]
Verdict = tuple[ConditionStatus, str, str]


@dataclass(frozen=True)
class ModelScrape:
    """One model in a scrape round: its spec, its pods, and the admin token their adapter routes want."""

    spec: VLLMModelSpec
    pods: list[Target]
    token: str = field(default="", repr=False)


class Controller:
    """Reconciles models on their own changes and on changes of the objects they own."""

    def __init__(self, cluster: reconcile.Cluster, settings: OperatorSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self.store = Store()

    # ---- watch-driven reconciles ---------------------------------------------------------

    def on_model(self, namespace: str, name: str, coalesce: bool = False) -> reconcile.Plan | None:
        """Reconcile from a fresh read, so that concurrent triggers never act on stale objects;
        with `coalesce`, not at all if a reconcile of the model is already waiting (Store.turn)."""
        with self.store.turn((namespace, name), coalesce) as turn:
            if not turn:
                metrics.COALESCED.inc()
                return None
            with metrics.RECONCILE_SECONDS.time():
                try:
                    plan = self._reconcile((namespace, name))
                except Exception:
                    metrics.RECONCILES.labels("error").inc()
                    raise
        metrics.RECONCILES.labels("ok" if plan is not None else "gone").inc()
        if plan is not None:
            count_writes(plan)
        return plan

    def _reconcile(self, key: Key) -> reconcile.Plan | None:
        """One reconcile; the caller holds the model's turn."""
        obj = self.cluster.get("VLLMModel", *key)
        if obj is None:
            self.forget(key)
            return None
        known = self.store.get(key)
        health = known.health if known is not None else None
        try:
            plan, observed = reconcile.reconcile(self.cluster, obj, self.settings, health)
        except k8s.APIForbiddenError as exc:
            if "being terminated" in exc.message:
                return None  # the namespace is going away, and the model with it
            raise
        except k8s.APIInvalidError as exc:
            # The API server refused a child built from free-form fields (env, resources,
            # affinity ...): that is the user's spec, recorded like any invalid spec.
            error = SpecError([f"the API server refused a child: {exc.message or exc.reason}"])
            plan = reconcile.plan_invalid(obj, error, reconcile.utcnow())
            reconcile.execute(self.cluster, obj, plan)
            return plan
        if observed is not None:
            self.store.state(key).observed = observed
        return plan

    def on_child(self, child: Obj) -> reconcile.Plan | None:
        """A Deployment, Service or Pod of ours changed: its model decides what to do."""
        meta = child.get("metadata") or {}
        name = (meta.get("labels") or {}).get(render.INSTANCE_LABEL)
        if not name or not meta.get("namespace"):
            return None
        return self.on_model(meta["namespace"], name, coalesce=True)

    def remember(self, body: Obj) -> None:
        """Keep the latest body of a model from the watch, so scrape rounds need no reads."""
        meta = body["metadata"]
        self.store.state((meta["namespace"], meta["name"])).body = body

    def forget(self, key: Key) -> None:
        self.store.forget(key)

    # ---- scrape rounds -------------------------------------------------------------------

    def targets(self) -> dict[Key, ModelScrape]:
        """Pods to scrape per model, from what the last reconcile of each model saw.

        A LoRA model's pods are called with its admin token, which the server accepts on every
        /v1 route (also when it wants an API key): the operator never needs a user's key.
        """
        out = {}
        for key, state in self.store.items():
            body, observed = state.body, state.observed
            if body is None or observed is None:
                continue
            try:
                spec = parse_spec(body.get("spec"))
            except SpecError:
                continue
            token = ""
            if spec.lora is not None:
                token = render.admin_token(reconcile.ref_of(body), self.settings)
            pods = targets_of(observed.pods, spec.served_model_name or key[1], spec.lora is not None, token)
            out[key] = ModelScrape(spec, pods, token)
        return out

    async def scrape_round(self, scraper: Scraper) -> int:
        """Scrape every pod once and write the statuses that moved; returns the status writes."""
        started = time.monotonic()
        models = self.targets()
        samples = await scraper.scrape_all({key: model.pods for key, model in models.items()})
        views: dict[Key, RoutingStatus] | None = None
        if self.settings.router_url:
            demand = await scraper.router_demand(self.settings.router_url)
            # An unreadable router leaves the last view in place rather than wiping it.
            views = throughput.router_view(demand) if demand is not None else None
        scraped_at = reconcile.utcnow()
        writes = 0
        for key, current in samples.items():
            state = self.store.get(key)
            if state is None:
                continue  # deleted while the round awaited its pods
            if views is not None:
                state.routing = views.get(key, RoutingStatus())
            try:
                writes += await self._after_scrape(state, key, current, models[key], scraper, scraped_at)
            except Exception:  # one model's failure (e.g. a refused write) must not skip the others
                metrics.RECONCILES.labels("error").inc()
                log.exception("status of %s/%s after a scrape round", *key)
        metrics.SCRAPE_ROUND_SECONDS.observe(time.monotonic() - started)
        return writes

    async def _after_scrape(
        self,
        state: ModelState,
        key: Key,
        current: list[throughput.PodSample],
        model: ModelScrape,
        scraper: Scraper,
        scraped_at: str,
    ) -> int:
        """Adapters, health and the status write of one model after a round; 1 if it wrote."""
        current, adapters_ready, events = await self.manage_adapters(state, current, model, scraper)
        health = throughput.aggregate(state.samples, current, scraped_at)
        health = dataclasses.replace(health, adapters_ready=adapters_ready, routing=state.routing)
        state.samples = {s.name: s for s in current}
        state.health = health
        return int(await asyncio.to_thread(self._write_scrape, key, health, scraped_at, events))

    async def manage_adapters(
        self, state: ModelState, current: list[throughput.PodSample], model: ModelScrape, scraper: Scraper
    ) -> tuple[list[throughput.PodSample], Verdict | None, list[tuple[str, str, str]]]:
        """Load and unload adapters so every healthy pod serves the spec's; verify from /v1/models."""
        spec, targets = model.spec, model.pods
        if spec.lora is None:
            return current, None, []
        wanted = lora.desired(spec)
        waits, errors = state.adapter_waits, state.adapter_errors
        now = time.monotonic()
        fetched = {t.name: t.fetched for t in targets}
        waiting = {k: v[0] for k, v in waits.items()}
        calls = lora.plan_calls(wanted, current, waiting, now, lora.downloaded(spec), fetched)
        events: list[tuple[str, str, str]] = []
        if calls:
            by_name = {t.name: t for t in targets}
            results = await scraper.call_adapters(calls, {t.name: t.ip for t in targets}, model.token)
            for call, error in zip(calls, results, strict=True):
                pair = (call.pod, call.name)
                if not error:
                    waits.pop(pair, None)
                    errors.pop(call.name, None)
                    continue
                failures = waits.get(pair, (0.0, 0))[1] + 1
                waits[pair] = (now + lora.backoff(failures), failures)
                if errors.get(call.name) != error:
                    events.append(
                        ("Warning", "AdapterFailed", f"adapter {call.name} on pod {call.pod}: {error}")
                    )
                errors[call.name] = error
            # Status must come from what the pods say, not from our calls: ask them again.
            touched = {c.pod for c in calls}
            again = await scraper.scrape_all({0: [by_name[p] for p in sorted(touched) if p in by_name]})
            fresh = {s.name: s for s in again.get(0, [])}
            current = [fresh.get(s.name, s) for s in current]
        for name in list(errors):
            if name not in wanted:
                del errors[name]
        return current, lora.condition(wanted, current, errors), events

    def _write_scrape(
        self, key: Key, health: throughput.Aggregate, now: str, events: list[tuple[str, str, str]]
    ) -> bool:
        with self.store.lock(key):
            state = self.store.get(key)
            body, observed = (state.body, state.observed) if state is not None else (None, None)
            if body is None or observed is None or body["metadata"].get("deletionTimestamp"):
                return False
            try:
                spec = parse_spec(body.get("spec"))
            except SpecError:
                return False
            plan = reconcile.plan_scrape(body, spec, observed, health, self.settings, now, events)
            reconcile.execute(self.cluster, body, plan)
            count_writes(plan)
            return plan.status is not None

    async def scrape_forever(self, interval: float, scraper: Scraper) -> None:
        """A scrape round every `interval` seconds, for as long as the operator runs."""
        while True:
            started = time.monotonic()
            try:
                writes = await self.scrape_round(scraper)
                log.debug("scrape round: %d status writes in %.2fs", writes, time.monotonic() - started)
            except Exception:  # one bad round must not end the loop
                log.exception("scrape round failed")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


def count_writes(plan: reconcile.Plan) -> None:
    for manifest in plan.apply:
        metrics.APPLIES.labels(manifest["kind"]).inc()
    metrics.STATUS_WRITES.inc(plan.status is not None)
    for kind, _, _ in plan.events:
        metrics.EVENTS.labels(kind).inc()
