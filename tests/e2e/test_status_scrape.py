"""Live throughput in the status: real servers answer at the pods' (loopback) addresses.

kwok hands out pod IPs from the cluster's loopback pod CIDR; the test starts a real
`vllm_server` on the tiny model at each pod's IP and port 8000, loads them, and compares what
the status says with what the servers' own counters say.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.operator_process import OperatorProcess
from tests.harness.cluster import LocalCluster, wait_until
from tests.server.realserver import RealServer, start_server
from vllm_operator.throughput import GENERATION_TOKENS, parse_metrics

pytestmark = [pytest.mark.cluster, pytest.mark.engine]
INTERVAL = 2


@pytest.fixture
def scraping_operator(operator: OperatorProcess, cluster: LocalCluster) -> Iterator[OperatorProcess]:
    """The session's operator, swapped for one that scrapes every INTERVAL seconds."""
    operator.stop()
    env = {
        "VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS": str(INTERVAL),
        "VLLM_OPERATOR_SCRAPE_TIMEOUT_SECONDS": "1",
        # Every window is written, so that the readings below sample all of them.
        "VLLM_OPERATOR_RATE_HYSTERESIS": "0",
    }
    scraper = OperatorProcess(cluster, "scrape-operator.log", env=env)
    scraper.start()
    yield scraper
    scraper.stop()
    operator.start()


def get(cluster: LocalCluster, ns: str, *what: str) -> Any:
    return json.loads(cluster.kubectl("get", "-n", ns, *what, "-o", "json", check=True).stdout)


def generated_tokens(server: RealServer, host: str) -> float:
    page = httpx.get(f"http://{host}:{server.port}/metrics", timeout=5).text
    return parse_metrics(page)[0][GENERATION_TOKENS]


def load(hosts: list[str], stop: threading.Event, per_host: int = 3) -> None:
    """Streamed chat requests, `per_host` at a time to every server, until `stop` is set."""

    def worker(host: str) -> None:
        with httpx.Client(base_url=f"http://{host}:8000", timeout=60) as client:
            while not stop.is_set():
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "count to ten"}],
                    "max_tokens": 32,
                    "stream": True,
                }
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        for _ in response.iter_lines():
                            pass
                except httpx.HTTPError:
                    time.sleep(0.2)  # this server was stopped on purpose; keep loading the others

    threads = [
        threading.Thread(target=worker, args=(h,), daemon=True) for h in hosts for _ in range(per_host)
    ]
    for thread in threads:
        thread.start()


def test_status_reports_live_throughput_and_unhealthy_pods(
    scraping_operator: OperatorProcess,
    cluster: LocalCluster,
    namespace: str,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    manifest = {
        "apiVersion": "serving.vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": "tiny"},
        "spec": {"model": "/models/tiny", "replicas": 2},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=True)
    selector = "app.kubernetes.io/instance=tiny"
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", "pod", "-l", selector, "--timeout=120s",
        check=True, timeout=130,
    )  # fmt: skip
    pods = {
        p["metadata"]["name"]: p["status"]["podIP"]
        for p in get(cluster, namespace, "pods", "-l", selector)["items"]
    }
    assert len(pods) == 2 and all(ip.startswith("127.") for ip in pods.values()), pods

    servers = {
        name: start_server(
            tiny_model, [], host=ip, port=8000, served_name="tiny", log_path=tmp_path / f"{name}.log"
        )
        for name, ip in pods.items()
    }
    stop = threading.Event()
    try:
        cluster.kubectl(
            "wait",
            "-n",
            namespace,
            "--for=condition=Ready",
            "vllmmodel/tiny",
            "--timeout=60s",
            check=True,
            timeout=70,
        )
        load(list(pods.values()), stop)
        time.sleep(3 * INTERVAL)  # warm up: every status window is under load from here on

        before = sum(generated_tokens(servers[n], ip) for n, ip in pods.items())
        started = time.monotonic()
        readings: dict[str, float] = {}
        while time.monotonic() - started < 24:
            metrics = get(cluster, namespace, "vllmmodel", "tiny")["status"].get("metrics", {})
            if metrics.get("scrapedAt"):
                readings[metrics["scrapedAt"]] = metrics["generationTokensPerSecond"]
            time.sleep(0.5)
        after = sum(generated_tokens(servers[n], ip) for n, ip in pods.items())
        truth = (after - before) / (time.monotonic() - started)

        reported = statistics.fmean(readings.values())
        print(f"servers' counters: {truth:.1f} tok/s; status (mean of {len(readings)}): {reported:.1f} tok/s")
        assert truth > 10
        assert abs(reported - truth) / truth < 0.10, (reported, truth, readings)

        row = cluster.kubectl(
            "get", "-n", namespace, "vllm", "tiny", "--no-headers", check=True
        ).stdout.split()
        assert float(row[3]) > 0, row  # TOKENS/S column

        status = get(cluster, namespace, "vllmmodel", "tiny")["status"]
        assert sorted(p["name"] for p in status["pods"]) == sorted(pods)
        assert all(p["healthy"] and p["ready"] for p in status["pods"])

        victim = sorted(pods)[0]
        servers[victim].stop(timeout=10)

        def degraded_names_victim() -> bool:
            obj = get(cluster, namespace, "vllmmodel", "tiny")
            conditions = {c["type"]: c for c in obj["status"].get("conditions", [])}
            degraded = conditions.get("Degraded", {})
            return degraded.get("status") == "True" and victim in degraded.get("message", "")

        wait_until(degraded_names_victim, f"Degraded to name {victim}", timeout=10 * INTERVAL, interval=0.5)
        obj = get(cluster, namespace, "vllmmodel", "tiny")
        assert obj["status"]["phase"] == "Degraded"
        assert [p["healthy"] for p in obj["status"]["pods"] if p["name"] == victim] == [False]
    finally:
        stop.set()
        for server in servers.values():
            server.stop(timeout=20)
