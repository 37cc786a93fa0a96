"""The project on a kind cluster: images loaded, the operator installed by its Helm chart, the
tiny model on a volume; plus the in-cluster and port-forward clients the demo and the kind
tests use. Shared by `make demo` (devtools/demo.py) and tests/kind.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devtools.cluster import kubectl_binary, wait_until
from devtools.kind import images
from devtools.kind.cluster import KindCluster
from devtools.paths import REPO_ROOT
from devtools.processes import free_port

OPERATOR_NAMESPACE = "vllm-operator"
RELEASE = "vllm-operator"
CHART = REPO_ROOT / "charts" / "vllm-operator"
ROUTER = f"{RELEASE}-router"
ROUTER_URL = f"http://{ROUTER}.{OPERATOR_NAMESPACE}.svc:8000/v1"
"""The router the chart installs: one OpenAI endpoint for every model in the cluster."""


def install_operator(cluster: KindCluster, scrape_interval: int = 5, timeout: float = 300) -> None:
    """`helm install` the chart with the images built here; waits for the operator pod."""
    repository, tag = images.OPERATOR_IMAGE.rsplit(":", 1)
    values = {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "settings.serverImage": images.SERVER_CPU_IMAGE,
        "settings.imagePullPolicy": "Never",
        "settings.scrapeIntervalSeconds": str(scrape_interval),
    }
    args = [f"--set={key}={value}" for key, value in values.items()]
    cluster.helm(
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--wait",
        f"--timeout={int(timeout)}s",
        *args,
        check=True,
        timeout=timeout + 30,
    )


def operator_pod(cluster: KindCluster) -> dict[str, Any]:
    """The running operator pod (the chart runs one replica)."""
    pods = cluster.get_json(
        "pods", "-l", f"app.kubernetes.io/instance={RELEASE}", namespace=OPERATOR_NAMESPACE
    )["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    if not running:
        raise RuntimeError(f"no running operator pod in {OPERATOR_NAMESPACE}")
    return dict(running[0])


def prepare(cluster: KindCluster, models: dict[str, Path], namespace: str) -> dict[str, float]:
    """Everything between `kind create cluster` and `kubectl apply` of a model; seconds per step."""
    figures: dict[str, float] = {}
    started = time.monotonic()
    cluster.wait_ready()
    figures["node ready"] = round(time.monotonic() - started, 1)
    cluster.add_fake_gpus()
    for image in (images.OPERATOR_IMAGE, images.SERVER_CPU_IMAGE):
        step = time.monotonic()
        loaded = cluster.load_image(image)
        figures[f"load {image.rsplit('/', 1)[1]}"] = round(time.monotonic() - step, 1)
        if loaded and image == images.OPERATOR_IMAGE:
            # A new image under the same tag: a running operator pod keeps the old one.
            for deployment in (RELEASE, ROUTER):
                cluster.kubectl("rollout", "restart", f"deployment/{deployment}", "-n", OPERATOR_NAMESPACE)
    cluster.install_models(models, namespace)
    step = time.monotonic()
    install_operator(cluster)
    figures["helm install"] = round(time.monotonic() - step, 1)
    return figures


STREAM_SCRIPT = """
import json, sys, time
from vllm_operator_client.sync_client import Client
url, model, key = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
started = time.monotonic()
first = None
chunks = 0
text = []
with Client(url, api_key=key, model=model, max_retries=0) as client:
    with client.chat_stream([{"role": "user", "content": "Say hello to the cluster."}],
                            max_tokens=128, ignore_eos=True) as stream:
        for chunk in stream:
            if chunk.text:
                first = first if first is not None else time.monotonic() - started
                chunks += 1
                text.append(chunk.text)
                print(chunk.text, end="", flush=True)
print()
total = time.monotonic() - started
print(json.dumps({"chunks": chunks, "ttft_s": round(first or 0, 3), "total_s": round(total, 3)}))
"""


def stream_in_cluster(
    cluster: KindCluster,
    url: str,
    model: str,
    namespace: str,
    api_key: str | None = None,
    name: str = "stream-check",
) -> tuple[str, dict[str, Any]]:
    """A pod in the cluster (the operator image) streams a chat completion from `url`;
    (streamed text, {"chunks", "ttft_s", "total_s"})."""
    cluster.kubectl("delete", "pod", name, "-n", namespace, "--ignore-not-found", "--wait=true")
    args = [url, model] + ([api_key] if api_key else [])
    proc = cluster.kubectl(
        "run",
        name,
        "-n",
        namespace,
        "--rm",
        "-i",
        "--restart=Never",
        "--quiet",
        f"--image={images.OPERATOR_IMAGE}",
        "--image-pull-policy=Never",
        "--command",
        "--",
        "python",
        "-c",
        STREAM_SCRIPT,
        *args,
        timeout=240,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"in-cluster stream from {url} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    lines = proc.stdout.strip().splitlines()
    return "\n".join(lines[:-1]), json.loads(lines[-1])


def assert_streamed(timing: dict[str, Any]) -> None:
    """The answer came as a stream of chunks, not one buffered body.

    Not one chunk per token: vLLM merges the deltas of a request its consumer has not taken
    yet, and on 2 cores the engine processes starve the API process. CI saw 11 text chunks
    for 24 tokens, all within 1 ms, after a LoRA request's 3 s first token, and once (on
    d1b656d) all 24 in one chunk: answers are 128 tokens since, a longer time to starve through."""
    assert timing["chunks"] >= 2, f"one chunk: the answer was not streamed ({timing})"


@contextmanager
def port_forward(cluster: KindCluster, target: str, namespace: str, remote_port: int = 8000) -> Iterator[str]:
    """`kubectl port-forward` to a Service or pod on a free loopback port; yields the base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            kubectl_binary(),
            "port-forward",
            "-n",
            namespace,
            "--address=127.0.0.1",
            target,
            f"{port}:{remote_port}",
        ],
        env=cluster.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"port-forward {target} exited: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, f"port-forward to {target}", 30, interval=0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def model_status(cluster: KindCluster, name: str, namespace: str) -> dict[str, Any]:
    obj = cluster.get_json("vllmmodel", name, namespace=namespace)
    return dict(obj.get("status") or {})
