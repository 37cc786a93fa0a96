"""`make demo`: the operator on a kind cluster whose pods really run, end to end.

up: the kind cluster (node image assembled here), the operator and CPU server images built
or reused and loaded, the operator installed by `helm install`, examples/tiny-cpu.yaml
applied, `kubectl wait --for=condition=Ready`, then a pod in the cluster streams a chat
completion from the Service's DNS name, `vllm-operator bench load` drives the Service from
the host through a port-forward, and `kubectl get vllm` shows the throughput the in-cluster
operator scraped. down: the cluster and everything it changed on the machine, gone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devtools import toolchain
from devtools.cluster import DEFAULT_ROOT, wait_until
from devtools.kind import cluster as kind_cluster
from devtools.kind import engine as kind_engine
from devtools.kind import images, stack
from devtools.paths import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "tiny-cpu.yaml"
MODELS_DIR = DEFAULT_ROOT / "models"
KUBECONFIG = DEFAULT_ROOT / "kubeconfig"


def say(message: str) -> None:
    print(f"== {message}", flush=True)


def tiny_models() -> dict[str, Path]:
    """The generated tiny model and LoRA adapter, made once under .local/models."""
    from devtools.tinymodel import build_tiny_lora, build_tiny_model

    model, lora = MODELS_DIR / "tiny", MODELS_DIR / "tiny-lora"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    if not (lora / "adapter_config.json").exists():
        build_tiny_lora(model, lora)
    return {"tiny": model, "tiny-lora": lora}


def up(timeout: int) -> int:
    started = time.monotonic()
    engine = kind_engine.detect()
    say(f"tools: kind, kubelet/kubeadm/kube-proxy, CoreDNS (cached under {toolchain.cache_root()})")
    toolchain.ensure_all(toolchain.ALL_COMPONENTS)
    say(f"images ({engine.name}): node {images.NODE_IMAGE}, operator, CPU server")
    images.ensure_node_image(engine)
    built = images.ensure_project_images(engine)
    if kind_cluster.DEMO_CLUSTER in kind_cluster.our_clusters(engine):
        say(f"reusing kind cluster {kind_cluster.DEMO_CLUSTER}")
        cluster = kind_cluster.KindCluster(engine, kind_cluster.DEMO_CLUSTER, KUBECONFIG, DEFAULT_ROOT)
        kind_cluster.kind(
            engine, "export", "kubeconfig", "--name", cluster.name, "--kubeconfig", str(KUBECONFIG)
        )
    else:
        say(f"kind create cluster --name {kind_cluster.DEMO_CLUSTER} --image {images.NODE_IMAGE}")
        step = time.monotonic()
        cluster = kind_cluster.create(engine, kind_cluster.DEMO_CLUSTER, KUBECONFIG, DEFAULT_ROOT)
        print(f"   created in {time.monotonic() - step:.0f}s")
    say("node Ready, fake GPUs, images loaded, tiny model on pvc://model-store, helm install")
    figures = stack.prepare(cluster, tiny_models(), "default")
    print("   " + ", ".join(f"{k} {v}s" for k, v in figures.items()))
    say(f"kubectl apply -f {EXAMPLE.relative_to(REPO_ROOT)}")
    print(cluster.kubectl("apply", "-f", str(EXAMPLE), check=True).stdout.strip())
    say("kubectl wait --for=condition=Ready vllmmodel/tiny")
    step = time.monotonic()
    waited = cluster.kubectl(
        "wait",
        "--for=condition=Ready",
        "vllmmodel/tiny",
        "-n",
        "default",
        f"--timeout={timeout}s",
        timeout=timeout + 10,
    )
    print((waited.stdout + waited.stderr).strip() + f"   ({time.monotonic() - step:.0f}s)")
    if waited.returncode != 0:
        print(cluster.kubectl("describe", "vllmmodel/tiny", "-n", "default").stdout)
        return 1
    url = "http://tiny.default.svc:8000/v1"
    say(f"a pod in the cluster streams a chat completion from {url}")
    text, timing = stack.stream_in_cluster(cluster, url, "tiny", "default")
    print(f"   {text!r}\n   {json.dumps(timing)}")
    say(f"the same through the router, one endpoint for every model: {stack.ROUTER_URL}")
    text, timing = stack.stream_in_cluster(cluster, stack.ROUTER_URL, "tiny", "default", name="router-check")
    print(f"   {text!r}\n   {json.dumps(timing)}")
    say("vllm-operator bench load from the host, through kubectl port-forward svc/tiny")
    with stack.port_forward(cluster, "svc/tiny", "default") as base_url:
        bench = subprocess.run(
            [
                str(Path(sys.executable).parent / "vllm-operator"),
                "bench",
                "load",
                "--base-url",
                base_url,
                "--requests",
                "64",
                "--concurrency",
                "8",
                "--max-tokens",
                "64",
                "--ignore-eos",
                "--no-progress",
            ],
            text=True,
            capture_output=True,
            check=False,
            timeout=600,
        )
    print(bench.stdout + bench.stderr)
    if bench.returncode != 0:
        return 1
    say("kubectl get vllm (TOKENS/S from the operator's scrape of every pod)")
    wait_until(
        lambda: bool(
            (stack.model_status(cluster, "tiny", "default").get("metrics") or {}).get(
                "generationTokensPerSecond"
            )
        ),
        "a throughput in the status",
        60,
        interval=2,
    )
    print(cluster.kubectl("get", "vllm", "-n", "default", check=True).stdout)
    print(cluster.kubectl("get", "pods,svc", "-n", "default", "-o", "wide", check=True).stdout)
    scale_to_zero_and_back(cluster)
    say(
        f"demo up in {time.monotonic() - started:.0f}s "
        f"(image builds: {', '.join(f'{k} {v:.0f}s' for k, v in built.items())})"
    )
    print(f"""
Look around:
  export KUBECONFIG={KUBECONFIG}
  kubectl get vllm -A                      # READY, TOKENS/S, ADAPTERS
  kubectl describe vllmmodel tiny          # conditions and events
  kubectl logs -n {stack.OPERATOR_NAMESPACE} deploy/{stack.RELEASE}   # the operator, in-cluster
  kubectl port-forward svc/tiny 8000:8000  # then: vllm-operator bench check --base-url http://127.0.0.1:8000
  kubectl port-forward -n {stack.OPERATOR_NAMESPACE} svc/{stack.ROUTER} 8001:8000  # the router
  curl http://127.0.0.1:8001/v1/models     # every model behind it
`make demo-down` deletes the cluster and puts the machine back as it was.""")
    return 0


IDLE_SECONDS = 20


def scale_to_zero_and_back(cluster: kind_cluster.KindCluster) -> None:
    """Autoscaling with minReplicas 0: idle -> 0, a request through the router -> 1, idle -> 0."""
    autoscaling = {
        "minReplicas": 0,
        "maxReplicas": 1,
        "idleSeconds": IDLE_SECONDS,
        "scaleDownDelaySeconds": 0,
    }
    say(f"autoscaling with minReplicas 0: idle for {IDLE_SECONDS}s, tiny goes to zero")
    patch = json.dumps({"spec": {"autoscaling": autoscaling}})
    cluster.kubectl("patch", "vllmmodel", "tiny", "-n", "default", "--type=merge", "-p", patch, check=True)
    step = time.monotonic()

    def replicas() -> int:
        obj = cluster.get_json("vllmmodel", "tiny", namespace="default")
        return int(obj["spec"].get("replicas", 1))

    wait_until(lambda: replicas() == 0, "tiny at zero", 120, interval=1)
    print(f"   spec.replicas 0 after {time.monotonic() - step:.0f}s")
    print(cluster.kubectl("get", "vllm", "-n", "default", check=True).stdout)
    say("a request through the router wakes it: held while the pod starts, then streamed")
    text, timing = stack.stream_in_cluster(cluster, stack.ROUTER_URL, "tiny", "default", name="wake-check")
    print(f"   {text!r}\n   {json.dumps(timing)}  (time to first token includes the pod's cold start)")
    print(cluster.kubectl("get", "vllm", "-n", "default", check=True).stdout)
    say(f"idle again: back to zero after {IDLE_SECONDS}s")
    step = time.monotonic()
    wait_until(lambda: replicas() == 0, "tiny at zero again", 120, interval=1)
    print(f"   spec.replicas 0 after {time.monotonic() - step:.0f}s")
    decisions = stack.model_status(cluster, "tiny", "default").get("autoscaling", {}).get("decisions", [])
    for decision in decisions:
        change = f"{decision['fromReplicas']} -> {decision['toReplicas']}"
        print(f"   {decision['time']}  {change}  {decision['reason']}")
    events = cluster.kubectl(
        "get", "events", "-n", "default", "--field-selector", "involvedObject.name=tiny,reason=Scaled"
    )
    print(events.stdout)


def down() -> int:
    engine = kind_engine.detect()
    removed = kind_cluster.clean(engine)
    KUBECONFIG.unlink(missing_ok=True)
    print("demo down: " + (", ".join(removed) if removed else "nothing was running"))
    left = kind_cluster.leftovers(engine)
    if left:
        print("LEFT BEHIND:\n  " + "\n  ".join(left), file=sys.stderr)
        return 1
    print(
        "checked: no kind cluster or node container, no kind network, no containerd shim, kubelet or "
        "vLLM process, no NETAVARK/KUBE chains, host sysctls as before"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["up", "down", "check-clean"], nargs="?", default="up")
    parser.add_argument("--timeout", type=int, default=600, help="seconds to wait for Ready")
    args = parser.parse_args(argv)
    if args.command == "down":
        return down()
    if args.command == "check-clean":
        left = kind_cluster.leftovers(kind_engine.detect())
        print("\n".join(left) if left else "clean")
        return 1 if left else 0
    try:
        return up(args.timeout)
    except Exception as error:
        detail = f"\n{error.stderr}" if isinstance(error, subprocess.CalledProcessError) else ""
        print(f"demo FAILED: {error}{detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
