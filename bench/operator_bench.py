"""Operator benchmark on the local control plane: 200 VLLMModels applied at once.

Prints: apply (one server-side apply of all 200) -> Deployment created (p50, p99), time until
the last Deployment exists and until all are Ready, API writes per idle minute after they
settle (target 0), the reconciles the operator ran, and its peak RSS. Then, in the same run,
the floor: the same 200 models' Deployments and Services rendered by the operator's own code
and created by one `kubectl apply --server-side` with no operator, timed to its last
Deployment, and the 200 VLLMModels alone applied the same way. Run with `make bench-operator`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from devtools.cluster import COMPONENTS, ClusterSpec, LocalCluster, kubectl_binary
from devtools.operator_process import OperatorProcess, install_crd
from devtools.processes import exit_on_signals
from vllm_operator import render
from vllm_operator.api import parse_spec
from vllm_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[1]
WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}
WATCHED = {"vllmmodels", "deployments", "services", "events", "replicasets", "pods"}


def model(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name},
        "spec": {"model": "org/tiny", "maxModelLen": 2048},
    }


def apply_at_once(
    cluster: LocalCluster, namespace: str, manager: str, objects: list[dict[str, Any]]
) -> tuple[float, float]:
    """One `kubectl apply --server-side` of all `objects`: (when it started, monotonic; its seconds)."""
    body = "\n---\n".join(json.dumps(o) for o in objects)
    started = time.monotonic()
    cluster.kubectl(
        "apply", "--server-side", f"--field-manager={manager}", "-n", namespace, "-f", "-",
        input=body, check=True, timeout=600,
    )  # fmt: skip
    return started, time.monotonic() - started


def reconciles(operator: OperatorProcess) -> float:
    """Reconciles the operator has run (its vllm_operator_reconciles_total, every result)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm_operator_reconciles_total{")
    )


def floor(cluster: LocalCluster, names: list[str]) -> dict[str, Any]:
    """The same models' children created straight, with no operator: one server-side apply of
    all of them (owner references dropped: there is no VLLMModel to own them here)."""
    namespace = "floor"
    cluster.kubectl("create", "namespace", namespace, check=True)
    settings = OperatorSettings()
    manifests = []
    for name in names:
        ref = render.ModelRef(name, namespace, f"uid-{name}")
        for child in render.children(ref, parse_spec(model(name)["spec"]), settings):
            child["metadata"].pop("ownerReferences", None)
            manifests.append(child)
    watch = DeploymentWatch(cluster, namespace, len(names))
    time.sleep(1)
    cpu_before = cpu_by_process(cluster)
    started, applied = apply_at_once(cluster, namespace, "floor", manifests)
    deadline = time.monotonic() + 120
    while len(watch.seen) < len(names) and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.stop()
    last = max(watch.seen.values()) - started if watch.seen else float("nan")
    # What the operator's path pays before it can start: the 200 VLLMModels themselves (CRD
    # schema and CEL rules checked per object), applied the same way with no operator.
    cluster.kubectl("create", "namespace", "floor-models", check=True)
    before = api_requests(cluster)
    _, models_alone = apply_at_once(cluster, "floor-models", "floor", [model(n) for n in names])
    return {
        "cpu_until_last_deployment": growth(cpu_before, watch.cpu_at_last),
        "models_alone_requests": growth(before, api_requests(cluster)),
        "objects": len(manifests),
        "kubectl_s": round(applied, 2),
        "last_deployment_s": round(last, 2),
        "models_alone_s": round(models_alone, 2),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def api_requests(cluster: LocalCluster, verbs: set[str] | None = None) -> dict[str, float]:
    """Requests the API server has served so far ("VERB resource": count, from its /metrics),
    of `verbs` only if given."""
    text = cluster.kubectl("get", "--raw", "/metrics", check=True, timeout=60).stdout
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if (verbs is None or labels.get("verb") in verbs) and labels.get("resource") in WATCHED:
            key = f"{labels['verb']} {labels['resource']}"
            counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def growth(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0), 2) for k in sorted(after) if after[k] != before.get(k, 0)}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_by_process(cluster: LocalCluster, operator: OperatorProcess | None = None) -> dict[str, float]:
    """CPU seconds each control-plane process (and the operator) has used so far."""
    pids = {name: cluster.supervisor.pid(name) for name in COMPONENTS}
    if operator is not None:
        pids["operator"] = operator.pid
    return {name: cpu_seconds(pid) for name, pid in pids.items() if pid}


class DeploymentWatch:
    """Records when each Deployment is first seen, through `kubectl get -w`, and the processes'
    CPU seconds when the `expected`-th is (`cpu_at_last`)."""

    def __init__(
        self,
        cluster: LocalCluster,
        namespace: str,
        expected: int = 0,
        operator: OperatorProcess | None = None,
    ) -> None:
        self.cluster, self.expected, self.operator = cluster, expected, operator
        self.cpu_at_last: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.proc = subprocess.Popen(
            [
                kubectl_binary(), "get", "deployments", "-n", namespace, "--watch", "--output-watch-events",
                "-o", "jsonpath={.object.metadata.name}{'\\n'}",
            ],
            env=cluster.env(), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            name = line.strip()
            if name and name not in self.seen:
                self.seen[name] = time.monotonic()
                if len(self.seen) == self.expected:
                    self.cpu_at_last = cpu_by_process(self.cluster, self.operator)

    def stop(self) -> None:
        self.proc.terminate()


def profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the operator (100 Hz, idle waits left out) into collapsed stacks (one
    line per stack and its sample count; speedscope and flamegraph.pl read them)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit(f"--profile needs py-spy in the venv ({spy}): pip install -e '.[dev]'")
    argv = [str(spy), "record", "--pid", str(pid), "--rate", "100", "--format", "raw"]
    return subprocess.Popen([*argv, "--output", str(out)], stdout=subprocess.DEVNULL)


def run(count: int, idle_seconds: int, profile: Path | None = None) -> dict[str, Any]:
    gpu_nodes = max(2, -(-count // 8) + 1)
    cluster = LocalCluster(ROOT / ".local" / "bench", ClusterSpec(gpu_nodes=gpu_nodes))
    print(f"starting a local cluster with {gpu_nodes} fake GPU nodes ...", flush=True)
    cluster.start(timeout=300)
    operator = OperatorProcess(cluster, "bench-operator.log")
    try:
        install_crd(cluster)
        namespace = "bench"
        cluster.kubectl("create", "namespace", namespace, check=True)
        operator.start()
        watch = DeploymentWatch(cluster, namespace, count, operator)
        time.sleep(1)

        names = [f"model-{i:03d}" for i in range(count)]
        # Applied at once, as the floor applies its children: one server-side apply of all.
        # (Ten client-side applies of 20 took ~13 s by themselves, and the operator kept up
        # with them: that measured kubectl, not the operator.)
        spy = profiler(operator.pid, profile) if profile else None
        requests_before = api_requests(cluster)
        cpu_before = cpu_by_process(cluster, operator)
        started, models_applied_s = apply_at_once(cluster, namespace, "bench", [model(n) for n in names])
        applied = dict.fromkeys(names, started)
        print(f"applied {count} models in {models_applied_s:.1f}s")

        deadline = time.monotonic() + 900
        ready = 0
        while time.monotonic() < deadline:
            out = cluster.kubectl(
                "get", "vllmmodels", "-n", namespace, "-o", "jsonpath={.items[*].status.phase}", timeout=60
            ).stdout
            ready = out.split().count("Ready")
            print(f"\rready {ready}/{count}", end="", flush=True)
            if ready == count:
                break
            time.sleep(1)
        all_ready = time.monotonic() - started
        print()
        watch.stop()
        latencies = [watch.seen[n] - applied[n] for n in names if n in watch.seen]
        last_deployment = max(watch.seen.values()) - started if watch.seen else float("nan")
        reconciled = reconciles(operator)
        # Everything the API server served for these resources from the apply until all were
        # Ready: the operator's calls, kubectl's apply, the controllers' and kwok's, and this
        # loop's one LIST of vllmmodels a second.
        requests = growth(requests_before, api_requests(cluster))
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
            print(f"profile of the operator from the apply until all were Ready: {profile}")

        time.sleep(5)  # let the last status writes land before the idle window
        before = api_requests(cluster, WRITE_VERBS)
        print(f"idle for {idle_seconds}s, counting API writes ...", flush=True)
        time.sleep(idle_seconds)
        idle = growth(before, api_requests(cluster, WRITE_VERBS))
        rss, cpu = round(peak_rss_mib(operator.pid), 1), cpu_seconds(operator.pid)
        operator.stop()  # the floor runs with no operator
        straight = floor(cluster, names)
        return {
            "models": count,
            "ready": ready,
            "deployment_created_p50_s": round(percentile(latencies, 50), 3) if latencies else None,
            "deployment_created_p99_s": round(percentile(latencies, 99), 3) if latencies else None,
            "last_deployment_s": round(last_deployment, 2),
            "floor_last_deployment_s": straight["last_deployment_s"],
            "floor_kubectl_apply_s": straight["kubectl_s"],
            "models_kubectl_apply_s": round(models_applied_s, 2),
            "models_alone_kubectl_apply_s": straight["models_alone_s"],
            "floor_objects": straight["objects"],
            "last_deployment_vs_floor": round(last_deployment / straight["last_deployment_s"], 2),
            "reconciles_until_ready": reconciled,
            # CPU seconds by process from the apply until the last Deployment was seen: what
            # the operator's path costs the machine beside the floor's.
            "cpu_until_last_deployment": growth(cpu_before, watch.cpu_at_last),
            "floor_cpu_until_last_deployment": straight["cpu_until_last_deployment"],
            "api_requests_until_ready": requests,
            "models_alone_api_requests": straight["models_alone_requests"],
            "all_ready_s": round(all_ready, 1),
            "idle_writes_per_minute": round(sum(idle.values()) * 60 / idle_seconds, 1),
            "idle_writes_by_kind": idle,
            "operator_peak_rss_mib": rss,
            "operator_cpu_seconds": cpu,
            "mean_latency_s": round(statistics.fmean(latencies), 3) if latencies else None,
        }
    finally:
        operator.stop()
        cluster.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument(
        "--profile", type=Path, metavar="FILE",
        help="record the operator with py-spy from the apply until all are Ready (collapsed stacks)",
    )  # fmt: skip
    args = parser.parse_args()
    exit_on_signals()
    result = run(args.models, args.idle_seconds, args.profile)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
    return 0 if result["ready"] == args.models else 1


if __name__ == "__main__":
    sys.exit(main())
