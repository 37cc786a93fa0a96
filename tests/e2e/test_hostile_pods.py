"""Hostile pods cannot stall the scrape: a healthy model's status keeps coming on schedule.

kwok hands out pod IPs from the cluster's loopback pod CIDR; the test puts a server at each
pod's IP and port 8000 (devtools/hostile.py) that answers like a healthy vLLM pod, or with
NaN or +Inf, ids that are not strings, one byte per 1.5 s, or a 50 MB page; one pod has no
server at all. Every round, each hostile pod must cost at most the 2 s deadline and turn its
own model Degraded with the reason, while the healthy model's status is written every round.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools.cluster import LocalCluster, condition, wait_until
from devtools.hostile import PodServers, alternating_page, drip, huge, metrics_page, pod
from devtools.operator_process import OperatorProcess
from vllm_operator.scrape import MAX_PAGE_BYTES

pytestmark = pytest.mark.cluster
INTERVAL = 3
DEADLINE = 2  # the default scrapeTimeoutSeconds: one pod's whole budget
SERVER_PORT = 8000
# Model -> what its pod's server does (None: no server, so the connection is refused), and
# what its Degraded condition must say.
HOSTILE: dict[str, tuple[Any, str]] = {
    "nan": (pod(metrics_page(running="NaN")), "/metrics: vllm:num_requests_running is nan"),
    "inf": (pod(metrics_page(running="+Inf")), "/metrics: vllm:num_requests_running is inf"),
    "ids": (
        pod(models=b'{"data": [{"id": "ids"}, {"id": 7, "parent": "ids"}]}'),
        "/v1/models: entry 1 has no string id",
    ),
    "drip": (pod(slow=drip(every=1.5)), f"/metrics not read within the {DEADLINE}s deadline"),
    "huge": (pod(slow=huge(50_000_000)), f"/metrics is over the {MAX_PAGE_BYTES}-byte cap"),
    "refused": (None, "connection refused"),
}


def poll(cluster: LocalCluster, *args: str) -> Any:
    """`kubectl get ARGS -o json`, parsed; None for a missed poll.

    A kubectl that fails or hangs is a missed poll, not an error: a run on a fresh machine once
    failed on one transient kubectl error while the control plane was busy.
    """
    try:
        proc = cluster.kubectl("get", *args, "-o", "json", timeout=10)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def model_status(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any] | None:
    obj = poll(cluster, "vllmmodel", name, "-n", namespace)
    return obj if isinstance(obj, dict) else None


def round_seconds(operator: OperatorProcess) -> tuple[float, float]:
    """The operator's scrape rounds so far: (count, total seconds), from its own /metrics."""
    url = f"http://127.0.0.1:{operator.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("vllm_operator_scrape_round_duration_seconds")
    }
    return (
        values.get("vllm_operator_scrape_round_duration_seconds_count", 0.0),
        values.get("vllm_operator_scrape_round_duration_seconds_sum", 0.0),
    )


@pytest.fixture(scope="module")
def scraping_operator(operator: OperatorProcess, cluster: LocalCluster) -> Iterator[OperatorProcess]:
    """The session's operator, swapped for one that scrapes every INTERVAL seconds."""
    operator.stop()
    env = {
        "VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS": str(INTERVAL),
        "VLLM_OPERATOR_SCRAPE_TIMEOUT_SECONDS": str(DEADLINE),
    }
    scraper = OperatorProcess(cluster, "hostile-operator.log", env=env)
    scraper.start()
    yield scraper
    scraper.stop()
    operator.start()


@pytest.fixture(scope="module")
def pods_at_work(scraping_operator: OperatorProcess, cluster: LocalCluster) -> Iterator[str]:
    """A namespace with the healthy model and the hostile ones, each pod's server running."""
    namespace = f"hostile-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(namespace)
    behaviours: dict[str, Any] = {"healthy": pod(alternating_page())}
    behaviours.update({name: behaviour for name, (behaviour, _) in HOSTILE.items()})
    for name in behaviours:
        spec: dict[str, Any] = {"model": "org/tiny", "replicas": 1}
        if name == "ids":
            spec["lora"] = {"maxLoraRank": 8, "adapters": []}  # so that /v1/models is read
        manifest = {
            "apiVersion": "serving.vllm-operator.io/v1alpha1",
            "kind": "VLLMModel",
            "metadata": {"name": name},
            "spec": spec,
        }
        cluster.apply(manifest, namespace=namespace)

    ips: dict[str, str] = {}

    def all_pods_ready() -> bool:
        listing = poll(cluster, "pods", "-n", namespace)
        for item in (listing or {}).get("items", []):
            name = item["metadata"].get("labels", {}).get("app.kubernetes.io/instance", "")
            ready = condition(item, "Ready").get("status") == "True"
            if name and ready and item["status"].get("podIP"):
                ips[name] = item["status"]["podIP"]
        return set(ips) == set(behaviours)

    try:
        wait_until(all_pods_ready, "a ready pod with an IP for every model", timeout=90, interval=0.5)
        assert all(ip.startswith("127.") for ip in ips.values()), ips
        with PodServers() as servers:
            for name, behaviour in behaviours.items():
                if behaviour is not None:
                    servers.serve(ips[name], SERVER_PORT, behaviour)
            yield namespace
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_hostile_pods_degrade_their_own_models_and_the_healthy_one_stays_on_schedule(
    pods_at_work: str, cluster: LocalCluster, scraping_operator: OperatorProcess
) -> None:
    namespace = pods_at_work

    def degraded_with_reasons() -> bool:
        for name, (_, reason) in HOSTILE.items():
            obj = model_status(cluster, namespace, name)
            degraded = condition(obj, "Degraded") if obj else {}
            if degraded.get("status") != "True" or reason not in degraded.get("message", ""):
                return False
        return True

    wait_until(degraded_with_reasons, "every hostile model Degraded with its reason", timeout=60, interval=1)
    for name in HOSTILE:
        obj = model_status(cluster, namespace, name) or {}
        degraded = condition(obj, "Degraded")
        print(f"{name}: Degraded/{degraded.get('reason')}: {degraded.get('message')}")

    # The healthy model's running count alternates, so every round writes its status: each new
    # scrapedAt is a round that finished while every hostile pod was misbehaving.
    rounds_before = round_seconds(scraping_operator)
    stamps: list[str] = []
    window_ends = time.monotonic() + 6 * INTERVAL
    while time.monotonic() < window_ends:
        current = model_status(cluster, namespace, "healthy")
        stamp = ((current or {}).get("status") or {}).get("metrics", {}).get("scrapedAt", "")
        if stamp and (not stamps or stamp != stamps[-1]):
            stamps.append(stamp)
        time.sleep(0.25)
    rounds_after = round_seconds(scraping_operator)

    count = rounds_after[0] - rounds_before[0]
    mean_round = (rounds_after[1] - rounds_before[1]) / count if count else float("inf")
    times = [datetime.fromisoformat(s.replace("Z", "+00:00")) for s in stamps]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    print(
        f"with a dripping pod: {count:.0f} rounds in {6 * INTERVAL}s, {mean_round:.2f}s per round "
        f"(deadline {DEADLINE}s, interval {INTERVAL}s); healthy model's scrapedAt gaps {gaps}"
    )
    assert count >= 4, "the scrape rounds stalled"
    assert mean_round < DEADLINE + 1.5, mean_round
    assert len(gaps) >= 3 and statistics.median(gaps) <= INTERVAL + 1 and max(gaps) <= 3 * INTERVAL, stamps

    healthy = model_status(cluster, namespace, "healthy") or {}
    assert healthy.get("status", {}).get("phase") == "Ready", healthy.get("status")
    assert condition(healthy, "Degraded").get("status") == "False"
    assert [p["healthy"] for p in healthy["status"]["pods"]] == [True]
