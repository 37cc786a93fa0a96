"""Which model names route where: built from VLLMModels and their pods, a pure function.

A name is a model's served name, one of its aliases, or one of its LoRA adapters. A base name
routes to every ready pod of the model; an adapter name only to the ready pods whose status says
they really serve it (the operator verifies each pod's adapters through its /v1/models). When two
models claim one name, the older resource keeps it and the clash is reported.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from vllm_operator import api, render


@dataclass(frozen=True)
class PodInfo:
    """What the router needs of a pod: whose it is, where it answers, whether it is ready."""

    namespace: str
    name: str
    model: str
    ip: str
    ready: bool


@dataclass(frozen=True)
class Endpoint:
    """One server pod as the router reaches it."""

    pod: str
    address: str
    """`host:port`, IPv6 hosts in brackets."""
    adapters: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Route:
    """One model as the router serves it."""

    namespace: str
    resource: str
    served_name: str
    endpoints: tuple[Endpoint, ...]
    """Ready pods only."""
    pods: int
    """All pods of the model, ready or not."""
    adapters: frozenset[str]
    routing: api.Routing
    created: str = ""
    replicas: int = 1
    """The model's spec.replicas: 0 means asleep, and the next request wakes it."""
    autoscaling: api.Autoscaling | None = None
    """When set, a request with no ready pod is held (up to its holdTimeoutSeconds), not refused."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.resource}"


@dataclass(frozen=True)
class Target:
    """What a requested model name resolves to."""

    route: Route
    adapter: str | None = None
    """The adapter requested, when the name is one: only pods serving it are eligible."""
    rewrite: str | None = None
    """The served name to put in the body, when the request used an alias."""

    def eligible(self) -> tuple[Endpoint, ...]:
        if self.adapter is None:
            return self.route.endpoints
        return tuple(e for e in self.route.endpoints if self.adapter in e.adapters)


@dataclass(frozen=True)
class Table:
    names: Mapping[str, Target] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    conflicts: tuple[str, ...] = ()

    def resolve(self, name: str) -> Target | None:
        return self.names.get(name)

    def route(self, key: str) -> Route | None:
        """The route of the model `namespace/name`."""
        return self.by_key.get(key)

    @functools.cached_property
    def by_key(self) -> Mapping[str, Route]:
        """Routes by `namespace/name`, built once per table (the wake step asks per held model
        on every table change)."""
        return {r.key: r for r in self.routes}

    def listing(self) -> list[dict[str, Any]]:
        """OpenAI `/v1/models` entries for every known name, ready or not."""
        entries: list[dict[str, Any]] = []
        for name, target in sorted(self.names.items()):
            entry: dict[str, Any] = {"id": name, "object": "model", "owned_by": "vllm-operator"}
            if target.adapter is not None or target.rewrite is not None:
                entry["parent"] = target.route.served_name
            entry["root"] = target.route.served_name
            entries.append(entry)
        return entries


def address(ip: str, port: int = api.SERVER_PORT) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def pod_info(obj: Mapping[str, Any]) -> PodInfo | None:
    """A pod of some VLLMModel as seen on the wire; None for a pod the router cannot use at all."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    model = labels.get(render.INSTANCE_LABEL)
    if not isinstance(model, str) or not model:
        return None
    status = obj.get("status") or {}
    ready = not meta.get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    ip = status.get("podIP") or ""
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        model=model,
        ip=str(ip),
        ready=bool(ready and ip),
    )


def _route(model: Mapping[str, Any], pods: Sequence[PodInfo]) -> Route | None:
    meta = model.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace", "")
    if not isinstance(name, str) or not name:
        return None
    try:
        spec = api.parse_spec(model.get("spec"))
    except api.SpecError:
        return None  # the operator reports it; nothing of it runs that could be routed to
    status = api.parse_status(model.get("status"))
    verified = {p.name: frozenset(p.lora_adapters) for p in status.pods}
    mine = [p for p in pods if p.namespace == namespace and p.model == name]
    endpoints = tuple(
        Endpoint(pod=p.name, address=address(p.ip), adapters=verified.get(p.name, frozenset()))
        for p in sorted(mine, key=lambda p: p.name)
        if p.ready
    )
    return Route(
        namespace=str(namespace),
        resource=name,
        served_name=spec.served_model_name or name,
        endpoints=endpoints,
        pods=len(mine),
        adapters=frozenset(a.name for a in spec.lora.adapters) if spec.lora else frozenset(),
        routing=spec.routing,
        created=str(meta.get("creationTimestamp", "")),
        replicas=spec.replicas,
        autoscaling=spec.autoscaling,
    )


def _claims(route: Route) -> Iterable[tuple[str, Target]]:
    yield route.served_name, Target(route)
    for alias in route.routing.aliases:
        yield alias, Target(route, rewrite=route.served_name)
    for adapter in sorted(route.adapters):
        yield adapter, Target(route, adapter=adapter)


def index(routes: Sequence[Route]) -> Table:
    names: dict[str, Target] = {}
    conflicts: list[str] = []
    # Oldest first: a new resource cannot take a name that already serves traffic.
    for route in sorted(routes, key=lambda r: (r.created or "~", r.namespace, r.resource)):
        for name, target in _claims(route):
            holder = names.get(name)
            if holder is None:
                names[name] = target
            elif holder.route is not route:
                conflicts.append(f"{route.key}: name {name!r} is already served by {holder.route.key}")
    return Table(names=names, routes=tuple(routes), conflicts=tuple(conflicts))


def build(models: Iterable[Mapping[str, Any]], pods: Iterable[PodInfo]) -> Table:
    """The routing table for these VLLMModels (as on the wire) and their pods."""
    pod_list = list(pods)
    routes = [r for r in (_route(m, pod_list) for m in models) if r is not None]
    return index(routes)


def static(upstreams: Sequence[tuple[str, str]], strategy: str = "LeastLoad") -> Table:
    """A table from `NAME=URL` pairs (`vllm-operator router --upstream`): no Kubernetes involved.
    A name given twice gets both URLs as endpoints; every route uses `strategy`."""
    by_name: dict[str, list[Endpoint]] = {}
    for name, url in upstreams:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"--upstream {name}={url}: give an http://HOST:PORT URL without a path")
        by_name.setdefault(name, []).append(
            Endpoint(
                pod=f"{name}-{len(by_name.get(name, []))}", address=address(parts.hostname, parts.port or 80)
            )
        )
    routes = [
        Route(
            namespace="",
            resource=name,
            served_name=name,
            endpoints=tuple(eps),
            pods=len(eps),
            adapters=frozenset(),
            routing=api.Routing(strategy=strategy),
        )
        for name, eps in by_name.items()
    ]
    return index(routes)
