"""Reads every ready server pod's /health, /metrics and /v1/models, and makes the operator's
other calls to pods (adapter loads) and to the router, all through the client's `Probe`.

Each pod is read in isolation: one deadline for all of its requests, a size cap on every
page, and every value checked. Whatever a pod sends (or fails to send), it becomes that pod's
unhealthy sample with a short reason, and the round finishes on time for every other pod.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vllm_operator import metrics
from vllm_operator.api import SERVER_PORT
from vllm_operator.lora import AdapterCall
from vllm_operator.render import fetched_paths
from vllm_operator.throughput import PodSample, parse_metrics
from vllm_operator_client._core import adapter_request, auth_headers
from vllm_operator_client.errors import message_of
from vllm_operator_client.probe import Probe, ProbeError, parse_json

K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)

# A real vLLM 0.32 /metrics page (the bundled server on the tiny model, LoRA on, after
# traffic through three adapters) is 56 KiB in 668 lines, 47 KiB idle; /v1/models is ~140
# bytes per model or adapter. 1 MiB is 18 times the page (a pod running 8 data-parallel
# engines, each with its own series, would still have 2.5 times). With the default
# concurrency of 64 the pages in flight take at most 64 MiB of the chart's 512Mi; one 50 MB
# page read whole used to add 186 MiB of RSS here (730 MiB with the page of issue 13), and
# now adds 2 MiB. Scanning 1 MiB of hostile short lines costs ~50 ms of CPU.
MAX_PAGE_BYTES = 1 << 20
# A reason ends up in a condition message, an Event or a log line: bounded and printable.
MAX_REASON = 200
# The router's answers (/router/demand lists every routed model; /router/park is one line).
MAX_ROUTER_BYTES = 1 << 20


@dataclass(frozen=True)
class Target:
    """A pod to scrape, as the last reconcile saw it."""

    name: str
    ip: str
    ready: bool
    served_name: str = ""
    lora: bool = False
    """Whether to read /v1/models for the adapters (models without LoRA skip it)."""
    fetched: frozenset[str] = frozenset()
    """Paths the pod's init steps downloaded (s3:// and gs:// sources)."""
    token: str = field(default="", repr=False)
    """Bearer token for the server's /v1 routes (a LoRA model's admin token); kept out of reprs and
    redacted from every reason, so that it never reaches a log or a condition."""


def targets_of(
    pods: Sequence[Mapping[str, Any]], served_name: str, lora: bool = False, token: str = ""
) -> list[Target]:
    """Scrape targets from pod objects: every pod is listed, only ready ones with an IP are read."""
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        out.append(
            Target(
                meta.get("name", "?"),
                status.get("podIP") or "",
                ready,
                served_name,
                lora,
                fetched_paths(pod) if lora else frozenset(),
                token,
            )
        )
    return out


def listed_adapters(body: Any, served_name: str) -> dict[str, str]:
    """LoRA adapters a server lists in /v1/models (entries with a parent, or any but the base),
    each with its `root` ("" when that is not a string).

    A listing that is not vLLM's shape raises ProbeError rather than skipping entries: a
    skipped adapter would look missing, and the operator would load it again and again.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ProbeError("/v1/models: no list under 'data'")
    out: dict[str, str] = {}
    for index, entry in enumerate(data):
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(model_id, str) or not model_id:
            raise ProbeError(f"/v1/models: entry {index} has no string id")
        if model_id != served_name and entry.get("parent", True):
            root = entry.get("root")
            out[model_id] = root if isinstance(root, str) else ""
    return out


def pod_url(ip: str, port: int) -> str:
    """`http://IP:PORT`, with an IPv6 address in brackets as URLs want it."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ProbeError(f"pod IP {clip(ip, 60)!r} is not an IP address") from None
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{port}"


@dataclass
class _Progress:
    """The page a pod's scrape is reading, for the reason when its deadline passes."""

    path: str = "/health"


class Scraper:
    """Scrapes many pods concurrently, bounded; each pod within one deadline, each page within a cap."""

    def __init__(
        self,
        port: int = SERVER_PORT,
        timeout: float = 2.0,
        concurrency: int = 64,
        *,
        max_page_bytes: int = MAX_PAGE_BYTES,
    ) -> None:
        """`timeout` is one pod's whole budget: /health, /metrics and /v1/models together."""
        self.port = port
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_page_bytes = max_page_bytes

    async def scrape_all(self, targets: Mapping[K, Sequence[Target]]) -> dict[K, list[PodSample]]:
        gate = asyncio.Semaphore(self.concurrency)
        # No idle connections kept: with hundreds of pods, the pool scan was a round's cost.
        async with Probe(self.timeout, self.concurrency, keepalive=False) as probe:

            async def one(target: Target) -> PodSample:
                async with gate:
                    return await self.scrape_pod(probe, target)

            keys = list(targets)
            results = await asyncio.gather(*(asyncio.gather(*(one(t) for t in targets[k])) for k in keys))
        return {key: list(samples) for key, samples in zip(keys, results, strict=True)}

    async def scrape_pod(self, probe: Probe, target: Target) -> PodSample:
        """One pod's sample; whatever the pod does, this returns within `timeout` and never raises."""
        if not target.ready or not target.ip:
            return PodSample(name=target.name, at=time.monotonic(), ready=False)
        started = time.monotonic()
        progress = _Progress()
        try:
            # One deadline for the whole pod: httpx's timeout is per network read, so a pod
            # that sent a byte every 1.5 s held the round for as long as it kept dripping.
            async with asyncio.timeout(self.timeout):
                return await self._read(probe, target, started, progress)
        except TimeoutError:
            reason = f"{progress.path} not read within the {self.timeout:g}s deadline"
        except ProbeError as exc:
            reason = str(exc)
        except Exception as exc:  # a bug of ours that this pod's answer showed: fail this pod only
            log.exception("scraping pod %s failed", target.name)
            reason = f"operator error while reading {progress.path} ({type(exc).__name__}, see its log)"
        finally:
            metrics.SCRAPE_SECONDS.observe(time.monotonic() - started)
        metrics.SCRAPE_FAILURES.inc()
        error = redact(reason, target.token)
        return PodSample(name=target.name, at=started, ready=True, healthy=False, error=error)

    async def _read(self, probe: Probe, target: Target, started: float, progress: _Progress) -> PodSample:
        base = pod_url(target.ip, self.port)
        status, _ = await self._get(probe, base, "/health", progress)
        if status != 200:
            raise ProbeError(f"/health answered {status}")
        status, page = await self._get(probe, base, "/metrics", progress)
        if status != 200:
            raise ProbeError(f"/metrics answered {status}")
        try:
            counters, running, waiting, kv = parse_metrics(page.decode("utf-8", "replace"))
        except ValueError as exc:  # the parser's and our checks' (MetricsError)
            raise ProbeError(f"/metrics: {exc}") from None
        adapters: dict[str, str] = {}
        models_error = ""
        if target.lora:
            status, body = await self._get(probe, base, "/v1/models", progress, auth_headers(target.token))
            if 200 <= status < 300:
                adapters = listed_adapters(parse_json(body, "/v1/models"), target.served_name)
            else:
                # The server works but refuses us (a wrong key, say): metrics still count.
                models_error = redact(f"/v1/models answered {status}: {message_of(body)}", target.token)
        return PodSample(
            name=target.name,
            at=started,
            ready=True,
            healthy=True,
            counters=counters,
            running=running,
            waiting=waiting,
            kv_cache_usage=kv,
            adapters=tuple(sorted(adapters)),
            adapter_roots={name: root for name, root in adapters.items() if root},
            models_error=models_error,
        )

    async def _get(
        self,
        probe: Probe,
        base: str,
        path: str,
        progress: _Progress,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        progress.path = path
        return await probe.request("GET", f"{base}{path}", self.max_page_bytes, headers=headers)

    async def router_demand(self, url: str) -> Any:
        """The router's /router/demand JSON, or None when it cannot be read (logged): the
        router is an observer here, and its absence must not hold up a round."""
        try:
            async with asyncio.timeout(self.timeout), Probe(self.timeout, 1) as probe:
                status, body = await probe.request(
                    "GET", f"{url.rstrip('/')}/router/demand", MAX_ROUTER_BYTES
                )
            if status != 200:
                raise ProbeError(f"/router/demand answered {status}")
            return parse_json(body, "/router/demand")
        except TimeoutError:
            log.warning("router %s: /router/demand not read within %gs", url, self.timeout)
        except ProbeError as exc:
            log.warning("router %s: %s", url, clip(str(exc)))
        return None

    async def park(
        self, url: str, namespace: str, name: str, idle_seconds: int, token: str
    ) -> tuple[bool, str]:
        """Ask the router to hold a model's requests before it goes to zero: (granted, why not).
        The router grants it only if no request for the model is in flight, held or answered
        within `idle_seconds`; what arrives after is held and wakes the model again."""
        ask = {"namespace": namespace, "resource": name, "idleSeconds": idle_seconds}
        try:
            async with asyncio.timeout(self.timeout), Probe(self.timeout, 1, token=token) as probe:
                status, body = await probe.request(
                    "POST", f"{url.rstrip('/')}/router/park", MAX_ROUTER_BYTES, body=ask
                )
        except TimeoutError:
            return False, f"the router did not answer within {self.timeout:g}s"
        except ProbeError as exc:
            return False, redact(str(exc), token)
        if status == 200:
            return True, ""
        return False, redact(f"the router answered {status}: {message_of(body)}", token)

    async def call_adapters(
        self, calls: Sequence[AdapterCall], ips: Mapping[str, str], token: str = ""
    ) -> list[str]:
        """Run load/unload calls (pod name -> IP in `ips`); returns each call's error or ''."""
        # Loading an adapter reads its weights: allow more than a scrape's timeout.
        budget = max(30.0, self.timeout)
        async with Probe(budget, self.concurrency, token=token) as probe:
            calls_done = (self._call(probe, c, ips.get(c.pod, ""), budget) for c in calls)
            return [redact(error, token) for error in await asyncio.gather(*calls_done)]

    async def _call(self, probe: Probe, call: AdapterCall, ip: str, budget: float) -> str:
        path, body = adapter_request(call.action, call.name, call.path)
        try:
            # The same isolation as a scrape: one deadline per call, a capped answer.
            async with asyncio.timeout(budget):
                url = f"{pod_url(ip, self.port)}{path}"
                status, answer = await probe.request("POST", url, self.max_page_bytes, body=body)
        except TimeoutError:
            return f"{call.action} not answered within {budget:g}s"
        except ProbeError as exc:
            return str(exc)
        except Exception as exc:  # a bug of ours: fail this call only
            log.exception("%s of adapter %s on pod %s failed", call.action, call.name, call.pod)
            return f"operator error ({type(exc).__name__}, see its log)"
        if 200 <= status < 300:
            return ""
        return f"{call.action} answered {status}: {message_of(answer)}"


def clip(text: str, limit: int = MAX_REASON) -> str:
    """Printable, on one line, at most `limit` characters: a pod's text may be anything."""
    flat = "".join(c if c.isprintable() else " " for c in text[: limit * 4])
    flat = " ".join(flat.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def redact(text: str, secret: str) -> str:
    """`text` without `secret` (a server may echo the key it refused), then clipped.

    In that order: clipping first could cut the key in two and leave half of it.
    """
    return clip(text.replace(secret, "***") if secret else text)
