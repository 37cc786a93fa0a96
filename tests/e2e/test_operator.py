"""The operator end to end on a real control plane, driven with kubectl as a user would."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import LocalCluster, condition, table_row, wait_until
from devtools.operator_process import OperatorProcess
from devtools.paths import REPO_ROOT
from tests.unit.test_flags import CASES as FLAG_CASES
from vllm_operator import render
from vllm_operator.api import parse_spec
from vllm_operator.settings import OperatorSettings

pytestmark = pytest.mark.cluster
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "serving.vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": name},
        "spec": {"model": "org/tiny", **spec},
    }


def wait_ready(cluster: LocalCluster, ns: str, name: str, timeout: int = 120) -> None:
    cluster.kubectl(
        "wait", "-n", ns, "--for=condition=Ready", f"vllmmodel/{name}", f"--timeout={timeout}s",
        check=True, timeout=timeout + 10,
    )  # fmt: skip


def eventually(check: Any, what: str, timeout: float = 60) -> None:
    wait_until(lambda: bool(check()), what, timeout=timeout, interval=0.5)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_accepted_by_the_api_server(crd: LocalCluster, namespace: str, path: Path) -> None:
    proc = crd.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", str(path))
    assert proc.returncode == 0, proc.stderr


INVALID = [
    ("bad enum", {"dtype": "fp64"}, "spec.dtype"),
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    ("zero tensor parallel", {"tensorParallelSize": 0}, "spec.tensorParallelSize"),
    ("gpu memory above one", {"gpuMemoryUtilization": 1.5}, "spec.gpuMemoryUtilization"),
    ("short context", {"maxModelLen": 4}, "spec.maxModelLen"),
    ("bad model scheme", {"model": "ftp://x"}, "spec.model"),
    ("bad adapter name", {"lora": {"adapters": [{"name": "Bad_Name", "source": "hf://a/b"}]}}, "name"),
    (
        "duplicate adapter",
        {"lora": {"adapters": [{"name": "a", "source": "hf://a/b"}, {"name": "a", "source": "hf://a/c"}]}},
        "spec.lora.adapters",
    ),
    ("managed flag", {"engineArgs": ["--port=9000"]}, "spec.engineArgs"),
    ("managed flag split", {"engineArgs": ["--tensor-parallel-size", "2"]}, "spec.engineArgs"),
    (
        "adapter shadows model",
        {"servedModelName": "a", "lora": {"adapters": [{"name": "a", "source": "/l"}]}},
        "adapters",
    ),
    ("unknown field", {"replica": 2}, "replica"),
]


@pytest.mark.parametrize(("case", "patch", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_resources_refused_naming_the_field(
    crd: LocalCluster, namespace: str, case: str, patch: dict[str, Any], field: str
) -> None:
    manifest = model("bad")
    manifest["spec"].update(patch)
    proc = crd.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    assert proc.returncode != 0, f"{case} was accepted"
    assert field in proc.stderr, proc.stderr


def test_the_crd_rule_and_the_validator_agree_on_managed_flags(crd: LocalCluster, namespace: str) -> None:
    """Every spelling in the flags table, through the CRD's CEL rule on the real API server."""
    disagree = []
    for arg, flag in FLAG_CASES:
        manifest = model("flags")
        manifest["spec"]["engineArgs"] = [arg]
        proc = crd.kubectl(
            "apply", "-n", namespace, "--dry-run=server", "-f", "-", input=json.dumps(manifest)
        )
        if (proc.returncode == 0) != (flag is None):
            disagree.append((arg, flag, proc.stderr.strip()[-200:]))
        elif flag is not None:
            assert "spec.engineArgs" in proc.stderr, proc.stderr
    assert not disagree, disagree


def test_apply_creates_children_and_becomes_ready(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    manifest = model("llama", tensorParallelSize=2, replicas=2, maxModelLen=4096)
    cluster.apply(manifest, namespace=namespace)
    wait_ready(cluster, namespace, "llama")

    obj = cluster.get_json("vllmmodel", "llama", namespace=namespace)
    desired = render.children(
        render.ModelRef("llama", namespace, obj["metadata"]["uid"]),
        parse_spec(manifest["spec"]),
        OperatorSettings.from_env({"VLLM_OPERATOR_SERVER_IMAGE": "ghcr.io/vllm-operator/vllm-server:0.1.0"}),
    )
    for child in desired:
        observed = cluster.get_json(child["kind"].lower(), "llama", namespace=namespace, check=False)
        assert observed is not None, child["kind"]
        assert render.is_subset(child, observed), f"{child['kind']} differs from the rendered one"

    pods = cluster.get_json("pods", "-l", "app.kubernetes.io/instance=llama", namespace=namespace)["items"]
    assert len(pods) == 2
    assert all(p["spec"]["nodeName"].startswith("kwok-gpu-") for p in pods)

    status = obj["status"]
    assert status["phase"] == "Ready"
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["endpoint"] == f"http://llama.{namespace}.svc:8000/v1"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "SpecValid")["status"] == "True"

    table = cluster.kubectl("get", "-n", namespace, "vllm", "llama", check=True).stdout
    header = table.splitlines()[0]
    assert header.split()[:7] == ["NAME", "READY", "DESIRED", "PHASE", "TOKENS/S", "ADAPTERS", "ENDPOINT"]
    row = table_row(table)
    assert (row["READY"], row["DESIRED"], row["PHASE"]) == ("2/2", "", "Ready")  # no autoscaling: no desired
    assert row["ENDPOINT"] == f"http://llama.{namespace}.svc:8000/v1"

    events = cluster.get_json("events", namespace=namespace)["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == "llama"}
    assert {"Created", "Ready"} <= reasons


def test_model_that_does_not_fit_stays_pending_and_says_why(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    cluster.apply(model("huge", tensorParallelSize=16), namespace=namespace)

    def explained() -> bool:
        obj = cluster.get_json("vllmmodel", "huge", namespace=namespace, check=False)
        return bool(obj) and "Insufficient nvidia.com/gpu" in condition(obj, "Ready").get("message", "")

    eventually(explained, "the Ready condition to name the GPU shortage")
    obj = cluster.get_json("vllmmodel", "huge", namespace=namespace)
    assert obj["status"]["phase"] == "Pending"
    assert condition(obj, "Degraded")["reason"] == "Unschedulable"
    pods = cluster.get_json("pods", "-l", "app.kubernetes.io/instance=huge", namespace=namespace)["items"]
    assert pods and all(not p["spec"].get("nodeName") for p in pods)


def pod_hash(cluster: LocalCluster, ns: str, name: str) -> str:
    dep = cluster.get_json("deployment", name, namespace=ns)
    return dep["spec"]["template"]["metadata"]["annotations"][render.POD_SPEC_HASH]  # type: ignore[no-any-return]


def test_spec_update_rolls_and_scale_scales(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    cluster.apply(model("roll", maxModelLen=2048), namespace=namespace)
    wait_ready(cluster, namespace, "roll")
    before = pod_hash(cluster, namespace, "roll")
    old_pods = {p["metadata"]["name"] for p in cluster.get_json("pods", namespace=namespace)["items"]}

    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "vllm",
        "roll",
        "--type=merge",
        "-p",
        '{"spec":{"maxModelLen":4096}}',
        check=True,
    )
    eventually(lambda: pod_hash(cluster, namespace, "roll") != before, "the pod template to change")
    deployment = cluster.get_json("deployment", "roll", namespace=namespace)
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-model-len") + 1] == "4096"

    def rolled() -> bool:
        obj = cluster.get_json("vllmmodel", "roll", namespace=namespace)
        pods = cluster.get_json("pods", namespace=namespace)["items"]
        names = {p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")}
        return (
            obj["status"].get("phase") == "Ready"
            and obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
            and bool(names)
            and not names & old_pods
        )

    eventually(rolled, "new pods to replace the old ones", timeout=90)

    cluster.kubectl("scale", "-n", namespace, "vllm/roll", "--replicas=3", check=True)
    eventually(
        lambda: cluster.get_json("deployment", "roll", namespace=namespace)["spec"]["replicas"] == 3,
        "scale to 3",
    )
    wait_until(
        lambda: cluster.get_json("vllmmodel", "roll", namespace=namespace)["status"].get("ready") == "3/3",
        "3/3 ready",
        timeout=90,
    )


def test_a_new_s3_adapter_rolls_the_pods_a_hub_adapter_does_not(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    def seen() -> bool:
        obj = cluster.get_json("vllmmodel", "ad", namespace=namespace)
        return bool(obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"])

    def set_adapters(*pairs: tuple[str, str]) -> None:
        adapters = [{"name": name, "source": source} for name, source in pairs]
        cluster.apply(model("ad", lora={"adapters": adapters}), namespace=namespace)
        eventually(seen, "the operator to see the change")

    hub = ("sql", "hf://org/sql-lora")
    set_adapters(hub)
    wait_ready(cluster, namespace, "ad")
    before = pod_hash(cluster, namespace, "ad")
    set_adapters(hub, ("chat", "hf://org/chat-lora"))
    assert pod_hash(cluster, namespace, "ad") == before  # hot-loaded, no roll

    set_adapters(hub, ("chat", "hf://org/chat-lora"), ("legal", "s3://bucket/legal"))
    eventually(lambda: pod_hash(cluster, namespace, "ad") != before, "the pods to roll for the download")
    pod = cluster.get_json("deployment", "ad", namespace=namespace)["spec"]["template"]["spec"]
    assert [c["args"] for c in pod["initContainers"]] == [["s3://bucket/legal", "/cache/sources/lora-legal"]]
    assert "legal=/cache/sources/lora-legal" in pod["containers"][0]["args"]


def test_deleted_child_comes_back_and_deleting_the_model_removes_all(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    cluster.apply(model("heal"), namespace=namespace)
    wait_ready(cluster, namespace, "heal")
    old_uid = cluster.get_json("service", "heal", namespace=namespace)["metadata"]["uid"]
    cluster.kubectl("delete", "-n", namespace, "service", "heal", check=True)

    def service_back() -> bool:
        svc = cluster.get_json("service", "heal", namespace=namespace, check=False)
        return bool(svc) and svc["metadata"]["uid"] != old_uid

    eventually(service_back, "the Service to come back")
    cluster.kubectl("delete", "-n", namespace, "deployment", "heal", check=True)
    eventually(
        lambda: cluster.get_json("deployment", "heal", namespace=namespace, check=False),
        "the Deployment to come back",
    )

    cluster.kubectl("delete", "-n", namespace, "vllm", "heal", "--wait=true", check=True, timeout=60)

    def all_gone() -> bool:
        left = cluster.kubectl("get", "-n", namespace, "deployments,services,replicasets,pods", "-o", "name")
        return left.returncode == 0 and left.stdout.strip() == ""

    eventually(all_gone, "garbage collection of every child", timeout=90)


def test_invalid_spec_beyond_the_crd_is_recorded_not_retried(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    cluster.apply(model("gpu-in-resources", resources={"limits": {"nvidia.com/gpu": 4}}), namespace=namespace)

    def recorded() -> bool:
        obj = cluster.get_json("vllmmodel", "gpu-in-resources", namespace=namespace, check=False)
        return bool(obj) and condition(obj, "SpecValid").get("status") == "False"

    eventually(recorded, "SpecValid=False")
    obj = cluster.get_json("vllmmodel", "gpu-in-resources", namespace=namespace)
    assert "GPU count is derived" in condition(obj, "SpecValid")["message"]
    assert obj["status"]["phase"] == "Failed"
    assert cluster.get_json("deployment", "gpu-in-resources", namespace=namespace, check=False) is None
    time.sleep(5)  # a retry loop would post more events in this time
    events = cluster.get_json("events", namespace=namespace)["items"]
    warnings = [e for e in events if e["reason"] == "InvalidSpec"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    assert "GPU count is derived" in warnings[0]["message"]


def test_operator_restart_midway_loses_nothing(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    names = [f"m{i}" for i in range(10)]
    documents = [model(name) for name in names]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents), check=True)
    time.sleep(1.0)
    operator.kill()
    operator.start()
    for name in names:
        wait_ready(cluster, namespace, name)
    deployments = cluster.get_json("deployments", namespace=namespace)["items"]
    assert sorted(d["metadata"]["name"] for d in deployments) == names
    replicasets = cluster.get_json("replicasets", namespace=namespace)["items"]
    assert len(replicasets) == len(names), "a Deployment was changed by a duplicate reconcile"
    for name in names:
        obj = cluster.get_json("vllmmodel", name, namespace=namespace)
        assert obj["status"]["phase"] == "Ready"
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_apiserver_restart_is_survived(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    pid = operator.pid
    cluster.restart_apiserver(downtime=3)
    cluster.apply(model("after-restart"), namespace=namespace)
    wait_ready(cluster, namespace, "after-restart", timeout=180)
    assert operator.pid == pid and operator.healthy()


def wait_degraded(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    """The model's Degraded condition, once it is True."""

    def degraded() -> dict[str, Any]:
        obj = cluster.get_json("vllmmodel", name, namespace=namespace, check=False) or {}
        found = condition(obj, "Degraded")
        return found if found.get("status") == "True" else {}

    eventually(degraded, f"Degraded on model {name}")
    return degraded()


def apply_core(
    cluster: LocalCluster, namespace: str, kind: str, metadata: dict[str, Any], spec: dict[str, Any]
) -> None:
    """Apply a core (v1) object of someone else's: no operator made it."""
    cluster.apply({"apiVersion": "v1", "kind": kind, "metadata": metadata, "spec": spec}, namespace=namespace)


def test_a_foreign_service_with_the_models_name_is_never_adopted(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    """Someone else's Service named like the model: the model says so and leaves it alone."""
    spec = {"selector": {"app": "theirs"}, "ports": [{"port": 80}]}
    apply_core(cluster, namespace, "Service", {"name": "taken", "labels": {"team": "other"}}, spec)
    before = cluster.get_json("service", "taken", namespace=namespace)
    cluster.apply(model("taken"), namespace=namespace)

    degraded = wait_degraded(cluster, namespace, "taken")
    assert degraded["reason"] == "NameConflict", degraded
    assert "Service taken" in degraded["message"], degraded
    after = cluster.get_json("service", "taken", namespace=namespace)
    assert "ownerReferences" not in after["metadata"], after["metadata"]
    assert after["spec"]["selector"] == before["spec"]["selector"]
    assert cluster.get_json("deployment", "taken", namespace=namespace, check=False) is None

    cluster.kubectl("delete", "vllmmodel", "taken", "-n", namespace, "--wait=true", check=True, timeout=60)
    time.sleep(3)  # give the garbage collector time to act, were the Service owned by the model
    assert cluster.get_json("service", "taken", namespace=namespace, check=False) is not None


def test_a_quota_refusing_the_pods_shows_in_degraded(
    operator: OperatorProcess, cluster: LocalCluster, namespace: str
) -> None:
    """No pod is ever made, so only the Deployment's ReplicaFailure condition can tell why."""
    apply_core(
        cluster, namespace, "ResourceQuota", {"name": "no-gpus"}, {"hard": {"requests.nvidia.com/gpu": "0"}}
    )
    # Quota admission enforces a quota only once the quota controller has filled in its status:
    # a model applied at once could get its pods (seen once on a cold CI run).
    eventually(
        lambda: (
            (cluster.get_json("resourcequota", "no-gpus", namespace=namespace, check=False) or {})
            .get("status", {})
            .get("hard")
        ),
        "the quota to be in force",
    )
    cluster.apply(model("quota"), namespace=namespace)

    degraded = wait_degraded(cluster, namespace, "quota")
    assert degraded["reason"] == "FailedCreate", degraded
    assert "exceeded quota" in degraded["message"], degraded
    obj = cluster.get_json("vllmmodel", "quota", namespace=namespace)
    assert obj["status"]["phase"] == "Degraded"
