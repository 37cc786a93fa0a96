"""When to retry and how long to wait: exponential backoff with jitter, Retry-After first."""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Statuses worth another try: throttling and server-side trouble. Other 4xx are the
# caller's mistake and would fail the same way again.
RETRY_STATUSES = frozenset({408, 409, 429})


def retryable_status(status: int) -> bool:
    """True for 408, 409, 429 and every 5xx."""
    return status in RETRY_STATUSES or status >= 500


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds asked for by `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one request: count, backoff bounds and the cap on Retry-After."""

    max_retries: int = 2
    initial_delay: float = 0.5
    max_delay: float = 8.0
    # A server asking for longer than this is not waited for; the backoff is used instead.
    max_retry_after: float = 60.0
    jitter: float = 0.25
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to sleep before retry number `retry` (0-based)."""
        if retry_after is not None and retry_after <= self.max_retry_after:
            return retry_after
        base = min(self.initial_delay * (2.0**retry), self.max_delay)
        # Jitter downwards so that many clients retrying at once spread out.
        return base * (1.0 - self.jitter * self.rand())
