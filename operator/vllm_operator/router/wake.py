"""Autoscaled models at zero: requests held while they wake, one wake-up write, and the park gate.

A request for an autoscaled model with no ready pod waits here instead of getting a 503. If the
model is at zero (`spec.replicas: 0`), the first such request starts exactly one write of
`spec.replicas: 1` through the scale subresource (a JSON-patch test on 0, so the autoscaler and
other router replicas never double it); later ones only wait. Every table change (the watch, not
a poll) wakes the waiters to look again, so a request goes out as soon as a pod is ready.

Before the autoscaler takes a model to zero it parks it here (`POST /router/park`): granted only
when nothing is in flight, held or answered within the model's idle time, and from then on
requests wait rather than reach pods that are about to stop. Waiting requests then wake the
model as soon as its replicas read 0; a park that is not followed by 0 expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vllm_operator.router.table import Route, Table

log = logging.getLogger(__name__)

Scaler = Callable[[str, str, int, int], Awaitable[bool]]
"""`scaler(namespace, name, replicas, expect)`: the scale write, False when replicas was not `expect`."""
PARK_SECONDS = 15.0
"""How long a park holds requests while the autoscaler writes 0; then it expires."""
WAKE_RETRY_SECONDS = 5.0
"""A wake-up not seen in the table after this long (the write failed, or was lost) is tried again."""


@dataclass
class ModelHold:
    waiters: set[asyncio.Future[None]] = field(default_factory=set)
    parked_until: float = 0.0
    woke_at: float = float("-inf")


class Holds:
    def __init__(self, scaler: Scaler | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.scaler = scaler
        self.clock = clock
        self.models: dict[str, ModelHold] = {}
        self.last_request: dict[str, float] = {}
        """Per model key: when a request last arrived or ended (monotonic)."""
        self.started = clock()
        self.wake_writes = 0
        """Wake-up writes that changed the replicas (0 -> 1)."""
        self.tasks: set[asyncio.Task[None]] = set()

    def _hold(self, key: str) -> ModelHold:
        hold = self.models.get(key)
        if hold is None:
            hold = self.models[key] = ModelHold()
        return hold

    def touch(self, key: str) -> None:
        self.last_request[key] = self.clock()

    def gated(self, route: Route) -> bool:
        """Whether requests for this route must wait: asleep, or parked on its way to sleep."""
        if route.autoscaling is None:
            return False
        return route.replicas == 0 or self.parked(route.key)

    def parked(self, key: str) -> bool:
        hold = self.models.get(key)
        return hold is not None and hold.parked_until > self.clock()

    def held(self, key: str) -> int:
        hold = self.models.get(key)
        return len(hold.waiters) if hold is not None else 0

    def waiter(self, route: Route) -> asyncio.Future[None]:
        """A future resolved at the next table change (or park expiry); wakes the model if asleep."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hold(route.key).waiters.add(future)
        if route.replicas == 0:
            self.wake(route)
        return future

    def drop(self, key: str, future: asyncio.Future[None]) -> None:
        hold = self.models.get(key)
        if hold is not None:
            hold.waiters.discard(future)

    def wake(self, route: Route) -> None:
        """Start the one write 0 -> 1 of an asleep model, unless one is under way."""
        hold = self._hold(route.key)
        now = self.clock()
        if self.scaler is None or now - hold.woke_at < WAKE_RETRY_SECONDS:
            return
        hold.woke_at = now
        task = asyncio.get_running_loop().create_task(self._write(route))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _write(self, route: Route) -> None:
        assert self.scaler is not None
        try:
            if await self.scaler(route.namespace, route.resource, 1, 0):
                self.wake_writes += 1
                log.info("woke %s: replicas 0 -> 1 for held requests", route.key)
        except Exception as error:  # the API server refused or is away: try again soon
            log.warning("waking %s failed: %s", route.key, error)
            self._hold(route.key).woke_at = self.clock() - WAKE_RETRY_SECONDS + 1.0

    def update(self, table: Table) -> None:
        """A new table: parks that reached 0 end, asleep models with waiters wake, waiters look again."""
        for key, hold in self.models.items():
            route = table.route(key)
            if route is not None and route.replicas == 0:
                hold.parked_until = 0.0  # asleep now: replicas 0 itself gates requests
                if hold.waiters:
                    self.wake(route)
            elif route is not None and route.replicas > 0 and hold.woke_at > float("-inf"):
                hold.woke_at = float("-inf")  # the wake-up is seen: a later sleep may wake again
            self._release(hold)

    def _release(self, hold: ModelHold) -> None:
        for future in list(hold.waiters):
            if not future.done():
                future.set_result(None)
        hold.waiters.clear()

    def park(self, route: Route, idle_seconds: float, in_flight: int) -> str | None:
        """Gate a route before it goes to zero; None when granted, else why not."""
        if route.autoscaling is None:
            return f"{route.key} has no spec.autoscaling"
        if in_flight:
            return f"{in_flight} request(s) in flight or held"
        idle = self.clock() - max(self.last_request.get(route.key, self.started), self.started)
        if idle < idle_seconds:
            return f"last request {idle:.1f}s ago, under the idle time of {idle_seconds:g}s"
        hold = self._hold(route.key)
        hold.parked_until = self.clock() + PARK_SECONDS
        asyncio.get_running_loop().call_later(PARK_SECONDS + 0.01, self._release, hold)
        return None
