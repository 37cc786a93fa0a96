"""The router against the local cluster: VLLMModels and their kwok pods, watched for real, with
fake vLLM pods answering at the pods' loopback IPs (devtools/fakepod.py).

The operator scrapes those pods every 2 s, loads adapters where a pod accepts them, and writes
each pod's verified adapters to the status; the router routes by what the status says.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from devtools.cluster import LocalCluster, condition, wait_until
from devtools.fakepod import FakePod, FakePods
from devtools.operator_process import OperatorProcess
from devtools.router_process import RouterProcess

pytestmark = [pytest.mark.cluster]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def namespace(cluster: LocalCluster) -> Iterator[str]:
    name = f"router-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def router(cluster: LocalCluster, namespace: str, tmp_path_factory: pytest.TempPathFactory) -> RouterProcess:
    """The router for the namespace, not started yet (its port is known)."""
    return RouterProcess(
        ["--namespace", namespace], cluster.env(), tmp_path_factory.mktemp("router") / "router.log"
    )


@pytest.fixture(scope="module")
def scraping_operator(
    operator: OperatorProcess, cluster: LocalCluster, router: RouterProcess
) -> Iterator[OperatorProcess]:
    """The session's operator, swapped for one that scrapes every 2 s and reads the router."""
    operator.stop()
    env = {"VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS": "2", "VLLM_OPERATOR_ROUTER_URL": router.url}
    scraper = OperatorProcess(cluster, "router-operator.log", env=env)
    scraper.start()
    yield scraper
    scraper.stop()
    operator.start()


def vllm_model(name: str, replicas: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "serving.vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name},
        "spec": {"model": f"/models/{name}", "replicas": replicas, **spec},
    }


def ready_pods(cluster: LocalCluster, namespace: str, model: str) -> dict[str, str]:
    listing = cluster.get_json(
        "pods", "-l", f"app.kubernetes.io/instance={model}", namespace=namespace, check=False
    )
    items = (listing or {}).get("items", [])
    return {
        p["metadata"]["name"]: p["status"].get("podIP", "")
        for p in items
        if condition(p, "Ready").get("status") == "True" and p["status"].get("podIP")
    }


def wait_pods(cluster: LocalCluster, namespace: str, model: str, count: int) -> dict[str, str]:
    pods: dict[str, str] = {}

    def enough() -> bool:
        pods.clear()
        pods.update(ready_pods(cluster, namespace, model))
        return len(pods) == count

    wait_until(enough, f"{count} ready pods of {model}", timeout=120, interval=0.5)
    assert all(ip.startswith("127.") for ip in pods.values()), pods
    return pods


def chat(client: httpx.Client, model: str) -> httpx.Response:
    return client.post(CHAT, json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_router_follows_models_pods_and_verified_adapters(
    scraping_operator: OperatorProcess, cluster: LocalCluster, namespace: str, router: RouterProcess
) -> None:
    alpha = vllm_model(
        "alpha",
        2,
        lora={"maxLoraRank": 8, "adapters": [{"name": "sql", "source": "/lora/sql"}]},
        routing={"aliases": ["alpha-latest"]},
    )
    cluster.apply(alpha, namespace=namespace)
    cluster.apply(vllm_model("beta", 0), namespace=namespace)
    alpha_pods = wait_pods(cluster, namespace, "alpha", 2)
    (name_a, ip_a), (name_b, ip_b) = sorted(alpha_pods.items())
    a, b = FakePod(name_a, served="alpha"), FakePod(name_b, served="alpha", refuse_loads=True)
    with FakePods() as fakes:
        fakes.add(a, ip_a, 8000)
        fakes.add(b, ip_b, 8000)
        with router, httpx.Client(base_url=router.url, timeout=10) as client:
            # Known models are listed at once, ready or not; a model at zero is 503, not 404.
            listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
            assert listed == {"alpha", "alpha-latest", "sql", "beta"}
            assert chat(client, "beta").status_code == 503
            assert chat(client, "gamma").status_code == 404

            answered = {chat(client, "alpha").json()["pod"] for _ in range(10)}
            assert answered == {name_a, name_b}
            assert chat(client, "alpha-latest").json()["model"] == "alpha"

            # The adapter: the operator loads it on a (b refuses), verifies it, and writes it to
            # the status per pod; only then, and only to a, does the router send it.
            def sql_verified() -> bool:
                status = cluster.get_json("vllmmodel", "alpha", namespace=namespace, check=False) or {}
                pods = {
                    p["name"]: p.get("loraAdapters", []) for p in status.get("status", {}).get("pods", [])
                }
                return "sql" in pods.get(name_a, []) and "sql" not in pods.get(name_b, [])

            wait_until(sql_verified, "sql verified on pod a only", timeout=60, interval=0.5)
            wait_until(lambda: chat(client, "sql").status_code == 200, "the router routes sql", timeout=10)
            assert {chat(client, "sql").json()["pod"] for _ in range(10)} == {name_a}

            # The operator reads the router's view of each model into its status.
            def routing(model: str) -> Any:
                obj = cluster.get_json("vllmmodel", model, namespace=namespace, check=False) or {}
                return obj.get("status", {}).get("routing")

            wait_until(
                lambda: routing("alpha") == {"endpoints": 2, "readyEndpoints": 2, "inFlight": 0},
                "status.routing of alpha",
                timeout=30,
            )
            assert routing("beta") == {"endpoints": 0, "readyEndpoints": 0, "inFlight": 0}

            # A pod that drops a request before answering costs a retry, not an error.
            a.faults.append("drop")
            b.faults.append("drop")
            assert all(chat(client, "alpha").status_code == 200 for _ in range(4))
            assert not a.faults or not b.faults

            # beta scaled up: its pod is routed to once it is Ready, found by the watch.
            cluster.kubectl(
                "patch", "vllmmodel", "beta", "-n", namespace, "--type=merge", "-p",
                json.dumps({"spec": {"replicas": 1}}), check=True,
            )  # fmt: skip
            ((beta_name, beta_ip),) = wait_pods(cluster, namespace, "beta", 1).items()
            fakes.add(FakePod(beta_name, served="beta"), beta_ip, 8000)
            wait_until(
                lambda: chat(client, "beta").status_code == 200, "beta answers via the router", timeout=20
            )
            assert chat(client, "beta").json()["pod"] == beta_name

            # A deleted model is gone from the router: 404 and no longer listed.
            cluster.kubectl("delete", "vllmmodel", "alpha", "-n", namespace, "--wait=false", check=True)
            wait_until(lambda: chat(client, "alpha").status_code == 404, "alpha gone", timeout=20)
            assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"beta"}
            demand = client.get("/router/demand").json()["models"]
            assert demand["beta"]["readyPods"] == 1 and demand["beta"]["resource"] == "beta"
            wait_until(lambda: (routing("beta") or {}).get("readyEndpoints") == 1, "beta routed", timeout=30)


def test_adapters_hot_loaded_and_removed_are_never_misrouted(
    scraping_operator: OperatorProcess, cluster: LocalCluster, namespace: str, router: RouterProcess
) -> None:
    """An adapter added and removed three times under steady load: no request for it ever
    reaches a pod that does not serve it (a pod would answer 404). While it is in the spec and
    not yet verified the router answers 503; once removed, 404 (an unknown name)."""
    cluster.apply(vllm_model("churn", 2, lora={"maxLoraRank": 8, "adapters": []}), namespace=namespace)
    (name_a, ip_a), (name_b, ip_b) = sorted(wait_pods(cluster, namespace, "churn", 2).items())
    a, b = FakePod(name_a, served="churn"), FakePod(name_b, served="churn")
    codes: dict[int, int] = {}
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=router.url, timeout=10) as client:
            while not stop.is_set():
                status = chat(client, "hot").status_code
                codes[status] = codes.get(status, 0) + 1
                assert chat(client, "churn").status_code == 200

    def set_adapters(adapters: list[dict[str, str]]) -> None:
        patch = {"spec": {"lora": {"maxLoraRank": 8, "adapters": adapters}}}
        cluster.kubectl(
            "patch",
            "vllmmodel",
            "churn",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps(patch),
            check=True,
        )

    with FakePods() as fakes:
        fakes.add(a, ip_a, 8000)
        fakes.add(b, ip_b, 8000)
        with router, ThreadPoolExecutor(4) as pool, httpx.Client(base_url=router.url, timeout=10) as probe:
            loads = [pool.submit(load) for _ in range(4)]
            try:
                for _ in range(3):
                    set_adapters([{"name": "hot", "source": "/lora/hot"}])
                    wait_until(lambda: chat(probe, "hot").status_code == 200, "hot routed", timeout=30)
                    time.sleep(6)
                    set_adapters([])
                    wait_until(lambda: chat(probe, "hot").status_code == 404, "hot gone", timeout=30)
                    time.sleep(3)
            finally:
                stop.set()
                for future in loads:
                    future.result()
    print(f"answers for the adapter: {codes}; pod a saw {len(a.seen)}, pod b {len(b.seen)} requests")
    assert a.misrouted == [] and b.misrouted == []
    assert codes.get(200, 0) > 50 and set(codes) <= {200, 404, 503}, codes
