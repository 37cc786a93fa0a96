"""The VLLMModel resource as typed models: the single source of truth for the CRD and docs."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from vllm_operator import flags

GROUP = "serving.vllm-operator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "VLLMModel"
PLURAL = "vllmmodels"
SINGULAR = "vllmmodel"
SHORT_NAMES = ["vllm"]
FIELD_MANAGER = "vllm-operator"
SERVER_PORT = 8000

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# hf://org/name, s3://bucket/key, gs://bucket/key, pvc://claim/path, /abs/path or a bare HF repo id.
MODEL_SOURCE_PATTERN = (
    r"^((hf|s3|gs)://[A-Za-z0-9][^\s]*|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
    r"|/[^\s]*|[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?)$"
)
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"

Dtype = Literal["auto", "float16", "bfloat16", "float32"]
QuantizationMethod = Literal[
    "awq",
    "awq_marlin",
    "gptq",
    "gptq_marlin",
    "fp8",
    "bitsandbytes",
    "compressed-tensors",
    "gguf",
    "marlin",
    "experts_int8",
    "modelopt",
]
KvCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
ConditionType = Literal["Ready", "Progressing", "Degraded", "SpecValid", "AdaptersReady"]
ConditionStatus = Literal["True", "False", "Unknown"]
RoutingStrategy = Literal["LeastLoad", "PrefixAffinity", "RoundRobin"]
AutoscalingDriver = Literal["Operator", "External"]

ModelSource = Annotated[str, Field(pattern=MODEL_SOURCE_PATTERN, min_length=1, max_length=512)]
Quantity = Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=32)]


def _container_resources(resources: dict[str, Any]) -> dict[str, Any]:
    unknown = set(resources) - {"requests", "limits", "claims"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; use 'requests' and 'limits' as in a container")
    return resources


ContainerResources = Annotated[dict[str, Any], AfterValidator(_container_resources)]
"""A container's `resources`: a typo'd key is refused rather than silently ignored."""


class WireModel(BaseModel):
    """Base of every resource model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )


class SecretKeyRef(WireModel):
    """A key in a Secret of the resource's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253)
    """Key inside the Secret."""


class Quantization(WireModel):
    """How the weights and the KV cache are quantized."""

    method: QuantizationMethod
    """Weight quantization method, passed to vLLM as `--quantization`."""
    kv_cache_dtype: KvCacheDtype = "auto"
    """Data type of the KV cache, passed as `--kv-cache-dtype`."""


class LoraAdapter(WireModel):
    """A LoRA adapter served beside the base model."""

    name: str = Field(min_length=1, max_length=63)
    """DNS label, unique in the resource; clients use it as the model name."""
    source: ModelSource
    """Where the adapter lives: same schemes as `spec.model`."""

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not DNS_LABEL.match(value):
            raise ValueError(
                f"{value!r} is not a DNS label; use lowercase letters, digits and '-', "
                "starting and ending with a letter or digit (e.g. 'sql-v2')"
            )
        return value


class Lora(WireModel):
    """LoRA serving settings and the adapters to load."""

    max_loras: int = Field(default=4, ge=1, le=256)
    """How many adapters can be active in one batch (`--max-loras`)."""
    max_lora_rank: LoraRank = 16
    """Largest adapter rank the server accepts (`--max-lora-rank`)."""
    adapters: list[LoraAdapter] = Field(default_factory=list, max_length=64)
    """Adapters to load; add or remove them without restarting pods."""

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list[LoraAdapter]) -> list[LoraAdapter]:
        seen: set[str] = set()
        for adapter in adapters:
            if adapter.name in seen:
                raise ValueError(f"adapter name {adapter.name!r} is used twice; names must be unique")
            seen.add(adapter.name)
        return adapters


class Cache(WireModel):
    """Volume that caches downloaded model weights across pod restarts."""

    pvc_name: str = Field(default="", max_length=253)
    """PersistentVolumeClaim to mount as the cache; empty means a per-pod emptyDir."""


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")


class Routing(WireModel):
    """How the router (`vllm-operator router`) reaches this model and spreads its requests."""

    strategy: RoutingStrategy = "LeastLoad"
    """LeastLoad: the pod with fewest requests in flight; PrefixAffinity: alike conversations share a pod;
    RoundRobin: each pod in turn, whatever its load."""
    aliases: list[Annotated[str, Field(min_length=1, max_length=253, pattern=MODEL_NAME.pattern)]] = Field(
        default_factory=list, max_length=16
    )
    """Other names for the base model; the router rewrites them to the served name."""
    prefix_length: int = Field(default=256, ge=16, le=100_000)
    """PrefixAffinity: leading characters of the system prompt and first user message that pick the pod."""
    load_factor: float = Field(default=1.25, ge=1.0, le=10.0)
    """PrefixAffinity: a pod takes at most loadFactor x the mean load; past it the next pod is used."""
    session_header: str = Field(default="", max_length=128, pattern=r"^([A-Za-z0-9-]+)?$")
    """Request header (e.g. x-session-id) whose value pins a conversation to one pod; empty: off."""

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, aliases: list[str]) -> list[str]:
        if len(set(aliases)) != len(aliases):
            raise ValueError("an alias is listed twice; list each once")
        return aliases

    @field_validator("session_header")
    @classmethod
    def _header(cls, value: str) -> str:
        return value.lower()  # HTTP header names are case-insensitive; the router compares lowercase


class Autoscaling(WireModel):
    """Replicas that follow load: the operator writes `spec.replicas` (the scale subresource).

    Each target gives a replica count (load / target, rounded up); the largest wins. Load is
    averaged over the stable window; a burst that needs panicThreshold x the ready replicas over
    the short panic window scales up at once. A scale-down waits until scaleDownDelaySeconds have
    passed since the last scale-up and takes the highest count seen in that time.
    """

    driver: AutoscalingDriver = "Operator"
    """Operator: the operator decides and writes spec.replicas; External: another autoscaler
    (e.g. a KEDA ScaledObject on this resource) does, and the router still holds and wakes."""
    min_replicas: int = Field(default=1, ge=0, le=1000)
    """Fewest replicas; 0 lets an idle model go to zero (the router holds its next request while it wakes)."""
    max_replicas: int = Field(ge=1, le=1000)
    """Most replicas."""
    target_in_flight: float = Field(default=8.0, gt=0, le=100_000)
    """Requests in flight per replica, counted at the router (engines' running + waiting without one)."""
    target_waiting: float | None = Field(default=None, gt=0, le=100_000)
    """Requests waiting in the engine queue per replica; empty: not a target."""
    target_kv_cache: float | None = Field(default=None, gt=0, le=1)
    """KV-cache use per replica, in (0, 1]; empty: not a target."""
    stable_window_seconds: int = Field(default=60, ge=5, le=3600)
    """Load is averaged over this long for ordinary decisions."""
    panic_window_seconds: int = Field(default=6, ge=1, le=600)
    """Load is averaged over this long to catch bursts."""
    panic_threshold: float = Field(default=2.0, ge=1.1, le=100)
    """A burst: the panic window needs this many times the ready replicas; it scales up at once."""
    scale_down_delay_seconds: int = Field(default=120, ge=0, le=86_400)
    """No scale-down sooner than this after a scale-up; a scale-down takes the highest need seen in it."""
    idle_seconds: int = Field(default=300, ge=10, le=604_800)
    """With minReplicas 0: no request for this long sends the model to zero."""
    hold_timeout_seconds: int = Field(default=300, ge=1, le=3600)
    """How long the router holds a request while the model wakes; then 503 with Retry-After."""

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) is above maxReplicas ({self.max_replicas}); "
                "lower minReplicas or raise maxReplicas"
            )
        if self.panic_window_seconds > self.stable_window_seconds:
            raise ValueError(
                f"panicWindowSeconds ({self.panic_window_seconds}) is longer than stableWindowSeconds "
                f"({self.stable_window_seconds}); the panic window must be the shorter one"
            )
        return self


class VLLMModelSpec(WireModel):
    """Desired state of a served model."""

    model: ModelSource
    """Model to serve: HF repo id, hf://, s3://, gs://, pvc://CLAIM/PATH, or an absolute path in the image."""
    revision: str = Field(default="", max_length=128)
    """Model revision (branch, tag or commit) for HF models."""
    served_model_name: str = Field(default="", max_length=253)
    """Name clients use in requests; defaults to metadata.name."""
    replicas: int = Field(default=1, ge=0, le=1000)
    """Number of server pods; with `autoscaling` set, the autoscaler writes it."""
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    """GPUs each model layer is split over; GPUs per pod = tensorParallelSize x pipelineParallelSize."""
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64)
    """Pipeline stages; multiplies the GPUs per pod."""
    max_model_len: int | None = Field(default=None, ge=16, le=10_000_000)
    """Longest context (prompt + output) in tokens; defaults to the model's own."""
    dtype: Dtype = "auto"
    """Weights and activations data type."""
    quantization: Quantization | None = None
    """Quantization of the weights and KV cache."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Share of each GPU's memory vLLM may use, in (0, 1]."""
    lora: Lora | None = None
    """LoRA adapters; enables LoRA serving when set."""
    engine_args: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=64)
    """Extra vLLM engine flags; flags the operator manages are refused."""
    image: str = Field(default="", max_length=512)
    """Server image; defaults to the operator's setting."""
    gpu_resource_name: str = Field(default="nvidia.com/gpu", min_length=1, max_length=253)
    """Extended resource that counts GPUs on the nodes."""
    resources: ContainerResources = Field(default_factory=dict)
    """Container resources (requests/limits) over the operator's defaults; the GPU count is derived."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match."""
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Pod tolerations."""
    affinity: dict[str, Any] = Field(default_factory=dict)
    """Pod affinity rules."""
    priority_class_name: str = Field(default="", max_length=253)
    """PriorityClass of the pods."""
    runtime_class_name: str = Field(default="", max_length=253)
    """RuntimeClass of the pods (e.g. nvidia)."""
    env: list[dict[str, Any]] = Field(default_factory=list)
    """Extra environment variables of the server container."""
    api_key_secret_ref: SecretKeyRef | None = None
    """Secret key holding the API key; the server then requires `Authorization: Bearer`."""
    hf_token_secret_ref: SecretKeyRef | None = None
    """Secret key holding a Hugging Face token for gated models."""
    cache: Cache = Field(default_factory=Cache)
    """Model weights cache volume."""
    routing: Routing = Field(default_factory=Routing)
    """How the router spreads requests over the pods, and the model's other names."""
    autoscaling: Autoscaling | None = None
    """Replicas that follow load, down to zero when minReplicas is 0; empty: `replicas` is fixed."""
    shm_size: Quantity | None = None
    """Size of the pod's in-memory /dev/shm (vLLM needs more than a container's 64Mi); default 8Gi."""
    startup_timeout_seconds: int = Field(default=3600, ge=60, le=86_400)
    """How long a pod may take to load the model before it is restarted."""

    @field_validator("engine_args")
    @classmethod
    def _no_managed_flags(cls, args: list[str]) -> list[str]:
        for arg in args:
            why = flags.problem(arg)
            if why is not None:
                raise ValueError(why)
        return args

    @field_validator("env")
    @classmethod
    def _no_managed_env(cls, env: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in env:
            why = flags.env_problem(item.get("name"))
            if why is not None:
                raise ValueError(why)
        return env

    @model_validator(mode="after")
    def _gpu_count_is_derived(self) -> VLLMModelSpec:
        for section in ("requests", "limits"):
            if self.gpu_resource_name in (self.resources.get(section) or {}):
                raise ValueError(
                    f"resources.{section} sets {self.gpu_resource_name!r}; the GPU count is derived "
                    "from tensorParallelSize x pipelineParallelSize, remove it from resources"
                )
        return self

    @model_validator(mode="after")
    def _adapter_names_free(self) -> VLLMModelSpec:
        names = {a.name for a in self.lora.adapters} if self.lora is not None else set()
        if self.served_model_name in names:
            raise ValueError(
                f"lora.adapters: {self.served_model_name!r} is also spec.servedModelName; rename the adapter"
            )
        return self

    @model_validator(mode="after")
    def _alias_names_free(self) -> VLLMModelSpec:
        taken = {a.name for a in self.lora.adapters} if self.lora is not None else set()
        taken.add(self.served_model_name)
        for alias in self.routing.aliases:
            if alias in taken:
                raise ValueError(
                    f"routing.aliases: {alias!r} is already the served name or an adapter; remove the alias"
                )
        return self

    @property
    def gpus_per_pod(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class Condition(WireModel):
    """A Kubernetes-style condition."""

    type: ConditionType
    status: ConditionStatus
    reason: str = Field(max_length=128)
    message: str = Field(default="", max_length=4096)
    last_transition_time: str
    observed_generation: int | None = None


class Metrics(WireModel):
    """Throughput and load aggregated over every pod at the last scrape."""

    generation_tokens_per_second: float = 0.0
    prompt_tokens_per_second: float = 0.0
    requests_per_second: float = 0.0
    running_requests: int = 0
    waiting_requests: int = 0
    kv_cache_usage: float = 0.0
    scraped_at: str = ""


class PodStatus(WireModel):
    """One server pod as seen by the operator."""

    name: str
    ready: bool = False
    healthy: bool = False
    generation_tokens_per_second: float = 0.0
    running_requests: int = 0
    lora_adapters: list[str] = Field(default_factory=list)


class AdapterStatus(WireModel):
    """Which pods serve a LoRA adapter, as the pods themselves report it."""

    name: str
    ready_pods: int = 0


class RoutingStatus(WireModel):
    """How the router (`vllm-operator router`) sees the model, read from it every scrape round."""

    endpoints: int = 0
    """Pods of the model the router knows."""
    ready_endpoints: int = 0
    """Of those, the ready ones it sends requests to."""
    in_flight: int = 0
    """Requests for the model (and its aliases and adapters) in flight at the router."""


class ScaleDecision(WireModel):
    """One replica change the autoscaler made."""

    time: str
    from_replicas: int
    to_replicas: int
    reason: str = Field(max_length=256)


class AutoscalingStatus(WireModel):
    """What the autoscaler wants and why, written when it decides."""

    desired_replicas: int = 0
    """The replicas the load asks for now (within min and max)."""
    reason: str = Field(default="", max_length=256)
    """Why: the signal and figures behind the last decision."""
    last_scale_time: str | None = None
    """When the autoscaler last changed `spec.replicas`."""
    decisions: list[ScaleDecision] = Field(default_factory=list, max_length=10)
    """The last few changes, newest last."""


class VLLMModelStatus(WireModel):
    """Observed state, written by the operator."""

    observed_generation: int | None = None
    phase: Phase | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    ready: str | None = None
    """READY column: readyReplicas/replicas."""
    selector: str | None = None
    """Label selector of the pods, for the scale subresource."""
    endpoint: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    metrics: Metrics | None = None
    pods: list[PodStatus] = Field(default_factory=list, max_length=64)
    lora_adapters: list[AdapterStatus] = Field(default_factory=list)
    routing: RoutingStatus | None = None
    autoscaling: AutoscalingStatus | None = None


class SpecError(ValueError):
    """A spec that does not validate; `problems` name each field and its fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = "spec"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _describe(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field; remove it or check its spelling against the VLLMModel reference"
    elif error["type"] == "missing":
        message = "is required"
    elif error["type"] == "string_pattern_mismatch" and error["loc"][-1:] in (
        ("model",),
        ("source",),
    ):
        message = (
            f"{error['input']!r} is not a model source; use an HF repo id (org/name), hf://, s3://, "
            "gs://, pvc://CLAIM/PATH or an absolute path"
        )
    elif error["type"] == "string_pattern_mismatch" and "aliases" in error["loc"]:
        message = (
            f"{error['input']!r} is not a model name; use letters, digits and '.', '_', '/', ':', '-', "
            "starting with a letter or digit (e.g. 'llama-3-8b')"
        )
    elif error["type"] == "string_pattern_mismatch" and error["loc"][-1:] == ("sessionHeader",):
        message = (
            f"{error['input']!r} is not a header name; use letters, digits and '-' (e.g. 'x-session-id')"
        )
    elif error["type"] == "literal_error":
        message = f"{error['input']!r} is not allowed; {message[0].lower()}{message[1:]}"
    return f"{_field_path(error['loc'])}: {message}"


def parse_spec(raw: Any) -> VLLMModelSpec:
    """Validate a resource's spec as found on the wire, raising SpecError with field-named messages."""
    try:
        return VLLMModelSpec.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise SpecError([_describe(error) for error in exc.errors()]) from None


def parse_status(raw: Any) -> VLLMModelStatus:
    """Read a status as found on the wire; an unreadable one counts as empty."""
    try:
        return VLLMModelStatus.model_validate(raw or {})
    except ValidationError:
        return VLLMModelStatus()


def dump(model: BaseModel) -> dict[str, Any]:
    """The wire form of a model: camelCase, without unset optionals."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")
