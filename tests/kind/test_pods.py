"""Pods that really run: the operator in-cluster from its image and chart, the CPU server image
behind its Service, on a kind node. The tests share one VLLMModel and run in file order: each
leaves the model Ready for the next.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import yaml

from devtools.cluster import condition, table_row, wait_until
from devtools.kind import images, stack
from devtools.kind.cluster import KindCluster
from devtools.paths import REPO_ROOT
from tests.kind.conftest import NAMESPACE

NAME = "tiny"
SERVICE_URL = f"http://{NAME}.{NAMESPACE}.svc:8000/v1"
READY_TIMEOUT = 600.0


def manifest() -> dict[str, Any]:
    """examples/tiny-cpu.yaml in the test namespace, with LoRA on (no adapter yet)."""
    model = yaml.safe_load((REPO_ROOT / "examples" / "tiny-cpu.yaml").read_text())
    model["metadata"]["namespace"] = NAMESPACE
    model["spec"]["lora"] = {"maxLoras": 2, "maxLoraRank": 8}
    return dict(model)


def get_model(cluster: KindCluster) -> dict[str, Any]:
    return dict(cluster.get_json("vllmmodel", NAME, namespace=NAMESPACE))


def server_pods(cluster: KindCluster) -> list[dict[str, Any]]:
    """The model's pods that are not being deleted."""
    pods = cluster.get_json("pods", "-l", f"app.kubernetes.io/instance={NAME}", namespace=NAMESPACE)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def wait_model_ready(cluster: KindCluster, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
    """Ready for the current generation, the rollout over (no old pods left)."""

    def ready() -> bool:
        obj = get_model(cluster)
        status = obj.get("status") or {}
        return (
            status.get("observedGeneration") == obj["metadata"]["generation"]
            and condition(obj, "Ready").get("status") == "True"
            and len(server_pods(cluster)) == obj["spec"]["replicas"]
        )

    try:
        wait_until(ready, f"VLLMModel {NAME} Ready", timeout, interval=2)
    except TimeoutError:
        print(cluster.kubectl("describe", "vllmmodel", NAME, "-n", NAMESPACE).stdout)
        print(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide").stdout)
        raise
    return get_model(cluster)


def pod_metric(cluster: KindCluster, pod: str, family: str) -> float:
    """One counter summed over its series, read from the pod's /metrics through the API server."""
    text = cluster.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}:8000/proxy/metrics", check=True
    ).stdout
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(family + "{") or line.startswith(family + " ")
    ]
    return sum(values)


def pod_models(cluster: KindCluster, pod: str) -> list[str]:
    text = cluster.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}:8000/proxy/v1/models", check=True
    ).stdout
    return [m["id"] for m in json.loads(text)["data"]]


def parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def events_of(cluster: KindCluster, pod: str) -> list[dict[str, Any]]:
    items = cluster.get_json("events", "--field-selector", f"involvedObject.name={pod}", namespace=NAMESPACE)[
        "items"
    ]
    return list(items)


class ClientPod:
    """A pod from the operator image running a command in the cluster (a client of the Service)."""

    def __init__(self, cluster: KindCluster, name: str, command: list[str]) -> None:
        self.cluster, self.name = cluster, name
        cluster.kubectl("delete", "pod", name, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
        cluster.kubectl(
            "run",
            name,
            "-n",
            NAMESPACE,
            "--restart=Never",
            f"--image={images.OPERATOR_IMAGE}",
            "--image-pull-policy=Never",
            "--command",
            "--",
            *command,
            check=True,
        )
        cluster.kubectl(
            "wait",
            "--for=condition=Ready",
            f"pod/{name}",
            "-n",
            NAMESPACE,
            "--timeout=120s",
            check=True,
            timeout=130,
        )

    def finish(self, timeout: float = 120) -> str:
        """Wait for the command to end; its output."""
        wait_until(
            lambda: self.phase() in ("Succeeded", "Failed"), f"pod {self.name} to finish", timeout, interval=1
        )
        logs = self.cluster.kubectl("logs", self.name, "-n", NAMESPACE, check=True).stdout
        assert self.phase() == "Succeeded", logs
        return logs

    def phase(self) -> str:
        pod = self.cluster.get_json("pod", self.name, namespace=NAMESPACE, check=False) or {}
        return str((pod.get("status") or {}).get("phase", ""))

    def delete(self) -> None:
        self.cluster.kubectl(
            "delete", "pod", self.name, "-n", NAMESPACE, "--ignore-not-found", "--wait=false"
        )


# Sends a small chat completion every 0.1 s or so through the Service until /tmp/stop exists;
# no retries, so every failed attempt counts. Prints {"ok", "failed", "errors"}.
STEADY_CLIENT = """
import json, os, sys, time, httpx
url, model = sys.argv[1], sys.argv[2]
headers = {"Authorization": "Bearer " + sys.argv[3]} if len(sys.argv) > 3 else {}
ok, errors, retried = 0, [], []
# Like the OpenAI SDK (2 retries by default), a connection that breaks before an answer is
# tried once more: a pooled keep-alive connection to a pod that closes it as it stops can
# break under a request sent at that moment (CI saw one reset in 239 requests).
LOST = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
with httpx.Client(timeout=30, headers=headers) as http:
    while not os.path.exists("/tmp/stop"):
        for attempt in (1, 2):
            try:
                r = http.post(url + "/chat/completions", json={"model": model, "max_tokens": 8,
                              "messages": [{"role": "user", "content": "hi"}]})
            except LOST as error:
                if attempt == 1:
                    retried.append(repr(error)[:200])
                    continue
                errors.append(repr(error)[:200])
            except httpx.HTTPError as error:
                errors.append(repr(error)[:200])
            else:
                if r.status_code == 200:
                    ok += 1
                else:
                    errors.append(f"HTTP {r.status_code}: {r.text[:120]}")
            break
        time.sleep(0.1)
print(json.dumps({"ok": ok, "failed": len(errors), "errors": errors[:20], "retried": retried[:20]}),
      flush=True)
"""


@pytest.fixture(scope="module")
def model(kind_env: KindCluster) -> Iterator[KindCluster]:
    kind_env.apply(manifest())
    yield kind_env
    kind_env.kubectl("delete", "vllmmodel", NAME, "-n", NAMESPACE, "--ignore-not-found", "--wait=false")


def test_pods_start_through_the_startup_probe_and_the_service_streams(model: KindCluster) -> None:
    cluster = model
    obj = wait_model_ready(cluster)
    assert obj["status"]["phase"] == "Ready"
    pods = server_pods(cluster)
    for pod in pods:
        name = pod["metadata"]["name"]
        (status,) = pod["status"]["containerStatuses"]
        assert status["restartCount"] == 0, f"{name} was restarted during its load"
        started = parse_time(status["state"]["running"]["startedAt"])
        ready_at = parse_time(condition(pod, "Ready")["lastTransitionTime"])
        events = events_of(cluster, name)
        startup_failures = [
            e for e in events if e["reason"] == "Unhealthy" and "Startup probe" in e["message"]
        ]
        killed = [e for e in events if e["reason"] == "Killing"]
        # The engine loads for longer than one probe period: the startup probe failed at least
        # once, nothing was killed, and the pod became Ready only after it passed.
        assert startup_failures, f"{name}: no failed startup probe (events: {[e['message'] for e in events]})"
        assert not killed, killed
        last_failure = max(parse_time(e.get("lastTimestamp") or e["eventTime"]) for e in startup_failures)
        assert ready_at >= last_failure, (name, ready_at, last_failure)
        print(
            f"{name}: container start to Ready {(ready_at - started).total_seconds():.0f}s, "
            f"{sum(e.get('count', 1) for e in startup_failures)} failed startup probes"
        )
    assert obj["status"]["endpoint"] == SERVICE_URL.replace(f"{NAMESPACE}.svc", f"{NAMESPACE}.svc")

    text, timing = stack.stream_in_cluster(cluster, SERVICE_URL, NAME, NAMESPACE)
    print(f"in-cluster stream from {SERVICE_URL}: {timing}")
    stack.assert_streamed(timing)
    assert text.strip()


def test_status_throughput_matches_the_servers_counters(model: KindCluster) -> None:
    cluster = model
    wait_model_ready(cluster)
    pods = [p["metadata"]["name"] for p in server_pods(cluster)]
    load = ClientPod(
        cluster,
        "load",
        [
            "vllm-operator",
            "bench",
            "load",
            "--base-url",
            SERVICE_URL,
            "--requests",
            "100000",
            "--concurrency",
            "8",
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--no-progress",
        ],
    )
    try:
        time.sleep(15)  # warm up: every status window below is under load

        def scraped() -> tuple[str, float]:
            metrics = get_model(cluster)["status"].get("metrics") or {}
            return metrics.get("scrapedAt", ""), float(metrics.get("generationTokensPerSecond", 0))

        def next_window(after: str) -> tuple[str, float]:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                stamp, value = scraped()
                if stamp and stamp != after:
                    return stamp, value
                time.sleep(0.1)
            raise TimeoutError("the operator stopped writing scrapes")

        def counters() -> float:
            return sum(pod_metric(cluster, pod, "vllm:generation_tokens_total") for pod in pods)

        stamp, _ = next_window(scraped()[0])
        before, started = counters(), time.monotonic()
        readings: dict[str, float] = {}
        while len(readings) < 8:
            stamp, value = next_window(stamp)
            readings[stamp] = value
        truth = (counters() - before) / (time.monotonic() - started)
    finally:
        load.delete()
    reported = statistics.fmean(readings.values())
    print(
        f"servers' counters {truth:.1f} tok/s; status (mean of {len(readings)} scrapes) {reported:.1f} tok/s"
    )
    assert truth > 10
    assert abs(reported - truth) / truth < 0.15, (reported, truth, readings)
    table = cluster.kubectl("get", "vllm", NAME, "-n", NAMESPACE, check=True).stdout
    assert float(table_row(table)["TOKENS/S"]) > 0, table


def test_a_lora_adapter_from_a_pvc_is_served_without_a_restart(model: KindCluster) -> None:
    cluster = model
    wait_model_ready(cluster)
    before = {
        p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
        for p in server_pods(cluster)
    }
    patch = {"spec": {"lora": {"adapters": [{"name": "tiny-lora", "source": "pvc://model-store/tiny-lora"}]}}}
    started = time.monotonic()
    cluster.kubectl(
        "patch", "vllmmodel", NAME, "-n", NAMESPACE, "--type=merge", "-p", json.dumps(patch), check=True
    )

    def served() -> bool:
        adapters = get_model(cluster).get("status", {}).get("loraAdapters") or []
        return any(a["name"] == "tiny-lora" and a.get("readyPods") == len(before) for a in adapters)

    wait_until(served, "status.loraAdapters to report tiny-lora on every pod", 120, interval=1)
    print(
        f"adapter in the status as served by {len(before)} pods "
        f"{time.monotonic() - started:.1f}s after the change"
    )
    after = {
        p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
        for p in server_pods(cluster)
    }
    assert after == before, "the pods were replaced or restarted"
    for pod in before:
        assert "tiny-lora" in pod_models(cluster, pod)
    assert condition(get_model(cluster), "AdaptersReady").get("status") == "True"
    _text, timing = stack.stream_in_cluster(cluster, SERVICE_URL, "tiny-lora", NAMESPACE, name="lora-check")
    stack.assert_streamed(timing)


def test_the_router_in_the_cluster_streams_by_name_and_by_adapter(model: KindCluster) -> None:
    """The chart's router (its own pod, from the operator image) in front of the real pods."""
    cluster = model
    wait_model_ready(cluster)
    pods = len(server_pods(cluster))

    def routed() -> bool:
        routing = get_model(cluster).get("status", {}).get("routing") or {}
        return routing.get("readyEndpoints") == pods

    wait_until(routed, "status.routing: every pod behind the router", 60, interval=1)
    for name, check in ((NAME, "router-check"), ("tiny-lora", "router-lora-check")):
        text, timing = stack.stream_in_cluster(cluster, stack.ROUTER_URL, name, NAMESPACE, name=check)
        print(f"via the router, {name}: {text!r} {timing}")
        stack.assert_streamed(timing)


def roll(cluster: KindCluster, patch: dict[str, Any], api_key: str | None = None) -> dict[str, Any]:
    """Apply a spec change that rolls the pods while a client keeps sending; its tally."""
    old = {p["metadata"]["name"] for p in server_pods(cluster)}
    client = ClientPod(
        cluster, "steady", ["python", "-c", STEADY_CLIENT, SERVICE_URL, NAME, *([api_key] if api_key else [])]
    )
    try:
        time.sleep(3)
        started = time.monotonic()
        cluster.kubectl(
            "patch", "vllmmodel", NAME, "-n", NAMESPACE, "--type=merge", "-p", json.dumps(patch), check=True
        )
        wait_until(
            lambda: not old & {p["metadata"]["name"] for p in server_pods(cluster)},
            "the old pods to be replaced",
            READY_TIMEOUT,
            interval=2,
        )
        wait_model_ready(cluster)
        seconds = time.monotonic() - started
        time.sleep(3)
        cluster.kubectl("exec", "steady", "-n", NAMESPACE, "--", "touch", "/tmp/stop", check=True)
        tally = dict(json.loads(client.finish().strip().splitlines()[-1]))
    finally:
        client.delete()
    tally["roll_seconds"] = round(seconds, 1)
    print(f"roll: {tally}")
    return tally


def test_a_spec_change_rolls_the_pods_while_a_client_keeps_sending(model: KindCluster) -> None:
    cluster = model
    wait_model_ready(cluster)
    tally = roll(cluster, {"spec": {"maxModelLen": 384}})
    args = server_pods(cluster)[0]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-model-len") + 1] == "384"
    assert tally["ok"] > 20, tally
    assert tally["failed"] == 0, tally


def test_an_api_key_secret_refuses_requests_without_the_key(model: KindCluster) -> None:
    cluster = model
    wait_model_ready(cluster)
    key = "kind-test-key-0123456789"
    cluster.kubectl(
        "create", "secret", "generic", "tiny-key", "-n", NAMESPACE, f"--from-literal=key={key}", check=True
    )
    cluster.kubectl(
        "patch",
        "vllmmodel",
        NAME,
        "-n",
        NAMESPACE,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"apiKeySecretRef": {"name": "tiny-key", "key": "key"}}}),
        check=True,
    )
    wait_until(
        lambda: all("VLLM_API_KEY" in json.dumps(p["spec"]) for p in server_pods(cluster)),
        "pods with the key",
        READY_TIMEOUT,
        interval=2,
    )
    wait_model_ready(cluster)
    with pytest.raises(RuntimeError, match=r"401|[Uu]nauthorized"):
        stack.stream_in_cluster(cluster, SERVICE_URL, NAME, NAMESPACE, name="no-key")
    _text, timing = stack.stream_in_cluster(
        cluster, SERVICE_URL, NAME, NAMESPACE, api_key=key, name="with-key"
    )
    stack.assert_streamed(timing)
    # The in-cluster operator calls the keyed pods with its admin token (it never reads the key)
    # and still verifies the adapters.
    wait_until(
        lambda: condition(get_model(cluster), "AdaptersReady").get("status") == "True",
        "AdaptersReady with the key",
        60,
        interval=1,
    )
    seen = (
        json.dumps(get_model(cluster))
        + cluster.kubectl("logs", "-n", stack.OPERATOR_NAMESPACE, f"deploy/{stack.RELEASE}").stdout
    )
    assert key not in seen


def test_a_killed_server_shows_in_degraded_by_name_then_recovers(model: KindCluster) -> None:
    cluster = model
    wait_model_ready(cluster)
    victim = sorted(server_pods(cluster), key=lambda p: p["metadata"]["name"])[0]
    name = victim["metadata"]["name"]
    container = victim["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    cluster.node_exec("ctr", "-n", "k8s.io", "tasks", "kill", "--all", "--signal", "SIGKILL", container)

    def degraded_names_victim() -> bool:
        degraded = condition(get_model(cluster), "Degraded")
        return degraded.get("status") == "True" and name in degraded.get("message", "")

    wait_until(degraded_names_victim, f"Degraded to name {name}", 120, interval=0.5)
    print("Degraded:", condition(get_model(cluster), "Degraded")["message"])
    wait_model_ready(cluster)
    assert condition(get_model(cluster), "Degraded").get("status") == "False"
    pod = cluster.get_json("pod", name, namespace=NAMESPACE)
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 1


def test_sigterm_during_a_stream_lets_the_stream_finish(model: KindCluster) -> None:
    cluster = model
    wait_model_ready(cluster)
    pod = server_pods(cluster)[0]
    victim = pod["metadata"]["name"]
    container = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    key = "kind-test-key-0123456789"
    chunks: list[str] = []
    finish: list[str | None] = []
    errors: list[BaseException] = []
    with stack.port_forward(cluster, f"pod/{victim}", NAMESPACE) as base_url:

        def stream() -> None:
            try:
                body = {
                    "model": NAME,
                    "max_tokens": 300,
                    "ignore_eos": True,
                    "stream": True,
                    "messages": [{"role": "user", "content": "count"}],
                }
                with httpx.stream(
                    "POST",
                    f"{base_url}/v1/chat/completions",
                    json=body,
                    timeout=120,
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            choice = json.loads(line[6:])["choices"][0]
                            chunks.append(choice["delta"].get("content") or "")
                            if choice.get("finish_reason"):
                                finish.append(choice["finish_reason"])
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=stream)
        thread.start()
        wait_until(lambda: len(chunks) >= 5 or bool(errors), "the stream to start", 60, interval=0.05)
        # SIGTERM to the server process itself, as the kubelet sends it after the preStop
        # pause (deleting the pod would pause first, and this short stream would end before).
        signalled = time.monotonic()
        cluster.node_exec("ctr", "-n", "k8s.io", "tasks", "kill", "--signal", "SIGTERM", container)
        thread.join(150)
    assert not errors, errors
    assert finish == ["length"], (finish, len(chunks))
    print(f"stream finished {time.monotonic() - signalled:.1f}s after SIGTERM with {len(chunks)} chunks")

    def server_status() -> dict[str, Any]:
        return dict(cluster.get_json("pod", victim, namespace=NAMESPACE)["status"]["containerStatuses"][0])

    wait_until(
        lambda: server_status()["restartCount"] > restarts,
        f"{victim}'s server to stop and restart",
        120,
        interval=1,
    )
    assert server_status()["lastState"]["terminated"]["exitCode"] == 0, server_status()  # a clean stop
    wait_model_ready(cluster)
