"""What the router counts, per model and per pod, and its Prometheus and JSON views.

Counting is plain integer arithmetic on the request path; the Prometheus text is built only when
scraped (a custom collector), so the hot path pays no metrics library per request.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from vllm_operator.router.table import Route, Table

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# An OpenAI `usage` object: JSON strings escape their quotes, so `"usage":{` with bare quotes
# is a key, never generated text. Its fields are read from the object alone.
_USAGE = re.compile(rb'"usage"\s*:\s*\{([^{}]*)\}')
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d{1,12})')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')


def usage_of(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last `usage` object in a response's tail: a JSON
    answer ends with it, and a stream asked with `stream_options.include_usage` sends it in its
    last event. None when there is none (a stream asked without it)."""
    objects = list(_USAGE.finditer(tail))
    if not objects:
        return None
    found = objects[-1]
    prompt, completion = _PROMPT.search(found[1]), _COMPLETION.search(found[1])
    if prompt is None or completion is None:
        return None
    return int(prompt[1]), int(completion[1])


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class ModelStats:
    in_flight: int = 0
    requests: dict[int, int] = field(default_factory=dict)
    """Answered requests by HTTP status."""
    retries: int = 0
    broken_streams: int = 0
    first_byte: Histogram = field(default_factory=Histogram)
    """Seconds from the request to the pod's response head."""
    first_chunk: Histogram = field(default_factory=Histogram)
    """Seconds from the request to the first body bytes of a stream (the time to first token)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens of the answers that carried a `usage` object (see `usage_of`)."""

    def answered(self, status: int) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1


class Stats:
    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}
        self.pod_requests: dict[str, int] = {}
        self.pod_first_byte: dict[str, Histogram] = {}

    def pod_head(self, address: str, seconds: float) -> None:
        histogram = self.pod_first_byte.get(address)
        if histogram is None:
            histogram = self.pod_first_byte[address] = Histogram()
        histogram.observe(seconds)

    def of_route(self, route: Route) -> list[ModelStats]:
        """The counts of a model under each of its names: served name, aliases, adapters."""
        names = (route.served_name, *route.routing.aliases, *route.adapters)
        return [self.models[n] for n in names if n in self.models]

    def route_in_flight(self, route: Route) -> int:
        """Requests in flight (held included) for a model under any of its names."""
        return sum(s.in_flight for s in self.of_route(route))

    def model(self, name: str) -> ModelStats:
        stats = self.models.get(name)
        if stats is None:
            stats = self.models[name] = ModelStats()
        return stats

    def demand(
        self,
        table: Table,
        in_flight: Mapping[str, int],
        held: Callable[[str], int] = lambda _: 0,
        parked: Callable[[str], bool] = lambda _: False,
    ) -> dict[str, Any]:
        """Current demand per served model: what the autoscaler reads. `inFlight` counts the
        requests held while the model wakes (`held`) too."""
        models: dict[str, Any] = {}
        for route in table.routes:
            counted = self.of_route(route)
            models[route.served_name] = {
                "namespace": route.namespace,
                "resource": route.resource,
                "inFlight": sum(s.in_flight for s in counted),
                "requests": sum(sum(s.requests.values()) for s in counted),
                "held": held(route.key),
                "parked": parked(route.key),
                "replicas": route.replicas,
                "pods": route.pods,
                "readyPods": len(route.endpoints),
                "podInFlight": {e.pod: in_flight.get(e.address, 0) for e in route.endpoints},
            }
        return {"models": models}


class _Collector:
    def __init__(self, stats: Stats, in_flight: Mapping[str, int]) -> None:
        self.stats, self.in_flight = stats, in_flight

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "vllm_router_requests", "Requests answered, by model and status", labels=["model", "code"]
        )
        flying = GaugeMetricFamily("vllm_router_in_flight", "Requests in flight, by model", labels=["model"])
        retries = CounterMetricFamily(
            "vllm_router_retries", "Requests sent again to another pod", labels=["model"]
        )
        broken = CounterMetricFamily(
            "vllm_router_broken_streams", "Responses cut by their pod after the first byte", labels=["model"]
        )
        head = HistogramMetricFamily(
            "vllm_router_upstream_first_byte_seconds", "Request to the pod's response head", labels=["model"]
        )
        chunk = HistogramMetricFamily(
            "vllm_router_time_to_first_chunk_seconds",
            "Request to a stream's first body bytes",
            labels=["model"],
        )
        prompt = CounterMetricFamily(
            "vllm_router_prompt_tokens",
            "Prompt tokens of the answers that carried usage (every JSON one; streams with include_usage)",
            labels=["model"],
        )
        generated = CounterMetricFamily(
            "vllm_router_generation_tokens",
            "Generated tokens of the answers that carried usage (every JSON one; streams with include_usage)",
            labels=["model"],
        )
        for name, s in sorted(self.stats.models.items()):
            prompt.add_metric([name], s.prompt_tokens)
            generated.add_metric([name], s.completion_tokens)
            for code, count in sorted(s.requests.items()):
                requests.add_metric([name, str(code)], count)
            flying.add_metric([name], s.in_flight)
            retries.add_metric([name], s.retries)
            broken.add_metric([name], s.broken_streams)
            head.add_metric([name], s.first_byte.buckets(), s.first_byte.total)
            chunk.add_metric([name], s.first_chunk.buckets(), s.first_chunk.total)
        pods = GaugeMetricFamily(
            "vllm_router_pod_in_flight", "Requests in flight, by pod address", labels=["pod"]
        )
        for address, count in sorted(self.in_flight.items()):
            pods.add_metric([address], count)
        pod_requests = CounterMetricFamily(
            "vllm_router_pod_requests", "Requests sent, by pod address", labels=["pod"]
        )
        for address, count in sorted(self.stats.pod_requests.items()):
            pod_requests.add_metric([address], count)
        pod_head = HistogramMetricFamily(
            "vllm_router_pod_first_byte_seconds",
            "Request to the response head, by pod address",
            labels=["pod"],
        )
        for address, histogram in sorted(self.stats.pod_first_byte.items()):
            pod_head.add_metric([address], histogram.buckets(), histogram.total)
        yield from (requests, flying, retries, broken, head, chunk, prompt, generated)
        yield from (pods, pod_requests, pod_head)


def prometheus_text(stats: Stats, in_flight: Mapping[str, int]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, in_flight))
    return generate_latest(registry)
