"""Prometheus: our HTTP metrics (an ASGI middleware) and the /metrics exposition.

vLLM's engine registers its `vllm:` series in prometheus_client's default registry of this
process, so exposing that registry shows both.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Only these paths get their own label value; anything else is "other" (bounded cardinality).
KNOWN_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/v1/stats",
        "/v1/info",
        "/v1/lora_adapters",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    }
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class HttpMetrics:
    """HTTP request counters, latency histogram and in-progress gauge."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        """Register the series (once per registry)."""
        self.requests = _get_or_create(
            registry,
            "vllm_server_http_requests_total",
            lambda: Counter(
                "vllm_server_http_requests",
                "HTTP requests by method, path and status.",
                ["method", "path", "status"],
                registry=registry,
            ),
        )
        self.latency = _get_or_create(
            registry,
            "vllm_server_http_request_duration_seconds",
            lambda: Histogram(
                "vllm_server_http_request_duration_seconds",
                "Time to the end of the HTTP response (whole stream for SSE).",
                ["method", "path"],
                registry=registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            ),
        )
        self.in_progress = _get_or_create(
            registry,
            "vllm_server_http_requests_in_progress",
            lambda: Gauge(
                "vllm_server_http_requests_in_progress", "HTTP requests being served.", registry=registry
            ),
        )


def _get_or_create(registry: CollectorRegistry, name: str, make: Callable[[], Any]) -> Any:
    """Reuse a collector already registered (several apps in one test process)."""
    existing = getattr(registry, "_names_to_collectors", {}).get(name)
    return existing if existing is not None else make()


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body buffering, unlike BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        """Wrap `app`."""
        self.app = app
        self.m = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request and count it by final status."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        path = path if path in KNOWN_PATHS else "other"
        method = scope["method"]
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.m.in_progress.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.m.in_progress.dec()
            self.m.requests.labels(method, path, str(status)).inc()
            self.m.latency.labels(method, path).observe(time.perf_counter() - start)


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """Render the registry in Prometheus text format."""
    return generate_latest(registry)
