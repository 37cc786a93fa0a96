"""The renderer, table-driven: every typed field reaches the pod as the server expects it."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_operator import render
from vllm_operator.api import parse_spec
from vllm_operator.settings import OperatorSettings

REF = render.ModelRef(name="llama", namespace="team-a", uid="1234")
SETTINGS = OperatorSettings(
    server_image="example.com/vllm-server:1", default_resources={"requests": {"cpu": "2"}}
)


def deploy(**spec: Any) -> dict[str, Any]:
    return render.deployment(REF, parse_spec({"model": "org/model", **spec}), SETTINGS)


def container(**spec: Any) -> dict[str, Any]:
    return deploy(**spec)["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def args(**spec: Any) -> list[str]:
    return container(**spec)["args"]  # type: ignore[no-any-return]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize(
    ("spec", "gpus"),
    [
        ({}, "1"),
        ({"tensorParallelSize": 4}, "4"),
        ({"tensorParallelSize": 2, "pipelineParallelSize": 2}, "4"),
    ],
)
def test_gpu_limit_is_tp_times_pp(spec: dict[str, Any], gpus: str) -> None:
    assert container(**spec)["resources"]["limits"]["nvidia.com/gpu"] == gpus


def test_gpu_resource_name_and_resource_overrides() -> None:
    resources = container(
        gpuResourceName="amd.com/gpu",
        tensorParallelSize=2,
        resources={"limits": {"memory": "64Gi"}},
    )["resources"]
    assert resources == {"requests": {"cpu": "2"}, "limits": {"memory": "64Gi", "amd.com/gpu": "2"}}


@pytest.mark.parametrize(
    ("spec", "shm"),
    [
        # One GPU too: vLLM's engine asks for 160 MiB of /dev/shm, a container has 64 MiB.
        ({}, "8Gi"),
        ({"tensorParallelSize": 2}, "8Gi"),
        ({"pipelineParallelSize": 2}, "8Gi"),
        ({"shmSize": "2Gi"}, "2Gi"),
        ({"tensorParallelSize": 8, "shmSize": "32Gi"}, "32Gi"),
    ],
)
def test_shm_in_memory_for_every_pod(spec: dict[str, Any], shm: str) -> None:
    pod = deploy(**spec)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
    assert "/dev/shm" in mounts


@pytest.mark.parametrize(("timeout", "threshold"), [(3600, 360), (60, 6), (1805, 181)])
def test_startup_probe_budget_covers_startup_timeout(timeout: int, threshold: int) -> None:
    probe = container(startupTimeoutSeconds=timeout)["startupProbe"]
    assert probe["httpGet"] == {"path": "/health", "port": "http"}
    assert probe["failureThreshold"] == threshold
    assert probe["periodSeconds"] * probe["failureThreshold"] >= timeout


def test_readiness_and_liveness_probe_health() -> None:
    c = container()
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}


def test_a_deleted_pod_serves_until_the_service_drops_it_then_drains() -> None:
    pod = deploy()["spec"]["template"]["spec"]
    pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause >= 5
    assert pod["terminationGracePeriodSeconds"] >= pause + 30


def test_rollout_waits_for_slow_loads() -> None:
    assert deploy(startupTimeoutSeconds=7200)["spec"]["progressDeadlineSeconds"] > 7200


SECRETS = [
    ("hfTokenSecretRef", "HF_TOKEN"),
    ("apiKeySecretRef", "VLLM_API_KEY"),
]


@pytest.mark.parametrize(("field", "env_name"), SECRETS)
def test_secrets_reach_env_by_reference_only(field: str, env_name: str) -> None:
    c = container(**{field: {"name": "creds", "key": "k"}})
    env = {e["name"]: e for e in c["env"]}
    assert env[env_name] == {
        "name": env_name,
        "valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}},
    }
    assert "--api-key" not in c["args"]


def test_no_secret_env_without_refs() -> None:
    names = {e["name"] for e in container()["env"]}
    assert not names & {"HF_TOKEN", "VLLM_API_KEY"}


def test_user_env_is_kept_after_ours() -> None:
    env = container(env=[{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}])["env"]
    assert env[-1] == {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}


def test_restricted_security_context() -> None:
    pod = deploy()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True


def test_labels_on_every_child_and_selector() -> None:
    spec = parse_spec({"model": "org/model"})
    expected = {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": "llama",
        "app.kubernetes.io/managed-by": "vllm-operator",
    }
    for child in render.children(REF, spec, SETTINGS):
        assert child["metadata"]["labels"] == expected
        assert child["metadata"]["ownerReferences"][0]["uid"] == "1234"
        assert child["metadata"]["ownerReferences"][0]["controller"] is True
    d = render.deployment(REF, spec, SETTINGS)
    assert d["spec"]["template"]["metadata"]["labels"] == expected
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= expected.items()
    assert render.service(REF)["spec"]["selector"] == selector


def test_service_is_cluster_ip_on_8000_named_http() -> None:
    svc = render.service(REF)
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_offline_render_has_no_owner() -> None:
    ref = render.ModelRef(name="x", namespace="default", uid="")
    assert "ownerReferences" not in render.service(ref)["metadata"]


def pod_hash(**spec: Any) -> str:
    return deploy(**spec)["spec"]["template"]["metadata"]["annotations"][render.POD_SPEC_HASH]  # type: ignore[no-any-return]


def test_pod_hash_changes_with_spec_and_not_with_replicas() -> None:
    assert pod_hash(maxModelLen=4096) == pod_hash(maxModelLen=4096)
    assert pod_hash(maxModelLen=4096) != pod_hash(maxModelLen=8192)
    assert pod_hash(replicas=1) == pod_hash(replicas=5)


ARGS: list[tuple[dict[str, Any], str, str | None]] = [
    ({}, "--model", "org/model"),
    ({"model": "hf://org/other"}, "--model", "org/other"),
    ({"model": "/models/local"}, "--model", "/models/local"),
    ({"model": "pvc://weights/llama/8b"}, "--model", "/models/weights/llama/8b"),
    ({"model": "s3://bucket/llama"}, "--model", "/cache/sources/model"),
    ({}, "--served-model-name", "llama"),
    ({"servedModelName": "chat"}, "--served-model-name", "chat"),
    ({}, "--port", "8000"),
    ({}, "--host", "0.0.0.0"),
    ({"revision": "v2"}, "--revision", "v2"),
    ({}, "--revision", None),
    ({"tensorParallelSize": 4}, "--tensor-parallel-size", "4"),
    ({"pipelineParallelSize": 2}, "--pipeline-parallel-size", "2"),
    ({"maxModelLen": 4096}, "--max-model-len", "4096"),
    ({}, "--max-model-len", None),
    ({"dtype": "bfloat16"}, "--dtype", "bfloat16"),
    ({"gpuMemoryUtilization": 0.85}, "--gpu-memory-utilization", "0.85"),
    ({"quantization": {"method": "awq"}}, "--quantization", "awq"),
    ({"quantization": {"method": "awq"}}, "--kv-cache-dtype", None),
    ({"quantization": {"method": "fp8", "kvCacheDtype": "fp8"}}, "--kv-cache-dtype", "fp8"),
    ({"lora": {"maxLoras": 2}}, "--max-loras", "2"),
    ({"lora": {"maxLoraRank": 64}}, "--max-lora-rank", "64"),
    (
        {"lora": {"adapters": [{"name": "sql", "source": "hf://o/sql"}]}},
        "--lora-modules",
        "sql=o/sql",
    ),
    ({}, "--enable-lora", None),
]


@pytest.mark.parametrize(("spec", "name", "value"), ARGS)
def test_args_for_every_typed_field(spec: dict[str, Any], name: str, value: str | None) -> None:
    argv = args(**spec)
    if value is None:
        assert name not in argv
    else:
        assert flag(argv, name) == value


def test_lora_flags_and_modules() -> None:
    adapters = [{"name": "a", "source": "/lora/a"}, {"name": "b", "source": "pvc://loras/b"}]
    argv = args(lora={"adapters": adapters})
    assert "--enable-lora" in argv
    i = argv.index("--lora-modules")
    assert argv[i + 1 : i + 3] == ["a=/lora/a", "b=/models/loras/b"]


def test_engine_args_last() -> None:
    assert args(engineArgs=["--enable-prefix-caching", "--max-num-seqs=64"])[-2:] == [
        "--enable-prefix-caching",
        "--max-num-seqs=64",
    ]


def test_remote_sources_download_in_init_container() -> None:
    pod = deploy(model="s3://bucket/llama", cache={"pvcName": "weights"})["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert init["image"] == SETTINGS.storage_initializer_image
    assert init["args"] == ["s3://bucket/llama", "/cache/sources/model"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "weights"}} in pod["volumes"]


def test_pvc_sources_mount_read_only() -> None:
    pod = deploy(model="pvc://weights/llama")["spec"]["template"]["spec"]
    assert {
        "name": "pvc-weights",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    } in pod["volumes"]


@pytest.mark.parametrize(
    ("field", "value", "pod_key"),
    [
        ("nodeSelector", {"gpu": "a100"}, "nodeSelector"),
        ("tolerations", [{"key": "nvidia.com/gpu", "operator": "Exists"}], "tolerations"),
        ("affinity", {"nodeAffinity": {}}, "affinity"),
        ("priorityClassName", "high", "priorityClassName"),
        ("runtimeClassName", "nvidia", "runtimeClassName"),
    ],
)
def test_scheduling_fields(field: str, value: Any, pod_key: str) -> None:
    assert deploy(**{field: value})["spec"]["template"]["spec"][pod_key] == value
    assert pod_key not in deploy()["spec"]["template"]["spec"]


def test_image_default_and_override() -> None:
    assert container()["image"] == "example.com/vllm-server:1"
    assert container(image="vllm/vllm-openai:v0.9.0")["image"] == "vllm/vllm-openai:v0.9.0"


def test_replicas() -> None:
    assert deploy(replicas=0)["spec"]["replicas"] == 0
    assert deploy(replicas=3)["spec"]["replicas"] == 3


@pytest.mark.parametrize(
    ("desired", "observed", "subset"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": {"b": [1, 2]}}, {"a": {"b": [1, 2], "c": 3}}, True),
        ({"a": [{"x": 1}]}, {"a": [{"x": 1, "y": 2}]}, True),
        ({"a": [1, 2]}, {"a": [1]}, False),
        ({"a": "2"}, {"a": 2}, True),
        ({"a": 1}, {}, False),
    ],
)
def test_is_subset(desired: Any, observed: Any, subset: bool) -> None:
    assert render.is_subset(desired, observed) is subset


def test_fetched_paths_read_back_what_the_init_steps_download() -> None:
    lora = {"adapters": [{"name": "x", "source": "gs://b/x"}, {"name": "y", "source": "/lora/y"}]}
    pod = {"spec": deploy(model="s3://bucket/llama", lora=lora)["spec"]["template"]["spec"]}
    assert render.fetched_paths(pod) == {"/cache/sources/model", "/cache/sources/lora-x"}
    assert render.fetched_paths({"spec": {}}) == frozenset()
    assert render.fetched_paths(None) == frozenset()
