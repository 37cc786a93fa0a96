"""The resource's validation: defaults, and every bad input named with its fix."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_operator.api import SpecError, VLLMModelSpec, dump, parse_spec

BASE: dict[str, Any] = {"model": "meta-llama/Llama-3.1-8B-Instruct"}


def test_defaults() -> None:
    spec = parse_spec(BASE)
    assert (spec.replicas, spec.tensor_parallel_size, spec.pipeline_parallel_size) == (1, 1, 1)
    assert spec.dtype == "auto"
    assert spec.gpu_memory_utilization == 0.9
    assert spec.gpu_resource_name == "nvidia.com/gpu"
    assert spec.startup_timeout_seconds == 3600
    assert spec.max_model_len is None and spec.lora is None and spec.quantization is None


def test_camel_case_round_trip() -> None:
    raw = {**BASE, "tensorParallelSize": 2, "maxModelLen": 4096, "lora": {"maxLoraRank": 8}}
    wire = dump(parse_spec(raw))
    assert wire["tensorParallelSize"] == 2
    assert wire["maxModelLen"] == 4096
    assert wire["lora"]["maxLoraRank"] == 8
    assert "tensor_parallel_size" not in wire


@pytest.mark.parametrize(
    "model",
    [
        "gpt2",
        "meta-llama/Llama-3.1-8B-Instruct",
        "hf://org/name",
        "s3://bucket/models/llama",
        "gs://bucket/llama",
        "pvc://models/llama-8b",
        "/models/llama",
    ],
)
def test_model_sources_accepted(model: str) -> None:
    assert parse_spec({"model": model}).model == model


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing model", {}, "spec.model", "is required"),
    ("unknown scheme", {"model": "ftp://x/y"}, "spec.model", "hf://"),
    ("negative replicas", {"replicas": -1}, "spec.replicas", "greater than or equal to 0"),
    ("zero tp", {"tensorParallelSize": 0}, "spec.tensorParallelSize", "greater than or equal to 1"),
    (
        "zero pp",
        {"pipelineParallelSize": 0},
        "spec.pipelineParallelSize",
        "greater than or equal to 1",
    ),
    ("gmu zero", {"gpuMemoryUtilization": 0}, "spec.gpuMemoryUtilization", "greater than 0"),
    (
        "gmu above one",
        {"gpuMemoryUtilization": 1.5},
        "spec.gpuMemoryUtilization",
        "less than or equal to 1",
    ),
    ("short context", {"maxModelLen": 8}, "spec.maxModelLen", "greater than or equal to 16"),
    ("bad dtype", {"dtype": "fp64"}, "spec.dtype", "'float16'"),
    (
        "bad quantization",
        {"quantization": {"method": "magic"}},
        "spec.quantization.method",
        "'awq'",
    ),
    (
        "bad kv dtype",
        {"quantization": {"method": "fp8", "kvCacheDtype": "int4"}},
        "kvCacheDtype",
        "'fp8'",
    ),
    (
        "adapter name not a DNS label",
        {"lora": {"adapters": [{"name": "Bad_Name", "source": "hf://a/b"}]}},
        "spec.lora.adapters[0].name",
        "DNS label",
    ),
    (
        "duplicate adapter",
        {
            "lora": {
                "adapters": [
                    {"name": "a", "source": "hf://a/b"},
                    {"name": "a", "source": "hf://a/c"},
                ]
            }
        },
        "spec.lora.adapters",
        "used twice",
    ),
    ("bad lora rank", {"lora": {"maxLoraRank": 7}}, "spec.lora.maxLoraRank", "16"),
    (
        "managed flag",
        {"engineArgs": ["--tensor-parallel-size=2"]},
        "spec.engineArgs",
        "set it through spec.tensorParallelSize",
    ),
    (
        "managed flag alias",
        {"engineArgs": ["-tp", "2"]},
        "spec.engineArgs",
        "--tensor-parallel-size",
    ),
    (
        "managed port",
        {"engineArgs": ["--port", "9000"]},
        "spec.engineArgs",
        "managed by the operator",
    ),
    ("unknown field", {"replica": 2}, "spec.replica", "unknown field"),
    ("unknown nested field", {"cache": {"pvc": "x"}}, "spec.cache.pvc", "unknown field"),
    (
        "gpu in resources",
        {"resources": {"limits": {"nvidia.com/gpu": 4}}},
        "spec",
        "GPU count is derived",
    ),
    (
        "bad resources key",
        {"resources": {"limit": {}}},
        "spec.resources",
        "'requests' and 'limits'",
    ),
    ("bad shm size", {"shmSize": "lots"}, "spec.shmSize", "pattern"),
    ("startup too short", {"startupTimeoutSeconds": 5}, "spec.startupTimeoutSeconds", "60"),
    (
        "secret ref without key",
        {"apiKeySecretRef": {"name": "s"}},
        "spec.apiKeySecretRef.key",
        "required",
    ),
    (
        "adapter named like the model",
        {"servedModelName": "sql", "lora": {"adapters": [{"name": "sql", "source": "hf://a/b"}]}},
        "lora.adapters",
        "rename the adapter",
    ),
    (
        "autoscaling min above max",
        {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
        "spec.autoscaling",
        "lower minReplicas or raise maxReplicas",
    ),
    (
        "autoscaling without max",
        {"autoscaling": {"minReplicas": 0}},
        "spec.autoscaling.maxReplicas",
        "required",
    ),
    (
        "autoscaling panic window longer than stable",
        {"autoscaling": {"maxReplicas": 2, "stableWindowSeconds": 10, "panicWindowSeconds": 20}},
        "spec.autoscaling",
        "the panic window must be the shorter one",
    ),
    (
        "autoscaling kv target above one",
        {"autoscaling": {"maxReplicas": 2, "targetKvCache": 1.5}},
        "spec.autoscaling.targetKvCache",
        "less than or equal to 1",
    ),
    (
        "autoscaling bad driver",
        {"autoscaling": {"maxReplicas": 2, "driver": "keda"}},
        "spec.autoscaling.driver",
        "'External'",
    ),
]


@pytest.mark.parametrize(("case", "patch", "field", "hint"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_field_and_fix(case: str, patch: dict[str, Any], field: str, hint: str) -> None:
    raw = {**BASE, **patch} if "model" not in patch and case != "missing model" else patch
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    message = str(caught.value)
    assert field in message, message
    assert hint in message, message


def test_gpus_per_pod() -> None:
    assert VLLMModelSpec(model="m", tensor_parallel_size=4, pipeline_parallel_size=2).gpus_per_pod == 8
