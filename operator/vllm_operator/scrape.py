"""Reads every ready server pod's /health, /metrics and /v1/models over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from vllm_operator import metrics
from vllm_operator.api import SERVER_PORT
from vllm_operator.lora import AdapterCall
from vllm_operator.render import fetched_paths
from vllm_operator.throughput import PodSample, parse_metrics

K = TypeVar("K", bound=Hashable)


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
    api_key: str = field(default="", repr=False)
    """Bearer key for the server's /v1 routes; kept out of reprs so that it never reaches a log."""


def targets_of(
    pods: Sequence[Mapping[str, Any]], served_name: str, lora: bool = False, api_key: str = ""
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
                api_key,
            )
        )
    return out


def adapters_from_models(body: Any, served_name: str) -> tuple[str, ...]:
    """LoRA adapters a server lists in /v1/models: entries with a parent, or any but the base."""
    data = body.get("data", []) if isinstance(body, dict) else []
    return tuple(
        sorted(
            m["id"]
            for m in data
            if isinstance(m, dict) and m.get("id") and m["id"] != served_name and m.get("parent", True)
        )
    )


class Scraper:
    """Scrapes many pods concurrently, bounded, each read with a short timeout."""

    def __init__(self, port: int = SERVER_PORT, timeout: float = 2.0, concurrency: int = 64) -> None:
        self.port = port
        self.timeout = timeout
        self.concurrency = concurrency

    async def scrape_all(self, targets: Mapping[K, Sequence[Target]]) -> dict[K, list[PodSample]]:
        gate = asyncio.Semaphore(self.concurrency)
        # No idle connections kept: httpx scans its whole pool for every request, and with
        # hundreds of pods that scan, not the network, was the cost of a round.
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits, trust_env=False) as client:

            async def one(target: Target) -> PodSample:
                async with gate:
                    return await self.scrape_pod(client, target)

            keys = list(targets)
            results = await asyncio.gather(*(asyncio.gather(*(one(t) for t in targets[k])) for k in keys))
        return {key: list(samples) for key, samples in zip(keys, results, strict=True)}

    async def scrape_pod(self, client: httpx.AsyncClient, target: Target) -> PodSample:
        if not target.ready or not target.ip:
            return PodSample(name=target.name, at=time.monotonic(), ready=False)
        base = f"http://{target.ip}:{self.port}"
        started = time.monotonic()
        try:
            health = await client.get(f"{base}/health")
            if health.status_code != 200:
                raise ScrapeError(f"/health answered {health.status_code}")
            page = await client.get(f"{base}/metrics")
            page.raise_for_status()
            counters, running, waiting, kv = parse_metrics(page.text)
            adapters: tuple[str, ...] = ()
            models_error = ""
            if target.lora:
                models = await client.get(f"{base}/v1/models", headers=bearer(target.api_key))
                if models.is_success:
                    adapters = adapters_from_models(models.json(), target.served_name)
                else:
                    models_error = f"/v1/models answered {models.status_code}: {server_message(models)}"
        except (httpx.HTTPError, ScrapeError, ValueError) as exc:
            metrics.SCRAPE_FAILURES.inc()
            return PodSample(name=target.name, at=started, ready=True, healthy=False, error=describe(exc))
        finally:
            metrics.SCRAPE_SECONDS.observe(time.monotonic() - started)
        return PodSample(
            name=target.name,
            at=started,
            ready=True,
            healthy=True,
            counters=counters,
            running=running,
            waiting=waiting,
            kv_cache_usage=kv,
            adapters=adapters,
            models_error=models_error,
        )

    async def call_adapters(
        self, calls: Sequence[AdapterCall], ips: Mapping[str, str], api_key: str = ""
    ) -> list[str]:
        """Run load/unload calls (pod name -> IP in `ips`); returns each call's error or ''."""
        limits = httpx.Limits(max_connections=self.concurrency)
        # Loading an adapter reads its weights: allow more than a scrape's timeout.
        async with httpx.AsyncClient(
            timeout=max(30.0, self.timeout), limits=limits, trust_env=False, headers=bearer(api_key)
        ) as client:
            return list(await asyncio.gather(*(self._call(client, c, ips.get(c.pod, "")) for c in calls)))

    async def _call(self, client: httpx.AsyncClient, call: AdapterCall, ip: str) -> str:
        body = {"lora_name": call.name, **({"lora_path": call.path} if call.action == "load" else {})}
        try:
            response = await client.post(f"http://{ip}:{self.port}/v1/{call.action}_lora_adapter", json=body)
        except httpx.HTTPError as exc:
            return describe(exc)
        if response.is_success:
            return ""
        return f"{call.action} answered {response.status_code}: {server_message(response)}"


def bearer(api_key: str) -> dict[str, str]:
    """The Authorization header for a server started with --api-key, or none."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def server_message(response: httpx.Response) -> str:
    """The message of an OpenAI-shaped (or plain) error body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:300]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:300]
    return str(body)[:300]


class ScrapeError(Exception):
    """A pod answered, but not as a healthy server does."""


def describe(exc: Exception) -> str:
    """A short reason for a failed scrape, fit for a condition message."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"/metrics answered {exc.response.status_code}"
    return str(exc) or exc.__class__.__name__
