"""Pure rendering: a validated VLLMModel and operator settings become the desired children."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from vllm_operator.api import (
    API_VERSION,
    KIND,
    SERVER_PORT,
    LoraAdapter,
    Quantization,
    SecretKeyRef,
    VLLMModelSpec,
)
from vllm_operator.settings import OperatorSettings

Manifest = dict[str, Any]

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
POD_SPEC_HASH = "serving.vllm-operator.io/pod-spec-hash"
# The adapters the running pods were started with; newer ones are hot-loaded, not rolled.
STATIC_ADAPTERS = "serving.vllm-operator.io/static-adapters"
CONTAINER_NAME = "vllm"
ADMIN_TOKEN_KEY = "token"
# Seconds a deleted server pod keeps serving before SIGTERM (see pod_spec).
PRESTOP_SECONDS = 5
# Seconds after SIGTERM (and the pause before it) for in-flight streams to finish.
TERMINATION_GRACE_SECONDS = 60
CACHE_MOUNT = "/cache"
MODELS_MOUNT = "/models"


@dataclass(frozen=True)
class ModelRef:
    """Identity of the resource being rendered (what owner references need)."""

    name: str
    namespace: str
    uid: str


def selector_labels(name: str) -> dict[str, str]:
    """Labels that select a model's pods."""
    return {NAME_LABEL: "vllm", INSTANCE_LABEL: name}


def common_labels(name: str) -> dict[str, str]:
    """Labels on every child of a model."""
    return {**selector_labels(name), MANAGED_BY_LABEL: "vllm-operator"}


def selector_string(name: str) -> str:
    return ",".join(f"{key}={value}" for key, value in selector_labels(name).items())


def endpoint(ref: ModelRef, settings: OperatorSettings) -> str:
    return f"http://{ref.name}.{ref.namespace}.{settings.cluster_domain}:{SERVER_PORT}/v1"


def owner_references(ref: ModelRef) -> dict[str, Any]:
    """ownerReferences metadata, so that deleting the model deletes its children (none offline)."""
    if not ref.uid:
        return {}
    owner = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    return {"ownerReferences": [owner]}


@dataclass(frozen=True)
class ResolvedSource:
    """Where the server finds a model or adapter, and what the pod needs for that."""

    path: str
    pvc_claim: str = ""
    download_uri: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "model"


def resolve_source(source: str, slot: str) -> ResolvedSource:
    """Map a source URI to the path the server reads; `slot` names its download folder."""
    if source.startswith("hf://"):
        return ResolvedSource(path=source.removeprefix("hf://"))
    if source.startswith("pvc://"):
        claim, _, rest = source.removeprefix("pvc://").partition("/")
        return ResolvedSource(path=f"{MODELS_MOUNT}/{claim}/{rest}".rstrip("/"), pvc_claim=claim)
    if source.startswith(("s3://", "gs://")):
        return ResolvedSource(path=f"{CACHE_MOUNT}/sources/{_slug(slot)}", download_uri=source)
    return ResolvedSource(path=source)


def adapter_source(adapter: LoraAdapter) -> ResolvedSource:
    """Where the server finds a LoRA adapter; remote ones download to a folder of their own."""
    return resolve_source(adapter.source, "lora-" + adapter.name)


def server_args(spec: VLLMModelSpec, served_name: str) -> list[str]:
    """vLLM-style command line; the bundled server and upstream vLLM both accept it."""
    args = [
        "--model", resolve_source(spec.model, "model").path,
        "--served-model-name", served_name,
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--pipeline-parallel-size", str(spec.pipeline_parallel_size),
        "--dtype", spec.dtype,
        "--gpu-memory-utilization", str(spec.gpu_memory_utilization),
    ]  # fmt: skip
    if spec.revision:
        args += ["--revision", spec.revision]
    if spec.max_model_len is not None:
        args += ["--max-model-len", str(spec.max_model_len)]
    args += _quantization_args(spec.quantization)
    if spec.lora is not None:
        args += [
            "--enable-lora",
            "--max-loras", str(spec.lora.max_loras),
            "--max-lora-rank", str(spec.lora.max_lora_rank),
        ]  # fmt: skip
        if spec.lora.adapters:
            args.append("--lora-modules")
            args += [f"{a.name}={adapter_source(a).path}" for a in spec.lora.adapters]
    return args + list(spec.engine_args)


def _quantization_args(quantization: Quantization | None) -> list[str]:
    if quantization is None:
        return []
    args = ["--quantization", quantization.method]
    if quantization.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", quantization.kv_cache_dtype]
    return args


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def admin_token(ref: ModelRef, settings: OperatorSettings) -> str:
    """The token that lets the operator (and only it) load and unload a LoRA model's adapters.

    Derived, not stored: the operator recomputes it from its key and the model's identity, so
    it never needs to read a Secret; the pod gets it from `admin_secret`.
    """
    message = f"{ref.namespace}/{ref.name}/{ref.uid}".encode()
    return hmac.new(settings.admin_key.encode(), message, hashlib.sha256).hexdigest()


def admin_secret_name(ref: ModelRef, settings: OperatorSettings) -> str:
    """Named after a hash of the token: a new key makes a new Secret (and rolls the pods), so the
    operator only ever creates Secrets, never reads or changes one."""
    digest = hashlib.sha256(admin_token(ref, settings).encode()).hexdigest()[:10]
    return f"{ref.name}-admin-{digest}"


def admin_secret(ref: ModelRef, settings: OperatorSettings) -> Manifest:
    token = admin_token(ref, settings)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": admin_secret_name(ref, settings),
            "namespace": ref.namespace,
            "labels": common_labels(ref.name),
            **owner_references(ref),
        },
        "type": "Opaque",
        "data": {ADMIN_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def _env(spec: VLLMModelSpec, admin_secret_ref: str = "") -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
        {"name": "HOME", "value": CACHE_MOUNT},
    ]
    if admin_secret_ref:
        ref = SecretKeyRef(name=admin_secret_ref, key=ADMIN_TOKEN_KEY)
        env.append(_secret_env("VLLM_SERVER_ADMIN_TOKEN", ref))
    if spec.hf_token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    if spec.api_key_secret_ref is not None:
        # Both servers read VLLM_API_KEY, so the key never appears in args or the pod spec.
        env.append(_secret_env("VLLM_API_KEY", spec.api_key_secret_ref))
    return env + [copy.deepcopy(item) for item in spec.env]


def _resources(spec: VLLMModelSpec, settings: OperatorSettings) -> dict[str, Any]:
    resources: dict[str, Any] = copy.deepcopy(settings.default_resources)
    for section, values in spec.resources.items():
        if isinstance(values, dict) and isinstance(resources.get(section), dict):
            resources[section] = {**resources[section], **values}
        else:
            resources[section] = copy.deepcopy(values)
    for section in ("requests", "limits"):
        resources.setdefault(section, {})
        resources[section].pop(spec.gpu_resource_name, None)
    resources["limits"][spec.gpu_resource_name] = str(spec.gpus_per_pod)
    if not resources["requests"]:
        del resources["requests"]
    return resources


def shm_size(spec: VLLMModelSpec, settings: OperatorSettings) -> str:
    """Size of the pod's in-memory /dev/shm.

    Every pod needs one: vLLM 0.32's engine allocates a 160 MiB shared-memory queue even with
    one GPU (measured on the CPU build), and a container's default /dev/shm is 64 MiB, so the
    engine refused to start. The size is a cap; memory is used only as it is written.
    """
    return spec.shm_size if spec.shm_size is not None else settings.default_shm_size


def _probes(spec: VLLMModelSpec) -> dict[str, Any]:
    def health() -> dict[str, Any]:
        return {"path": "/health", "port": "http"}

    startup_period = 10
    return {
        # The startup probe owns the slow model load; liveness only starts after it succeeds.
        "startupProbe": {
            "httpGet": health(),
            "periodSeconds": startup_period,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(spec.startup_timeout_seconds / startup_period),
        },
        "readinessProbe": {
            "httpGet": health(),
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": health(),
            "periodSeconds": 15,
            "timeoutSeconds": 10,
            "failureThreshold": 4,
        },
    }


def _volumes(spec: VLLMModelSpec, settings: OperatorSettings) -> tuple[list[Any], list[Any]]:
    if spec.cache.pvc_name:
        cache: dict[str, Any] = {"persistentVolumeClaim": {"claimName": spec.cache.pvc_name}}
    else:
        cache = {"emptyDir": {}}
    volumes: list[dict[str, Any]] = [{"name": "cache", **cache}]
    mounts: list[dict[str, Any]] = [{"name": "cache", "mountPath": CACHE_MOUNT}]
    claims = [resolve_source(spec.model, "model").pvc_claim]
    if spec.lora is not None:
        claims += [adapter_source(a).pvc_claim for a in spec.lora.adapters]
    for claim in sorted({c for c in claims if c}):
        volumes.append(
            {
                "name": f"pvc-{claim}"[:63],
                "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
            }
        )
        mounts.append({"name": f"pvc-{claim}"[:63], "mountPath": f"{MODELS_MOUNT}/{claim}", "readOnly": True})
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(spec, settings)}})
    mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _downloads(spec: VLLMModelSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    """Init containers that fetch s3:// and gs:// sources into the cache volume."""
    sources = [("model", spec.model)]
    if spec.lora is not None:
        sources += [("lora-" + a.name, a.source) for a in spec.lora.adapters]
    containers = []
    for slot, source in sources:
        resolved = resolve_source(source, slot)
        if not resolved.download_uri:
            continue
        containers.append(
            {
                "name": f"fetch-{_slug(slot)}"[:63],
                "image": settings.storage_initializer_image,
                "imagePullPolicy": settings.image_pull_policy,
                "args": [resolved.download_uri, resolved.path],
                "env": [
                    {"name": "HOME", "value": CACHE_MOUNT},
                    *[copy.deepcopy(e) for e in spec.env],
                ],
                "volumeMounts": [{"name": "cache", "mountPath": CACHE_MOUNT}],
                "securityContext": _container_security(),
            }
        )
    return containers


def fetched_paths(pod: Any) -> frozenset[str]:
    """Paths a running pod's init containers downloaded into its cache (see `_downloads`)."""
    init = ((pod or {}).get("spec") or {}).get("initContainers") or []
    return frozenset(
        c["args"][-1] for c in init if str(c.get("name", "")).startswith("fetch-") and c.get("args")
    )


def pod_spec(
    spec: VLLMModelSpec, served_name: str, settings: OperatorSettings, admin_secret_ref: str = ""
) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, settings)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or settings.server_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": server_args(spec, served_name),
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "env": _env(spec, admin_secret_ref),
        "resources": _resources(spec, settings),
        "volumeMounts": mounts,
        "securityContext": _container_security(),
        **_probes(spec),
        # A deleted pod keeps accepting requests until every node has dropped it from the
        # Service (endpoint removal and kube-proxy's resync race with SIGTERM): measured on
        # kind, 1 of 202 requests was refused during a 2-replica roll without this pause.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # In-flight streams get time to finish after SIGTERM.
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
    }
    downloads = _downloads(spec, settings)
    if downloads:
        pod["initContainers"] = downloads
    optional = {
        "nodeSelector": dict(spec.node_selector),
        "tolerations": copy.deepcopy(spec.tolerations),
        "affinity": copy.deepcopy(spec.affinity),
        "priorityClassName": spec.priority_class_name,
        "runtimeClassName": spec.runtime_class_name,
    }
    pod.update({key: value for key, value in optional.items() if value})
    return pod


def spec_hash(value: Any) -> str:
    """Short stable hash of a JSON-able value."""
    encoded = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def deployment(ref: ModelRef, spec: VLLMModelSpec, settings: OperatorSettings) -> Manifest:
    served_name = spec.served_model_name or ref.name
    secret = admin_secret_name(ref, settings) if spec.lora is not None else ""
    pod = pod_spec(spec, served_name, settings, secret)
    adapters = [a.model_dump(by_alias=True) for a in (spec.lora.adapters if spec.lora else [])]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": ref.name,
            "namespace": ref.namespace,
            "labels": common_labels(ref.name),
            "annotations": {STATIC_ADAPTERS: json.dumps(adapters, separators=(",", ":"))},
            **owner_references(ref),
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(ref.name)},
            # A surge pod needs spare GPUs; zero unavailable keeps serving during rollouts.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "revisionHistoryLimit": 3,
            # Loading a big model is slow: the rollout is not "stuck" before the startup budget.
            "progressDeadlineSeconds": spec.startup_timeout_seconds + 600,
            "template": {
                "metadata": {
                    "labels": common_labels(ref.name),
                    "annotations": {POD_SPEC_HASH: spec_hash(pod)},
                },
                "spec": pod,
            },
        },
    }


def service(ref: ModelRef) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": ref.name,
            "namespace": ref.namespace,
            "labels": common_labels(ref.name),
            **owner_references(ref),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(ref.name),
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


_ADAPTER_LIST = TypeAdapter(list[LoraAdapter])


def static_adapters(observed: Any) -> list[LoraAdapter] | None:
    """The adapters a running Deployment's pods were started with, if it says.

    Anyone who may edit the Deployment may edit this annotation: a value that is not a list
    of adapters counts as absent (the Deployment is then re-rendered), never as an error.
    """
    raw = ((observed or {}).get("metadata", {}).get("annotations") or {}).get(STATIC_ADAPTERS)
    if not isinstance(raw, str):
        return None
    try:
        return _ADAPTER_LIST.validate_json(raw)
    except ValidationError:
        return None


def with_adapters(spec: VLLMModelSpec, adapters: list[LoraAdapter]) -> VLLMModelSpec:
    """The spec as the running pods know it: same fields, the adapters they started with."""
    if spec.lora is None:
        return spec
    return spec.model_copy(update={"lora": spec.lora.model_copy(update={"adapters": adapters})})


def unfetched_adapters(spec: VLLMModelSpec, started_with: list[LoraAdapter]) -> list[str]:
    """Adapters from s3:// or gs:// that the running pods did not download when they started.

    Only a pod's init step downloads, so these cannot be hot-loaded: the pods must roll.
    """
    if spec.lora is None:
        return []
    return [a.name for a in spec.lora.adapters if adapter_source(a).download_uri and a not in started_with]


def children(ref: ModelRef, spec: VLLMModelSpec, settings: OperatorSettings) -> list[Manifest]:
    """Every object the operator keeps for one model, in apply order."""
    return [service(ref), deployment(ref, spec, settings)]


def is_subset(desired: Any, observed: Any) -> bool:
    """True when every value we set is present in what the server holds (defaults may be added)."""
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(
            key in observed and is_subset(value, observed[key]) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(desired) == len(observed)
            and all(is_subset(d, o) for d, o in zip(desired, observed, strict=True))
        )
    return bool(desired == observed or str(desired) == str(observed))
