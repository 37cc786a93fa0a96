"""The scrape loop: every interval, read every ready pod (scrape), let `adapters` load what
the spec wants, and write the statuses that moved (reconcile.plan_scrape), one model's failure
never stopping the others."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from vllm_operator import adapters, metrics, reconcile, render, throughput
from vllm_operator.api import RoutingStatus, SpecError, VLLMModelSpec, parse_spec
from vllm_operator.cache import CachedCluster
from vllm_operator.controller import Controller, count_writes
from vllm_operator.scrape import Scraper, Target, targets_of
from vllm_operator.store import Key, ModelState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelScrape:
    """One model in a scrape round: its spec, its pods, and the admin token their adapter routes want."""

    spec: VLLMModelSpec
    pods: list[Target]
    token: str = field(default="", repr=False)


class Monitor:
    """Scrape rounds over the models a `Controller` knows, writing through its cluster."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def targets(self) -> dict[Key, ModelScrape]:
        """Pods to scrape per model, from what the last reconcile of each model saw.

        A LoRA model's pods are called with its admin token, which the server accepts on every
        /v1 route (also when it wants an API key): the operator never needs a user's key.
        """
        out = {}
        for key, state in self.controller.store.items():
            body, observed = state.body, state.observed
            if body is None or observed is None:
                continue
            try:
                spec = parse_spec(body.get("spec"))
            except SpecError:
                continue
            token = ""
            if spec.lora is not None:
                token = render.admin_token(reconcile.ref_of(body), self.controller.settings)
            pods = targets_of(observed.pods, spec.served_model_name or key[1], spec.lora is not None, token)
            out[key] = ModelScrape(spec, pods, token)
        return out

    async def scrape_round(self, scraper: Scraper) -> int:
        """Scrape every pod once and write the statuses that moved; returns the status writes."""
        started = time.monotonic()
        models = self.targets()
        samples = await scraper.scrape_all({key: model.pods for key, model in models.items()})
        views: dict[Key, RoutingStatus] | None = None
        if self.controller.settings.router_url:
            demand = await scraper.router_demand(self.controller.settings.router_url)
            # An unreadable router leaves the last view in place rather than wiping it.
            views = throughput.router_view(demand) if demand is not None else None
        scraped_at = reconcile.utcnow()
        writes = 0
        for key, current in samples.items():
            state = self.controller.store.get(key)
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
        """Adapters, health and the status writes of one model after a round; returns how many."""
        writes = 0

        async def withdraw(samples: list[throughput.PodSample], verdict: adapters.Verdict) -> None:
            nonlocal writes
            health = throughput.aggregate(state.samples, samples, scraped_at)
            health = dataclasses.replace(health, adapters_ready=verdict, routing=state.routing)
            writes += await self._write_scrape(key, health, scraped_at, [])

        current, adapters_ready, events = await adapters.manage_adapters(
            state, current, model.spec, model.pods, model.token, scraper, withdraw
        )
        health = throughput.aggregate(state.samples, current, scraped_at)
        health = dataclasses.replace(health, adapters_ready=adapters_ready, routing=state.routing)
        state.samples = {s.name: s for s in current}
        state.health = health
        return writes + int(await self._write_scrape(key, health, scraped_at, events))

    async def _write_scrape(
        self, key: Key, health: throughput.Aggregate, now: str, events: list[tuple[str, str, str]]
    ) -> bool:
        # The model's lock: a reconcile writing its status meanwhile would be overwritten.
        async with self.controller.store.lock(key):
            state = self.controller.store.get(key)
            if state is None or state.body is None or state.observed is None:
                return False
            body, observed = state.body, state.observed
            if body["metadata"].get("deletionTimestamp"):
                return False
            try:
                spec = parse_spec(body.get("spec"))
            except SpecError:
                return False
            plan = reconcile.plan_scrape(body, spec, observed, health, self.controller.settings, now, events)
            # Through the cache, so that the next reconcile compares with what this wrote.
            await reconcile.execute(CachedCluster(self.controller.cluster, state), body, plan)
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
