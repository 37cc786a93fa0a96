"""Several base URLs for one model: round-robin spreads requests, failover prefers the first."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

Strategy = Literal["round_robin", "failover"]


def normalize_base_url(url: str) -> str:
    """`http://h:8000`, `http://h:8000/` and `http://h:8000/v1` all become `http://h:8000`."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class EndpointPool:
    """Orders the endpoints to try for each request; endpoints that failed wait a cooldown."""

    def __init__(
        self,
        urls: Sequence[str],
        strategy: Strategy = "round_robin",
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Keep the URLs in the given order."""
        if not urls:
            raise ValueError("at least one base URL is required")
        if strategy not in ("round_robin", "failover"):
            raise ValueError(f"unknown strategy {strategy!r}: use round_robin or failover")
        self.urls = [normalize_base_url(u) for u in urls]
        self.strategy = strategy
        self.cooldown = cooldown
        self._clock = clock
        self._next = itertools.count()
        self._down_until: dict[str, float] = {}
        # The sync client's batch runs threads over one pool.
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """Endpoints for one request, best first; cooling-down ones go last rather than away."""
        with self._lock:
            start = next(self._next) % len(self.urls) if self.strategy == "round_robin" else 0
            now = self._clock()
            rotated = self.urls[start:] + self.urls[:start]
            up = [u for u in rotated if self._down_until.get(u, 0.0) <= now]
            return up + [u for u in rotated if u not in up]

    def failed(self, url: str) -> None:
        """`url` refused or broke a connection, or answered 5xx."""
        with self._lock:
            self._down_until[url] = self._clock() + self.cooldown

    def succeeded(self, url: str) -> None:
        """`url` answered."""
        with self._lock:
            self._down_until.pop(url, None)
