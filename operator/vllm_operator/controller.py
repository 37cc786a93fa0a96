"""Glue between kopf's events and `reconcile`: one lock per model, caches, and the scrape loop."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from vllm_operator import metrics, reconcile, throughput
from vllm_operator.api import SpecError, parse_spec
from vllm_operator.render import INSTANCE_LABEL
from vllm_operator.scrape import Scraper, Target, targets_of
from vllm_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
Obj = Mapping[str, Any]
Key = tuple[str, str]


class Controller:
    """Reconciles models on their own changes and on changes of the objects they own."""

    def __init__(self, cluster: reconcile.Cluster, settings: OperatorSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self._locks: defaultdict[Key, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()
        self.models: dict[Key, Obj] = {}
        self.observed: dict[Key, reconcile.Observed] = {}
        self.health: dict[Key, throughput.Aggregate] = {}
        self.samples: dict[Key, dict[str, throughput.PodSample]] = {}

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    # ---- watch-driven reconciles ---------------------------------------------------------

    def on_model(self, namespace: str, name: str) -> reconcile.Plan | None:
        """Reconcile from a fresh read, so that concurrent triggers never act on stale objects."""
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
        with self._lock(key):
            obj = self.cluster.get("VLLMModel", *key)
            if obj is None:
                self.forget(key)
                return None
            try:
                plan, observed = reconcile.reconcile(self.cluster, obj, self.settings, self.health.get(key))
            except ApiException as exc:
                if exc.status == 403 and "being terminated" in (exc.body or ""):
                    return None  # the namespace is going away, and the model with it
                if exc.status not in (400, 422):
                    raise
                # The API server refused a child built from free-form fields (env, resources,
                # affinity ...): that is the user's spec, recorded like any invalid spec.
                error = SpecError([f"the API server refused a child: {api_message(exc)}"])
                plan = reconcile.plan_invalid(obj, error, reconcile.utcnow())
                reconcile.execute(self.cluster, obj, plan)
                return plan
            if observed is not None:
                self.observed[key] = observed
            return plan

    def on_child(self, child: Obj) -> reconcile.Plan | None:
        """A Deployment, Service or Pod of ours changed: its model decides what to do."""
        meta = child.get("metadata") or {}
        name = (meta.get("labels") or {}).get(INSTANCE_LABEL)
        if not name or not meta.get("namespace"):
            return None
        return self.on_model(meta["namespace"], name)

    def remember(self, body: Obj) -> None:
        """Keep the latest body of a model from the watch, so scrape rounds need no reads."""
        meta = body["metadata"]
        self.models[(meta["namespace"], meta["name"])] = body

    def forget(self, key: Key) -> None:
        for cache in (self.models, self.observed, self.health, self.samples):
            cache.pop(key, None)

    # ---- scrape rounds -------------------------------------------------------------------

    def targets(self) -> dict[Key, list[Target]]:
        """Pods to scrape per model, from what the last reconcile of each model saw."""
        out = {}
        for key, observed in list(self.observed.items()):
            body = self.models.get(key)
            if body is None:
                continue
            try:
                served = parse_spec(body.get("spec")).served_model_name or key[1]
            except SpecError:
                continue
            out[key] = targets_of(observed.pods, served)
        return out

    async def scrape_round(self, scraper: Scraper) -> int:
        """Scrape every pod once and write the statuses that moved; returns the status writes."""
        started = time.monotonic()
        samples = await scraper.scrape_all(self.targets())
        scraped_at = reconcile.utcnow()
        writes = 0
        for key, current in samples.items():
            health = throughput.aggregate(self.samples.get(key, {}), current, scraped_at)
            self.samples[key] = {s.name: s for s in current}
            self.health[key] = health
            if await asyncio.to_thread(self._write_scrape, key, health, scraped_at):
                writes += 1
        metrics.SCRAPE_ROUND_SECONDS.observe(time.monotonic() - started)
        return writes

    def _write_scrape(self, key: Key, health: throughput.Aggregate, now: str) -> bool:
        with self._lock(key):
            body, observed = self.models.get(key), self.observed.get(key)
            if body is None or observed is None or body["metadata"].get("deletionTimestamp"):
                return False
            try:
                plan = reconcile.plan_scrape(body, observed, health, self.settings, now)
            except SpecError:
                return False
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


def api_message(exc: ApiException) -> str:
    """The human part of an API server error body."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
