"""Pure aggregation of pod scrapes into the status' metrics, pods and adapters.

Rates come from counter deltas between two scrapes of the same pod; a counter that went
down means the server restarted, and its new value is all that was counted since.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from vllm_operator.api import (
    AdapterStatus,
    ConditionStatus,
    Metrics,
    PodStatus,
    RoutingStatus,
    VLLMModelStatus,
)

# Sample names of vLLM's (and the bundled server's) Prometheus exposition.
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
REQUESTS = "vllm:request_success_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
COUNTERS = (GENERATION_TOKENS, PROMPT_TOKENS, REQUESTS)
MAX_PODS = 64
# Bounds on what a page may say, so that no value can overflow a sum, a rate or the status'
# int64 fields. Counters: 2**53 is where floats stop counting exactly (285 years at 1M
# tokens/s). Gauges: no server holds 2**31 requests.
MAX_COUNTER = float(2**53)
MAX_GAUGE = float(2**31)
# Lines of the families we read. A vLLM 0.32 page has 16 of them (9 series of one engine, 7
# `# TYPE` lines) among its 668 lines; 500 leaves room for 50 engines. The cap bounds the
# parser's CPU: ~45 us a line here, so a page of nothing but these lines (18,000 in 1 MiB)
# would hold the operator's event loop for 0.8 s.
MAX_SERIES = 500
# The lines of those families, found by one regex scan: splitting a page into lines cost up
# to 1 s for 2 MiB of short lines, the scan 0.1 s (0.2 ms for a real page).
_WANTED = re.compile(
    r"^(?:# TYPE )?(?:"
    + "|".join(re.escape(name) for name in (*COUNTERS, RUNNING, WAITING, *KV_CACHE))
    + r")[ {].*$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class PodSample:
    """One pod at one scrape: what /metrics and /health said, or why they could not be read."""

    name: str
    at: float
    ready: bool = False
    healthy: bool = False
    error: str = ""
    counters: Mapping[str, float] = field(default_factory=dict)
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    adapters: tuple[str, ...] = ()
    adapter_roots: Mapping[str, str] = field(default_factory=dict)
    """Adapter name -> the `root` its /v1/models entry lists (absent when that is not a string)."""
    models_error: str = ""
    """Why /v1/models could not be read (then `adapters` says nothing), e.g. a refused API key."""


class MetricsError(ValueError):
    """A /metrics page whose figures cannot be trusted; the message names the series."""


def parse_metrics(text: str) -> tuple[dict[str, float], float, float, float]:
    """Counters (summed over label sets), running, waiting and KV-cache usage from a /metrics page.

    Every value read is checked (finite, within its bounds), so that one pod's page cannot turn
    a sum, a rate or a status write into NaN, infinity or an overflow: MetricsError says which.
    Malformed exposition text raises the parser's ValueError.
    """
    counters = dict.fromkeys(COUNTERS, 0.0)
    gauges: dict[str, list[float]] = {}
    # A server exposes hundreds of series (histograms mostly); hand the parser only the
    # families we read, with their # TYPE lines, since parsing dominates a scrape's CPU.
    kept = _WANTED.findall(text)
    if len(kept) > MAX_SERIES:
        raise MetricsError(f"{len(kept)} lines of the series read, over the {MAX_SERIES} allowed")
    for family in text_string_to_metric_families("\n".join(kept) + "\n"):
        for sample in family.samples:
            if sample.name in counters:
                counters[sample.name] += _checked(sample.name, sample.value, MAX_COUNTER)
            elif sample.name in (RUNNING, WAITING):
                gauges.setdefault(sample.name, []).append(_checked(sample.name, sample.value, MAX_GAUGE))
            elif sample.name in KV_CACHE:
                # A fraction despite the name: 1 means the whole cache is in use.
                gauges.setdefault(sample.name, []).append(_checked(sample.name, sample.value, 1.0))
    kv = next((gauges[name] for name in KV_CACHE if name in gauges), [])
    return (
        counters,
        sum(gauges.get(RUNNING, [])),
        sum(gauges.get(WAITING, [])),
        max(kv) if kv else 0.0,
    )


def _checked(name: str, value: float, highest: float) -> float:
    if not (math.isfinite(value) and 0.0 <= value <= highest):
        raise MetricsError(f"{name} is {value:g}, outside [0, {highest:.15g}]")
    return value


def rate(previous: PodSample | None, current: PodSample, name: str) -> float:
    """Per-second increase of a counter between two scrapes of the same pod."""
    if previous is None or not previous.healthy or not current.healthy or current.at <= previous.at:
        return 0.0
    before, after = previous.counters.get(name, 0.0), current.counters.get(name, 0.0)
    increase = after if after < before else after - before  # a drop is a restart
    return increase / (current.at - previous.at)


@dataclass(frozen=True)
class Aggregate:
    """What a scrape round means for one model's status."""

    metrics: Metrics
    pods: list[PodStatus]
    adapters: list[AdapterStatus]
    unhealthy: dict[str, str]
    adapters_ready: tuple[ConditionStatus, str, str] | None = None
    routing: RoutingStatus | None = None
    """The router's view of the model, when the operator knows a router."""


def aggregate(previous: Mapping[str, PodSample], current: Sequence[PodSample], scraped_at: str) -> Aggregate:
    """Sum rates and loads over the pods of one model; pods that failed their scrape count as unhealthy."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    pods: list[PodStatus] = []
    healthy = [s for s in current if s.healthy]
    for sample in sorted(current, key=lambda s: s.name):
        rates = {name: rate(previous.get(sample.name), sample, name) for name in COUNTERS}
        for name, value in rates.items():
            totals[name] += value
        pods.append(
            PodStatus(
                name=sample.name,
                ready=sample.ready,
                healthy=sample.healthy,
                generation_tokens_per_second=round(rates[GENERATION_TOKENS], 1),
                running_requests=int(sample.running),
                lora_adapters=sorted(sample.adapters),
            )
        )
    metrics = Metrics(
        generation_tokens_per_second=round(totals[GENERATION_TOKENS], 1),
        prompt_tokens_per_second=round(totals[PROMPT_TOKENS], 1),
        requests_per_second=round(totals[REQUESTS], 2),
        running_requests=int(sum(s.running for s in healthy)),
        waiting_requests=int(sum(s.waiting for s in healthy)),
        kv_cache_usage=round(sum(s.kv_cache_usage for s in healthy) / len(healthy), 3) if healthy else 0.0,
        scraped_at=scraped_at,
    )
    return Aggregate(
        metrics=metrics,
        pods=pods[:MAX_PODS],
        adapters=adapter_counts(healthy),
        unhealthy={s.name: s.error or "unhealthy" for s in current if s.ready and not s.healthy},
    )


def adapter_counts(samples: Iterable[PodSample]) -> list[AdapterStatus]:
    """Per adapter, how many pods list it in their own /v1/models."""
    counts: dict[str, int] = {}
    for sample in samples:
        for name in sample.adapters:
            counts[name] = counts.get(name, 0) + 1
    return [AdapterStatus(name=name, ready_pods=n) for name, n in sorted(counts.items())]


def _moved(old: float, new: float, relative: float, absolute: float) -> bool:
    return abs(new - old) > max(absolute, relative * max(abs(old), abs(new)))


def worth_writing(old: VLLMModelStatus, new: VLLMModelStatus, relative: float = 0.1) -> bool:
    """Whether the new figures differ enough from the written ones to spend an API write.

    Rates jitter from one window to the next; within `relative` (10 %) they are not news.
    Everything else (health, counts, adapters, conditions) is written on any change.
    """
    if old.metrics is None or new.metrics is None:
        return old.metrics != new.metrics or _rest_differs(old, new)
    a, b = old.metrics, new.metrics
    rates_moved = any(
        _moved(x, y, relative, 0.5)
        for x, y in (
            (a.generation_tokens_per_second, b.generation_tokens_per_second),
            (a.prompt_tokens_per_second, b.prompt_tokens_per_second),
            (a.requests_per_second, b.requests_per_second),
        )
    )
    gauges_moved = (a.running_requests, a.waiting_requests) != (
        b.running_requests,
        b.waiting_requests,
    ) or _moved(a.kv_cache_usage, b.kv_cache_usage, relative, 0.05)
    return rates_moved or gauges_moved or _rest_differs(old, new)


def _pod_shape(status: VLLMModelStatus) -> list[tuple[str, bool, bool, tuple[str, ...]]]:
    return [(p.name, p.ready, p.healthy, tuple(p.lora_adapters)) for p in status.pods]


def _rest_differs(old: VLLMModelStatus, new: VLLMModelStatus) -> bool:
    keep = {"metrics", "pods"}
    return old.model_dump(exclude=keep) != new.model_dump(exclude=keep) or _pod_shape(old) != _pod_shape(new)


def _count(value: Any, highest: float) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < highest else None


def router_counts(demand: Any, fields: Mapping[str, float]) -> dict[tuple[str, str], tuple[int, ...]]:
    """The counts named by `fields` (name -> exclusive upper bound) of each model in the router's
    /router/demand JSON, by (namespace, name). Entries of an unexpected shape, or missing a
    count, are left out: the router is an observer, not an authority."""
    models = demand.get("models") if isinstance(demand, dict) else None
    out: dict[tuple[str, str], tuple[int, ...]] = {}
    for entry in models.values() if isinstance(models, dict) else ():
        if not isinstance(entry, dict):
            continue
        namespace, name = entry.get("namespace"), entry.get("resource")
        counts = [_count(entry.get(k), highest) for k, highest in fields.items()]
        if isinstance(namespace, str) and isinstance(name, str) and None not in counts:
            out[(namespace, name)] = tuple(int(c or 0) for c in counts)
    return out


def router_view(demand: Any) -> dict[tuple[str, str], RoutingStatus]:
    """Each model's `status.routing` from the router's /router/demand JSON, by (namespace, name)."""
    return {
        key: RoutingStatus(endpoints=pods, ready_endpoints=ready, in_flight=in_flight)
        for key, (pods, ready, in_flight) in router_counts(
            demand, {"pods": MAX_GAUGE, "readyPods": MAX_GAUGE, "inFlight": MAX_GAUGE}
        ).items()
    }
