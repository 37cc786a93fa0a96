"""Smoke test: the local control plane behaves as the operator's e2e tests need."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import pytest

from devtools import versions
from devtools.cluster import GPU_RESOURCE, LocalCluster, condition, wait_until

pytestmark = pytest.mark.cluster

# kwok never pulls images; the name only has to be valid.
IMAGE = "registry.invalid/smoke:1"


def gpu_deployment(name: str, gpus: int) -> dict[str, Any]:
    """A one-replica Deployment whose container asks for GPUs."""
    labels = {"app": name}
    container = {"name": "main", "image": IMAGE, "resources": {"limits": {GPU_RESOURCE: str(gpus)}}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def test_server_reports_pinned_version(cluster: LocalCluster) -> None:
    """The API server says the version we built, not v0.0.0."""
    info = json.loads(cluster.kubectl("version", "-o", "json", check=True).stdout)
    assert info["serverVersion"]["gitVersion"] == versions.KUBERNETES


def test_helm_runs(cluster: LocalCluster) -> None:
    """helm runs and reports the pinned version."""
    out = cluster.helm("version", "--short", check=True).stdout
    assert out.startswith(versions.HELM)


def test_helm_installs_a_kube_version_gated_chart(
    cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    """helm accepts a chart with kubeVersion (the server's version is real) and installs it."""
    chart = tmp_path / "smoke"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: smoke\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n"
    )
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\n"
        "data:\n  kube: {{ .Capabilities.KubeVersion.Version | quote }}\n"
    )
    cluster.helm("install", "smoke", str(chart), "-n", namespace, "--wait", check=True)
    got = cluster.get_json("configmap", "smoke", namespace=namespace)
    assert got["data"]["kube"] == versions.KUBERNETES


def test_gpu_deployment_becomes_ready(cluster: LocalCluster, namespace: str) -> None:
    """Deployment -> ReplicaSet -> Pod scheduled on a GPU node, Running, Ready, with an IP."""
    cluster.apply(gpu_deployment("gpu", 1), namespace=namespace)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment/gpu", "--timeout=60s", check=True
    )
    pods = cluster.get_json("pods", "-l", "app=gpu", namespace=namespace)["items"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    assert pod["spec"]["nodeName"].startswith("kwok-gpu-")
    assert pod["status"]["phase"] == "Running"
    assert condition(pod, "Ready")["status"] == "True"
    pod_ip = ipaddress.ip_address(pod["status"]["podIP"])
    assert pod_ip in ipaddress.ip_network(cluster.spec.pod_cidr)
    # kwok stands in for the kubelet on deletion too: scaled-away pods really go away.
    cluster.kubectl("scale", "-n", namespace, "deployment/gpu", "--replicas=0", check=True)
    wait_until(
        lambda: not cluster.get_json("pods", "-l", "app=gpu", namespace=namespace)["items"],
        "pods of the scaled-down Deployment to be deleted",
        timeout=60,
    )


def test_too_many_gpus_stays_pending(cluster: LocalCluster, namespace: str) -> None:
    """A pod asking for more GPUs than any node has is Unschedulable, with an event."""
    cluster.apply(gpu_deployment("huge", 16), namespace=namespace)

    def unschedulable() -> bool:
        pods = cluster.get_json("pods", "-l", "app=huge", namespace=namespace)["items"]
        return bool(pods) and condition(pods[0], "PodScheduled").get("reason") == "Unschedulable"

    wait_until(unschedulable, "PodScheduled=False/Unschedulable", timeout=60)
    pod = cluster.get_json("pods", "-l", "app=huge", namespace=namespace)["items"][0]
    assert pod["status"]["phase"] == "Pending"
    events = cluster.get_json(
        "events", "--field-selector", f"involvedObject.name={pod['metadata']['name']}", namespace=namespace
    )
    assert any(e["reason"] == "FailedScheduling" and GPU_RESOURCE in e["message"] for e in events["items"])


def test_owner_reference_garbage_collection(cluster: LocalCluster, namespace: str) -> None:
    """Deleting an owner deletes its dependants (the garbage collector runs)."""
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}
    cluster.apply(owner, namespace=namespace)
    uid = cluster.get_json("configmap", "owner", namespace=namespace)["metadata"]["uid"]
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "child", "ownerReferences": [owner_ref]},
    }
    cluster.apply(child, namespace=namespace)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, check=True)
    wait_until(
        lambda: cluster.kubectl("get", "configmap", "child", "-n", namespace).returncode != 0,
        "the dependant ConfigMap to be collected",
        timeout=60,
    )


def widget_crd(group: str) -> dict[str, Any]:
    """A namespaced CRD whose schema carries a CEL rule."""
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                "x-kubernetes-validations": [
                    {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                ],
            }
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
            ],
        },
    }


def test_crd_cel_validation(cluster: LocalCluster, namespace: str) -> None:
    """A CEL x-kubernetes-validations rule refuses a bad object and admits a good one."""
    group = f"{namespace}.smoke.example.com"
    cluster.apply(widget_crd(group))
    try:
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s", check=True
        )
        # Discovery can lag behind Established for a moment.
        time.sleep(1)

        def widget(name: str, low: int, high: int) -> str:
            body = {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"min": low, "max": high},
            }
            return json.dumps(body)

        bad = cluster.kubectl("create", "-n", namespace, "-f", "-", input=widget("bad", 5, 1))
        assert bad.returncode != 0
        assert "min must not exceed max" in bad.stderr
        cluster.kubectl("create", "-n", namespace, "-f", "-", input=widget("good", 1, 5), check=True)
    finally:
        cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false")


def test_server_side_apply(cluster: LocalCluster, namespace: str) -> None:
    """kubectl apply --server-side records our field manager and merges a second apply."""
    manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"a": "1"}}
    cluster.apply(manifest, "--server-side", "--field-manager=smoke", namespace=namespace)
    manifest["data"] = {"a": "2"}
    cluster.apply(manifest, "--server-side", "--field-manager=smoke", namespace=namespace)
    got = cluster.get_json("configmap", "ssa", "--show-managed-fields", namespace=namespace)
    assert got["data"] == {"a": "2"}
    managers = {(m["manager"], m["operation"]) for m in got["metadata"]["managedFields"]}
    assert ("smoke", "Apply") in managers


def test_apiserver_restart_keeps_the_cluster_working(cluster: LocalCluster, namespace: str) -> None:
    """After restart_apiserver(), controllers, scheduler and kwok carry on (runs last)."""
    cluster.restart_apiserver()
    cluster.apply(gpu_deployment("after", 2), namespace=namespace)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment/after", "--timeout=60s", check=True
    )
