"""The autoscaling loop: the router's demand and the pods' last scrape in, scale writes out.

Each tick reads /router/demand once, feeds every autoscaled model's signals to `autoscale`, and
writes `spec.replicas` through the scale subresource when the decision differs, with the reason
in `status.autoscaling` and an Event. Going to zero first asks the router to hold the model's
requests (/router/park), which it grants only when none is in flight, held or recent: a request
arriving later is held and wakes the model, so none is lost to the race.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm_operator import autoscale, metrics, reconcile, throughput
from vllm_operator.api import (
    Autoscaling,
    AutoscalingStatus,
    ScaleDecision,
    SpecError,
    dump,
    parse_spec,
    parse_status,
)
from vllm_operator.autoscale import Decision, History, Signals
from vllm_operator.controller import Controller
from vllm_operator.scrape import Scraper
from vllm_operator.store import Key
from vllm_operator.throughput import PodSample

log = logging.getLogger(__name__)
KEEP_DECISIONS = 5
ABORTED = "scale to zero aborted"
PENDING_SECONDS = 10.0
"""How long a write of ours is taken as the replicas before the watch shows it."""


@dataclass(frozen=True)
class RouterDemand:
    in_flight: int
    requests: int


def demand_of(raw: Any) -> dict[Key, RouterDemand]:
    """Per model (namespace, name): the router's in-flight (held included) and answered counts."""
    # `requests` is a counter: bounded like the pods' counters, not like a gauge.
    fields = {"inFlight": throughput.MAX_GAUGE, "requests": throughput.MAX_COUNTER}
    return {key: RouterDemand(*counts) for key, counts in throughput.router_counts(raw, fields).items()}


def engine_signals(samples: Mapping[str, PodSample]) -> tuple[int, int, float, int]:
    """(running, waiting, mean KV-cache use, ready pods) from a model's last scrape."""
    healthy = [s for s in samples.values() if s.healthy]
    running = int(sum(s.running for s in healthy))
    waiting = int(sum(s.waiting for s in healthy))
    kv = sum(s.kv_cache_usage for s in healthy) / len(healthy) if healthy else 0.0
    return running, waiting, kv, len(healthy)


class Autoscaler:
    def __init__(
        self, controller: Controller, scraper: Scraper, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.controller = controller
        self.settings = controller.settings
        self.scraper = scraper
        self.clock = clock
        self.histories: dict[Key, History] = {}
        self.pending: dict[Key, tuple[int, float]] = {}
        """A write of ours the model cache may not show yet: (replicas, when)."""
        self.written: dict[Key, AutoscalingStatus] = {}
        """status.autoscaling as last written, per model."""

    async def tick(self) -> None:
        now = self.clock()
        demand: dict[Key, RouterDemand] | None = None
        if self.settings.router_url:
            raw = await self.scraper.router_demand(self.settings.router_url)
            if raw is None:
                return  # no decisions on a stale view: a model at zero would look unrouted
            demand = demand_of(raw)
        bodies = self.controller.store.bodies()
        for key in [k for k in self.histories if k not in bodies]:
            self.forget(key)
        for key, body in bodies.items():
            try:
                await self._model(key, body, demand, now)
            except Exception:  # one model's failure must not stop the others' scaling
                metrics.RECONCILES.labels("error").inc()
                log.exception("autoscaling %s/%s", *key)

    def forget(self, key: Key) -> None:
        self.histories.pop(key, None)
        self.pending.pop(key, None)
        self.written.pop(key, None)

    def _current(self, key: Key, replicas: int, now: float) -> int:
        pending = self.pending.get(key)
        if pending is None:
            return replicas
        if pending[0] == replicas or now - pending[1] > PENDING_SECONDS:
            del self.pending[key]
            return replicas
        return pending[0]

    async def _model(
        self, key: Key, body: Mapping[str, Any], demand: dict[Key, RouterDemand] | None, now: float
    ) -> None:
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError:
            return
        if (
            spec.autoscaling is None
            or spec.autoscaling.driver == "External"
            or body["metadata"].get("deletionTimestamp")
        ):
            self.forget(key)
            return
        policy = spec.autoscaling
        history = self.histories.get(key)
        current = self._current(key, spec.replicas, now)
        if history is None:
            history = self.histories[key] = History(started=now, replicas=current)
        elif current > history.replicas:
            autoscale.scaled(history, history.replicas, current, now)
            if history.replicas == 0:  # the router's write: recorded like ours
                await self._record(key, body, 0, current, "woken by the router for a held request")
        history.replicas = current
        state = self.controller.store.get(key)
        running, waiting, kv, ready = engine_signals(state.samples if state is not None else {})
        seen = demand.get(key) if demand is not None else None
        signals = Signals(
            at=now,
            in_flight=seen.in_flight if seen else None,
            requests=seen.requests if seen else None,
            running=running,
            waiting=waiting,
            kv_cache=kv,
            ready=ready,
        )
        autoscale.observe(history, signals, policy)
        decision = autoscale.decide(history, policy, current, now)
        if decision.replicas != current:
            decision = await self._scale(key, body, policy, current, decision, now)
        await self._show(key, body, decision)

    async def _scale(
        self,
        key: Key,
        body: Mapping[str, Any],
        policy: Autoscaling,
        current: int,
        decision: Decision,
        now: float,
    ) -> Decision:
        namespace, name = key
        if decision.replicas == 0:
            assert self.controller.settings.router_url  # decide() goes to zero only with a router view
            granted, why = await self.scraper.park(
                self.settings.router_url,
                namespace,
                name,
                policy.idle_seconds,
                self.settings.router_token,
            )
            if not granted:
                self.histories[key].last_activity = now  # start the idle time over
                log.info("%s/%s: %s: %s", namespace, name, ABORTED, why)
                return Decision(current, f"{ABORTED}: {why}")
        cluster = self.controller.cluster
        wrote = await cluster.scale(namespace, name, decision.replicas, current)
        if not wrote:
            return Decision(current, "spec.replicas changed under the decision; deciding again")
        self.pending[key] = (decision.replicas, now)
        autoscale.scaled(self.histories[key], current, decision.replicas, now)
        self.histories[key].replicas = decision.replicas
        metrics.SCALES.labels("up" if decision.replicas > current else "down").inc()
        await self._record(key, body, current, decision.replicas, decision.reason)
        return decision

    def _last(self, key: Key, body: Mapping[str, Any]) -> AutoscalingStatus:
        """status.autoscaling as we last wrote it (the watched body may not show it yet)."""
        last = self.written.get(key)
        if last is None:
            last = parse_status(body.get("status")).autoscaling or AutoscalingStatus(desired_replicas=-1)
            self.written[key] = last
        return last

    async def _record(self, key: Key, body: Mapping[str, Any], old: int, new: int, reason: str) -> None:
        """A replica change into status.autoscaling (desired, reason, the last decisions) and an Event."""
        when = reconcile.utcnow()
        last = self._last(key, body)
        change = ScaleDecision(time=when, from_replicas=old, to_replicas=new, reason=reason[:256])
        record = AutoscalingStatus(
            desired_replicas=new,
            reason=reason[:256],
            last_scale_time=when,
            decisions=[*last.decisions, change][-KEEP_DECISIONS:],
        )
        await self._patch(key, record)
        await self.controller.cluster.event(body, "Normal", "Scaled", f"replicas {old} -> {new}: {reason}")

    async def _patch(self, key: Key, record: AutoscalingStatus) -> None:
        await self.controller.cluster.patch_status(*key, {"autoscaling": dump(record)})
        self.written[key] = record

    async def _show(self, key: Key, body: Mapping[str, Any], decision: Decision) -> None:
        """Keep status.autoscaling's desired replicas true; the reason is written with it."""
        last = self._last(key, body)
        # An aborted scale to zero is shown too (e.g. a router without a token refuses every
        # park): the desired count alone would not change.
        aborted = decision.reason.startswith(ABORTED) and decision.reason[:256] != last.reason
        if last.desired_replicas == decision.replicas and not aborted:
            return
        await self._patch(
            key,
            last.model_copy(update={"desired_replicas": decision.replicas, "reason": decision.reason[:256]}),
        )

    async def run_forever(self, interval: float) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:  # one bad tick must not end the loop
                log.exception("autoscaling tick failed")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
