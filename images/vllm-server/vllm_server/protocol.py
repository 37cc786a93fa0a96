"""OpenAI-compatible request, response and chunk models (pydantic)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Integers handed to the engine travel over its MessagePack transport, which carries 64 bits.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class _Request(BaseModel):
    """Base for request bodies: unknown fields are ignored, as OpenAI does.

    JSON has no Infinity or NaN, but the parser accepts them; no sampling parameter means
    anything with them (vLLM refused `repetition_penalty: Infinity` deep inside, as a 500).
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Request):
    """`stream_options` of a streaming request."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(_Request):
    """One part of a message's content list; only text parts are supported."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """A chat message in a request."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's content as one string."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


StopField = str | list[str] | None


class _SamplingRequest(_Request):
    """Sampling parameters shared by chat and completions (OpenAI + vLLM extras)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stop: StopField = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: StopField) -> StopField:
        """OpenAI allows at most 4 stop sequences; vLLM refuses empty ones (they match anywhere)."""
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if v == "" or (isinstance(v, list) and not all(v)):
            raise ValueError("stop sequences must be non-empty")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, v: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        """`stream_options` only makes sense with `stream: true` (OpenAI refuses it too)."""
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    def stop_list(self) -> list[str]:
        """`stop` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingRequest):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        """OpenAI requires `logprobs: true` when `top_logprobs` is set."""
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v


class CompletionRequest(_SamplingRequest):
    """Body of POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(
        cls, v: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        """Only one prompt per request (a string or a token list)."""
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], (str, list)) and len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        return v

    def prompt_value(self) -> str | list[int]:
        """The single prompt, text or token ids."""
        v = self.prompt
        if isinstance(v, str):
            return v
        first = v[0]
        if isinstance(first, str):
            return first
        if isinstance(first, list):
            return list(first)
        return [int(t) for t in v]  # type: ignore[arg-type]


class UsageInfo(BaseModel):
    """Token accounting of a response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(BaseModel):
    """An alternative token and its log probability (chat)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A sampled token's log probability with alternatives (chat)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """`logprobs` of a chat choice."""

    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """`logprobs` of a completion choice (legacy format)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    """The generated message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None


class DeltaMessage(BaseModel):
    """The increment carried by a chat chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


LogprobsT = TypeVar("LogprobsT", ChatLogprobs, CompletionLogprobs)


class _Choice(BaseModel, Generic[LogprobsT]):
    """What every choice carries besides its text: its index, logprobs and finish reason."""

    index: int
    logprobs: LogprobsT | None = None
    finish_reason: str | None = None


class ChatChoice(_Choice[ChatLogprobs]):
    """One choice of a chat completion."""

    message: AssistantMessage


class ChatChunkChoice(_Choice[ChatLogprobs]):
    """One choice of a chat chunk."""

    delta: DeltaMessage


class CompletionChoice(_Choice[CompletionLogprobs]):
    """One choice of a text completion (also used in chunks)."""

    text: str


def _now() -> int:
    """Unix seconds for `created`."""
    return int(time.time())


ChoiceT = TypeVar("ChoiceT", ChatChoice, ChatChunkChoice, CompletionChoice)


class _Completion(BaseModel, Generic[ChoiceT]):
    """A completion or one SSE event of it: each kind names its `object` and its choices.

    Usage is optional in chunks (only with `include_usage`), required in whole responses."""

    id: str
    object: str
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChoiceT]
    usage: UsageInfo | None = None


class ChatCompletionResponse(_Completion[ChatChoice]):
    """Response of a non-streaming chat completion."""

    object: Literal["chat.completion"] = "chat.completion"
    usage: UsageInfo


class ChatCompletionChunk(_Completion[ChatChunkChoice]):
    """One SSE event of a streaming chat completion."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class CompletionResponse(_Completion[CompletionChoice]):
    """Response of a non-streaming text completion."""

    object: Literal["text_completion"] = "text_completion"
    usage: UsageInfo


class CompletionChunk(_Completion[CompletionChoice]):
    """One SSE event of a streaming text completion."""

    object: Literal["text_completion"] = "text_completion"


class ModelCard(BaseModel):
    """An entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    """Response of GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The inner object of an OpenAI error."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorInfo


class LoadLoraAdapterRequest(_Request):
    """Body of POST /v1/load_lora_adapter (vLLM's shape)."""

    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)]


class UnloadLoraAdapterRequest(_Request):
    """Body of POST /v1/unload_lora_adapter (vLLM's shape)."""

    lora_name: Annotated[str, Field(min_length=1)]
    lora_int_id: int | None = None


class LoraAdapterInfo(BaseModel):
    """An entry of GET /v1/lora_adapters."""

    name: str
    path: str
    id: int


class StatsResponse(BaseModel):
    """Response of GET /v1/stats."""

    requests_processed: int
    requests_in_flight: int
    errors: int
    prompt_tokens: int
    tokens_generated: int
    avg_tokens_per_request: float
    max_tokens_per_request: int
    avg_generation_time_seconds: float
    throughput_tokens_per_second: float
    recent_tokens_per_second: float
    uptime_seconds: float


class InfoResponse(BaseModel):
    """Response of GET /v1/info."""

    model: str
    served_model_name: str
    max_model_len: int | None
    gpus: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    dtype: str
    gpu_memory_utilization: float | None
    quantization: str | None
    kv_cache_dtype: str | None
    lora_adapters: list[str]
    engine_ready: bool
    version: str
    extra: dict[str, Any] = Field(default_factory=dict)
