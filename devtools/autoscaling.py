"""Autoscaling on the local cluster: the operator and the router as real processes, kwok pods
answered by fake vLLM pods, and a watch that timestamps every replica change and every pod
that turns Ready. Shared by tests/e2e/test_autoscaling.py (behaviour) and
bench/autoscale_bench.py (figures): one place that drives the scenarios of issue 16's bars.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import kubernetes

from devtools.cluster import LocalCluster, condition, wait_until
from devtools.fakepod import FakePod, FakePods
from devtools.operator_process import OperatorProcess
from devtools.router_process import RouterProcess
from vllm_operator import k8s, render

CHAT = "/v1/chat/completions"


def autoscaled(name: str, replicas: int, **autoscaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "serving.vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name},
        "spec": {"model": f"/models/{name}", "replicas": replicas, "autoscaling": autoscaling},
    }


@dataclass
class Timeline:
    """What the watch saw, stamped with time.monotonic() when it arrived."""

    replicas: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Per model: (when, spec.replicas) at each change, the first entry as listed."""
    ready: dict[str, float] = field(default_factory=dict)
    """Per pod: when it was first seen Ready."""
    model_of_ip: dict[str, str] = field(default_factory=dict)

    def writes(self, model: str) -> list[tuple[float, int]]:
        """The replica changes after the first sighting."""
        return self.replicas.get(model, [])[1:]


class Stack:
    """The operator (scraping every 2 s, autoscaling every second) and the router for one
    namespace, with a fake pod answering at every pod IP."""

    def __init__(self, cluster: LocalCluster, namespace: str, logs: Path) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.token = secrets.token_hex(16)
        self.router = RouterProcess(
            ["--namespace", namespace, "--verbose"],
            {**cluster.env(), "VLLM_OPERATOR_ROUTER_TOKEN": self.token},
            logs / "autoscale-router.log",
        )
        env = {
            "VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS": "2",
            "VLLM_OPERATOR_ROUTER_URL": self.router.url,
            "VLLM_OPERATOR_ROUTER_TOKEN": self.token,
        }
        self.operator = OperatorProcess(cluster, "autoscale-operator.log", env=env, namespaces=(namespace,))
        self.fakes = FakePods()
        self.pods: dict[str, FakePod] = {}
        self.default_delay = 0.0
        self.timeline = Timeline()
        self.stopping = threading.Event()
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(cluster.kubeconfig), client_configuration=configuration
        )
        self.kube_config = configuration

    async def pod_for(self, ip: str) -> FakePod:
        """The fake pod at `ip`, serving the model whose pod has that IP now. The stack's own
        pod watch may learn the IP after the router does: wait for it (up to 3 s) rather than
        answer as no model. A new fake when the IP moved to another model's pod (kwok reuses
        the IPs of deleted pods). CI once saw a model's first request answered 404 here."""
        served = self.timeline.model_of_ip.get(ip)
        for _ in range(60):
            if served is not None:
                break
            await asyncio.sleep(0.05)
            served = self.timeline.model_of_ip.get(ip)
        served = served or "unknown"
        pod = self.pods.get(ip)
        if pod is None or pod.served != served:
            pod = self.pods[ip] = FakePod(ip, served=served, delay=self.default_delay)
        return pod

    def start(self) -> Stack:
        self.fakes.catch_all(8000, self.pod_for)
        for kind in ("VLLMModel", "Pod"):
            threading.Thread(
                target=asyncio.run, args=(self._watch(kind),), daemon=True, name=f"watch-{kind}"
            ).start()
        self.router.start()
        self.operator.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.operator.stop()
        self.router.stop()
        self.fakes.close()

    async def _watch(self, kind: str) -> None:
        """One kind's list-then-watch, on a loop of its own in its thread (so that the scenarios
        stay synchronous), with a client made on that loop."""
        version = ""
        async with k8s.KubeCluster(self.kube_config) as kube:
            while not self.stopping.is_set():
                try:
                    if not version:
                        items, version = await kube.list(kind, self.namespace)
                        for item in items:
                            self._seen(kind, item)
                    async for _, obj in kube.watch(kind, self.namespace, "", version, seconds=30):
                        version = str(obj.get("metadata", {}).get("resourceVersion", version))
                        self._seen(kind, obj)
                except Exception:  # a watch the server ended or broke: list again
                    version = ""
                    await asyncio.sleep(0.2)

    def _seen(self, kind: str, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        name = obj.get("metadata", {}).get("name", "")
        if kind == "VLLMModel":
            replicas = int(obj.get("spec", {}).get("replicas", 1))
            history = self.timeline.replicas.setdefault(name, [])
            if not history or history[-1][1] != replicas:
                history.append((now, replicas))
            return
        ip = obj.get("status", {}).get("podIP")
        model = obj.get("metadata", {}).get("labels", {}).get(render.INSTANCE_LABEL)
        if ip and model:
            self.timeline.model_of_ip[ip] = model
            if ip in self.pods:
                self.pods[ip].served = model  # an IP reused by another model's pod
                self.pods[ip].name = name
        if condition(obj, "Ready").get("status") == "True" and name not in self.timeline.ready:
            self.timeline.ready[name] = now

    # ---- helpers for scenarios -----------------------------------------------------------

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cluster.apply(manifest, namespace=self.namespace)
        name = manifest["metadata"]["name"]
        wait_until(lambda: name in self.routed(), f"the router knows {name}", timeout=30, interval=0.2)

    def routed(self) -> set[str]:
        listing = httpx.get(f"{self.router.url}/v1/models", timeout=5).json()
        return {m["id"] for m in listing["data"]}

    def replicas(self, model: str) -> int:
        history = self.timeline.replicas.get(model)
        return history[-1][1] if history else -1

    def status(self, model: str) -> dict[str, Any]:
        obj = self.cluster.get_json("vllmmodel", model, namespace=self.namespace, check=False) or {}
        return dict(obj.get("status", {}))

    def ready_pods(self, model: str) -> list[str]:
        listing = self.cluster.get_json(
            "pods", "-l", f"{render.INSTANCE_LABEL}={model}", namespace=self.namespace, check=False
        )
        return [
            p["metadata"]["name"]
            for p in (listing or {}).get("items", [])
            if condition(p, "Ready").get("status") == "True"
        ]

    def zero_writes(self, model: str, since: float = 0.0) -> list[float]:
        """When the operator wrote replicas 0 for `model` (wall clock, from its log, in ms),
        from `since` on (the log is appended to across runs)."""
        pattern = re.compile(
            rf"^\[(\S+ \S+)\].* scaled {re.escape(self.namespace)}/{re.escape(model)} from \d+ to 0 replicas"
        )
        found = (pattern.match(line) for line in self.operator.log.read_text(errors="replace").splitlines())
        stamps = [datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in found if m]
        return [t for t in stamps if t >= since]

    def in_flight_at(self, model: str, when: float) -> int:
        """Completions a fake pod of `model` was serving at wall-clock time `when`."""
        return sum(
            1
            for pod in self.pods.values()
            if pod.served == model
            for start, end in pod.spans
            if start < when < end
        )

    def delay(self, seconds: float) -> None:
        """Every fake pod, present and future, takes this long per completion."""
        self.default_delay = seconds
        for pod in self.pods.values():
            pod.delay = seconds


@dataclass(frozen=True)
class Answer:
    status: int
    sent: float
    first_byte: float
    done: float
    body: str


def chat(
    url: str, model: str, stream: bool = False, timeout: float = 120, client: httpx.Client | None = None
) -> Answer:
    """One chat completion on `client` (made here when None), read to its end."""
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    own = client is None
    # A client costs ~10 ms (an SSL context, even for http://): made before the clock starts.
    client = client or httpx.Client(base_url=url, timeout=timeout)
    sent = time.monotonic()
    try:
        with client.stream("POST", CHAT, json=payload) as response:
            first = 0.0
            chunks: list[str] = []
            for chunk in response.iter_text():
                first = first or time.monotonic()
                chunks.append(chunk)
            return Answer(
                response.status_code, sent, first or time.monotonic(), time.monotonic(), "".join(chunks)
            )
    except httpx.HTTPError as error:
        now = time.monotonic()
        return Answer(0, sent, now, now, repr(error))
    finally:
        if own:
            client.close()


def burst(
    url: str,
    model: str,
    count: int,
    stream: bool = False,
    spread: float = 0.0,
    when: Callable[[], None] = lambda: None,
) -> list[Answer]:
    """`count` requests at once (or spread evenly over `spread` seconds), each on its own
    connection, as soon as `when()` returns. Clients and threads are made first and released
    together, so that "at once" means within milliseconds, not the second it takes to make a
    hundred clients."""
    clients = [httpx.Client(base_url=url, timeout=120) for _ in range(count)]
    go = threading.Barrier(count + 1)

    def one(index: int) -> Answer:
        go.wait()
        if spread:
            time.sleep(spread * index / count)
        return chat(url, model, stream, client=clients[index])

    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(one, i) for i in range(count)]
            when()
            go.wait()
            return [f.result() for f in futures]
    finally:
        for client in clients:
            client.close()


@contextmanager
def load(url: str, model: str, concurrency: Callable[[], int]) -> Iterator[list[Answer]]:
    """Keep `concurrency()` requests in flight (re-read as requests end) until the block exits."""
    answers: list[Answer] = []
    stop = threading.Event()

    def worker(index: int) -> None:
        while not stop.is_set():
            if index >= concurrency():
                time.sleep(0.05)
                continue
            answers.append(chat(url, model))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(64)]
    for thread in threads:
        thread.start()
    try:
        yield answers
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=130)


# ---- the scenarios: each returns its figures ----------------------------------------------


def _pods_of(stack: Stack, model: str) -> list[float]:
    return sorted(t for pod, t in stack.timeline.ready.items() if pod.startswith(f"{model}-"))


def cold_wake(stack: Stack, model: str, count: int = 50, stream: bool = False) -> dict[str, Any]:
    """`count` requests at once to a model at zero (maxReplicas 1, so one write is all there is)."""
    stack.apply(autoscaled(model, 0, minReplicas=0, maxReplicas=1, idleSeconds=3600))
    answers = burst(stack.router.url, model, count, stream)
    first = min(a.sent for a in answers)
    writes = stack.timeline.writes(model)
    ready = _pods_of(stack, model)
    return {
        "requests": count,
        "failed": sum(a.status != 200 for a in answers),
        "statuses": sorted({a.status for a in answers}),
        "writes": len(writes),
        "replicas": [r for _, r in writes],
        "write_after_first_request_s": writes[0][0] - first if writes else None,
        "pod_ready_after_first_request_s": ready[0] - first if ready else None,
        "first_byte_after_ready_s": max(a.first_byte for a in answers) - ready[0] if ready else None,
        "first_byte_after_ready_p50_s": sorted(a.first_byte for a in answers)[count // 2] - ready[0]
        if ready
        else None,
    }


def step_up(stack: Stack, model: str, target: int = 2, factor: int = 4) -> dict[str, Any]:
    """One idle replica, then `factor` x its capacity (targetInFlight) at once: the time to the
    scale-up write, and the replicas reached."""
    stack.apply(autoscaled(model, 1, minReplicas=1, maxReplicas=factor, targetInFlight=target))
    wait_until(lambda: len(_pods_of(stack, model)) == 1, f"{model}'s pod ready", timeout=60, interval=0.2)
    stack.delay(6.0)  # each request stays in flight 6 s
    time.sleep(4)  # idle samples first: the step starts from a quiet window
    answers = burst(stack.router.url, model, target * factor)
    step = min(a.sent for a in answers)
    writes = stack.timeline.writes(model)
    ups = [t for t, r in writes if r > 1]
    status = stack.status(model).get("autoscaling", {})
    stack.delay(0.0)
    return {
        "failed": sum(a.status != 200 for a in answers),
        "decision_after_step_s": ups[0] - step if ups else None,
        "replicas": [r for _, r in writes],
        "reason": status.get("decisions", [{}])[0].get("reason", "") if status.get("decisions") else "",
    }


def square_wave(
    stack: Stack, model: str, period: float, cycles: int, *, high: int, **policy: Any
) -> dict[str, Any]:
    """`high` requests in flight for half a period, none for the other half, `cycles` times."""
    stack.apply(autoscaled(model, 1, **policy))
    stack.delay(0.5)
    level = {"now": 0}
    started = time.monotonic()
    with load(stack.router.url, model, lambda: level["now"]) as answers:
        for _ in range(cycles):
            level["now"] = high
            time.sleep(period / 2)
            level["now"] = 0
            time.sleep(period / 2)
    stack.delay(0.0)
    writes = [(t - started, r) for t, r in stack.timeline.writes(model) if t >= started]
    per_cycle = [sum(1 for t, _ in writes if c * period <= t < (c + 1) * period) for c in range(cycles)]
    delay = float(policy.get("scaleDownDelaySeconds", 120))
    early_downs = []
    last_up = -1e9
    previous = 1
    for t, replicas in writes:
        if replicas > previous:
            last_up = t
        elif t - last_up < delay - 1.0:  # 1 s: the watch's stamps against the operator's clock
            early_downs.append(round(t - last_up, 1))
        previous = replicas
    return {
        "failed": sum(a.status != 200 for a in answers),
        "requests": len(answers),
        "changes_per_cycle": per_cycle,
        "writes": [(round(t, 1), r) for t, r in writes],
        "scale_downs_inside_delay": early_downs,
    }


def idle_deadline(
    stack: Stack, model: str, idle: int, count: int = 100, offset: float | None = None, spread: float = 0.2
) -> dict[str, Any]:
    """A model with one replica and minReplicas 0 gets `count` requests within `spread` seconds,
    `offset` seconds after its idle deadline (the last request's end + idleSeconds; the
    operator acts on its next tick), or with `offset` None the moment the router reports the
    model parked (the operator's zero write is then tens of ms away): none may be lost, and it
    may not go to zero with one in flight at a pod. Depending on when it comes, the burst aborts
    the scale to zero, or is held by the park or at zero and wakes the model."""
    since = time.time()
    stack.apply(autoscaled(model, 1, minReplicas=0, maxReplicas=1, idleSeconds=idle, scaleDownDelaySeconds=0))
    wait_until(lambda: len(_pods_of(stack, model)) >= 1, f"{model}'s pod ready", timeout=60, interval=0.2)
    stack.delay(0.2)
    first = chat(stack.router.url, model)
    assert first.status == 200, first

    def when() -> None:
        if offset is not None:
            time.sleep(max(0.0, first.done + idle + offset - time.monotonic()))
            return
        with httpx.Client(timeout=5) as client:
            demand = f"{stack.router.url}/router/demand"
            wait_until(
                lambda: bool(client.get(demand).json()["models"][model].get("parked")),
                f"{model} parked",
                timeout=idle + 30,
                interval=0.002,
            )

    answers = burst(stack.router.url, model, count, spread=spread, when=when)
    stack.delay(0.0)
    wait_until(lambda: stack.replicas(model) == 0, f"{model} at zero", timeout=idle + 30, interval=0.2)
    return {
        "offset_s": offset,
        "requests": count,
        "failed": sum(a.status != 200 for a in answers),
        "replicas": [r for _, r in stack.timeline.writes(model)],
        # The operator's log stamps a write as it returns: the pods were sent 0 just before.
        "in_flight_at_zero": [stack.in_flight_at(model, when) for when in stack.zero_writes(model, since)],
        "slowest_s": round(max(a.done - a.sent for a in answers), 2),
        "decisions": [
            d.get("reason") for d in stack.status(model).get("autoscaling", {}).get("decisions", [])
        ],
    }


def operator_restart(stack: Stack, model: str, seconds: float = 10.0) -> dict[str, Any]:
    """The operator restarted right after its first scale-up, under steady load: the replicas
    it wrote must never go back while the load stays."""
    stack.apply(autoscaled(model, 1, minReplicas=1, maxReplicas=4, targetInFlight=2))
    wait_until(lambda: bool(stack.ready_pods(model)), f"{model}'s pod", timeout=60, interval=0.5)
    stack.delay(1.0)
    with load(stack.router.url, model, lambda: 8) as answers:
        wait_until(lambda: stack.replicas(model) > 1, "a scale-up", timeout=30, interval=0.2)
        at_restart = stack.replicas(model)
        stack.operator.stop()
        stack.operator.start()
        time.sleep(seconds)
    stack.delay(0.0)
    seen = [r for _, r in stack.timeline.replicas[model]]
    return {
        "replicas_at_restart": at_restart,
        "replicas_seen": seen,
        "went_back": seen != sorted(seen),
        "requests": len(answers),
        "failed": sum(a.status != 200 for a in answers),
    }
