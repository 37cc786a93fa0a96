"""In-process request statistics behind GET /v1/stats."""

from __future__ import annotations

import time
from collections import deque

from vllm_server.protocol import StatsResponse

_WINDOW_SECONDS = 60.0


class Stats:
    """Counts finished requests and tokens; the event loop is single-threaded, so no locks."""

    def __init__(self) -> None:
        """Start the uptime clock."""
        self._clock = time.monotonic
        self.started = self._clock()
        self.requests = 0
        self.in_flight = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.tokens = 0
        self.max_tokens = 0
        self.generation_seconds = 0.0
        # (finish time, tokens) of recent requests, for a windowed throughput.
        self._recent: deque[tuple[float, int]] = deque()

    def started_request(self) -> None:
        """A request was admitted."""
        self.in_flight += 1

    def finished_request(self, prompt_tokens: int, tokens: int, seconds: float) -> None:
        """A request completed (fully or by client disconnect) after producing `tokens`."""
        self.in_flight -= 1
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.tokens += tokens
        self.max_tokens = max(self.max_tokens, tokens)
        self.generation_seconds += seconds
        now = self._clock()
        self._recent.append((now, tokens))
        self._trim(now)

    def failed_request(self) -> None:
        """An admitted request ended without completing; its error (if any) counts elsewhere."""
        self.in_flight -= 1

    def error(self) -> None:
        """An error was reported to a client (HTTP error or in-band stream error), once each."""
        self.errors += 1

    def _trim(self, now: float) -> None:
        """Drop window entries older than the window."""
        cutoff = now - _WINDOW_SECONDS
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    def snapshot(self) -> StatsResponse:
        """The JSON body of /v1/stats."""
        now = self._clock()
        self._trim(now)
        uptime = now - self.started
        window = min(_WINDOW_SECONDS, uptime) or 1.0
        n = self.requests
        return StatsResponse(
            requests_processed=n,
            requests_in_flight=self.in_flight,
            errors=self.errors,
            prompt_tokens=self.prompt_tokens,
            tokens_generated=self.tokens,
            avg_tokens_per_request=self.tokens / n if n else 0.0,
            max_tokens_per_request=self.max_tokens,
            avg_generation_time_seconds=self.generation_seconds / n if n else 0.0,
            throughput_tokens_per_second=self.tokens / uptime if uptime > 0 else 0.0,
            recent_tokens_per_second=sum(t for _, t in self._recent) / window,
            uptime_seconds=uptime,
        )
