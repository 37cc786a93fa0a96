"""Scrape cost: the operator's real scrape round over 500 pods serving a realistic /metrics page.

A stand-in process answers /health, /metrics (vLLM's metric names and histograms, ~220 lines,
counters moving) and /v1/models on one port of every 127.77.x.y address; the operator's
Controller scrapes 100 models x 5 pods and writes status to a counting fake cluster. Prints the
time per round, the operator's CPU time per round, its CPU share at the default 15 s interval,
and the status writes per round. Run with `make bench-scrape`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from devtools.processes import exit_on_signals
from vllm_operator import reconcile
from vllm_operator.controller import Controller
from vllm_operator.monitor import Monitor
from vllm_operator.scrape import Scraper
from vllm_operator.settings import OperatorSettings

PORT = 18123  # the pods' port is 8000, which may be taken on a dev machine
HISTOGRAMS = [
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
]
BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]

STAND_IN = r"""
import asyncio, sys, time
PAGE_HEAD = sys.argv[1]
START = time.monotonic()

def page():
    t = time.monotonic() - START
    return (PAGE_HEAD
        + f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {1000 + 900 * t}\n'
        + f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {500 + 450 * t}\n'
        + f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} {10 + 9 * t}\n')

MODELS = b'{"object":"list","data":[{"id":"m","object":"model","root":"/m","parent":null}]}'

async def handle(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            path = line.split()[1].decode()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            body = {"/metrics": page().encode(), "/v1/models": MODELS}.get(path, b'{"status":"ok"}')
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[2]), backlog=4096)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def realistic_page_head() -> str:
    """Every vLLM series but the moving counters: gauges and histograms as a server exposes them."""
    lines = []
    labels = 'engine="0",model_name="m"'
    for gauge, value in [
        ("vllm:num_requests_running", 12),
        ("vllm:num_requests_waiting", 0),
        ("vllm:kv_cache_usage_perc", 0.41),
        ("vllm:num_preemptions_total", 0),
        ("vllm:prefix_cache_queries_total", 1000),
        ("vllm:prefix_cache_hits_total", 400),
    ]:
        lines += [f"# HELP {gauge} x", f"# TYPE {gauge} gauge", f"{gauge}{{{labels}}} {value}"]
    for name in HISTOGRAMS:
        lines += [f"# HELP {name} x", f"# TYPE {name} histogram"]
        count = 0
        for bound in BUCKETS:
            count += 3
            lines.append(f'{name}_bucket{{{labels},le="{bound}"}} {count}')
        lines += [f'{name}_bucket{{{labels},le="+Inf"}} {count}', f"{name}_count{{{labels}}} {count}"]
        lines.append(f"{name}_sum{{{labels}}} {count * 0.1}")
    for counter in ("vllm:generation_tokens", "vllm:prompt_tokens", "vllm:request_success"):
        lines += [f"# HELP {counter}_total x", f"# TYPE {counter}_total counter"]
    return "\n".join(lines) + "\n"


class CountingCluster:
    """Stands in for the API server: counts status writes and events."""

    def __init__(self) -> None:
        self.status_writes = 0
        self.events = 0
        self.written: dict[tuple[str, str], dict[str, Any]] = {}

    async def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        return None

    async def apply(self, manifest: Mapping[str, Any]) -> Mapping[str, Any]:
        return manifest

    async def list_pods(self, namespace: str, selector: str) -> Sequence[Mapping[str, Any]]:
        return []

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> None:
        self.status_writes += 1
        self.written[(namespace, name)] = status

    async def event(self, owner: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        self.events += 1

    async def create(self, manifest: Mapping[str, Any]) -> bool:
        return False


def populate(controller: Controller, models: int, pods_per_model: int) -> None:
    """Models the Controller knows as a watch and a reconcile would have left them."""
    deployment = {
        "metadata": {"generation": 1},
        "status": {
            "readyReplicas": pods_per_model,
            "updatedReplicas": pods_per_model,
            "replicas": pods_per_model,
            "observedGeneration": 1,
        },
    }
    for m in range(models):
        key = ("bench", f"model-{m:03d}")
        body = {
            "metadata": {"name": key[1], "namespace": "bench", "uid": f"u{m}", "generation": 1},
            "spec": {"model": "org/m", "servedModelName": "m", "replicas": pods_per_model},
            "status": {},
        }
        pods = []
        for p in range(pods_per_model):
            n = m * pods_per_model + p
            pods.append(
                {
                    "metadata": {"name": f"{key[1]}-{p}"},
                    "status": {
                        "podIP": f"127.77.{n // 250}.{n % 250 + 1}",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )
        controller.remember(body)
        controller.store.state(key).observed = reconcile.Observed(deployment, pods)


async def rounds(controller: Controller, count: int) -> list[tuple[float, float, int]]:
    scraper = Scraper(PORT, OperatorSettings().scrape_timeout_seconds, OperatorSettings().scrape_concurrency)
    out = []
    cluster = controller.cluster
    assert isinstance(cluster, CountingCluster)
    for _ in range(count):
        writes_before = cluster.status_writes
        wall, cpu = time.monotonic(), time.process_time()
        await Monitor(controller).scrape_round(scraper)
        out.append(
            (time.monotonic() - wall, time.process_time() - cpu, cluster.status_writes - writes_before)
        )
        # A written status is what the watch hands back before the next round.
        for key, status in cluster.written.items():
            state = controller.store.state(key)
            state.body = {**(state.body or {}), "status": status}
        await asyncio.sleep(2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--pods-per-model", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    exit_on_signals()
    stand_in = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, realistic_page_head(), str(PORT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert stand_in.stdout is not None and stand_in.stdout.readline().strip() == "ready"
        settings = OperatorSettings()
        controller = Controller(CountingCluster(), settings)
        populate(controller, args.models, args.pods_per_model)
        results = asyncio.run(rounds(controller, args.rounds))
    finally:
        stand_in.terminate()
    pods = args.models * args.pods_per_model
    steady = results[1:]  # the first round has no earlier sample, so no rates yet
    wall = statistics.median(r[0] for r in steady)
    cpu = statistics.median(r[1] for r in steady)
    summary = {
        "pods": pods,
        "metrics_page_lines": realistic_page_head().count("\n") + 3,
        "round_wall_s_p50": round(wall, 3),
        "round_wall_s_max": round(max(r[0] for r in steady), 3),
        "round_cpu_s_p50": round(cpu, 3),
        "cpu_share_at_15s_interval": f"{100 * cpu / settings.scrape_interval_seconds:.1f}%",
        "status_writes_per_round": [r[2] for r in results],
        "max_writes_per_model_per_round": max(r[2] for r in results) / args.models,
    }
    for key, value in summary.items():
        print(f"{key:<32} {value}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
