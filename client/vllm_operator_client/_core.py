"""What the async and sync clients share: bodies, results, SSE decoding, retry bookkeeping,
construction and the stream wrapper."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Generic, Literal, Self, TypeVar

import httpx

from vllm_operator_client.endpoints import EndpointPool, Strategy
from vllm_operator_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ClientError,
    StreamInterruptedError,
    status_error,
    stream_error,
)
from vllm_operator_client.metrics import BatchMetrics, RequestMetrics
from vllm_operator_client.retry import RetryPolicy, parse_retry_after, retryable_status

Kind = Literal["chat", "completion"]
Message = Mapping[str, Any]
Messages = str | Sequence[Message]

PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}

C = TypeVar("C")  # the chunk iterator of a stream, sync or async
H = TypeVar("H")  # the httpx client, sync or async


@dataclass
class Usage:
    """Token counts the server reported."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, raw: Any) -> Usage | None:
        """From a response's `usage` object."""
        if not isinstance(raw, dict):
            return None
        return cls(
            int(raw.get("prompt_tokens") or 0),
            int(raw.get("completion_tokens") or 0),
            int(raw.get("total_tokens") or 0),
        )


@dataclass
class Result:
    """A finished chat or text completion (first choice) with its metrics."""

    text: str
    finish_reason: str | None
    model: str
    usage: Usage | None
    metrics: RequestMetrics
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class StreamChunk:
    """One streamed event of the first choice."""

    text: str
    finish_reason: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass
class BatchResult:
    """Results in prompt order (a Result or the error that ended the item) and the aggregate."""

    results: list[Result | ClientError]
    metrics: BatchMetrics

    @classmethod
    def of(cls, results: list[Result | ClientError], wall: float) -> BatchResult:
        """Aggregate the successful items of a batch that took `wall` seconds."""
        ok = [r.metrics for r in results if isinstance(r, Result)]
        return cls(results, BatchMetrics.of(ok, len(results) - len(ok), wall))


def messages_of(messages: Messages, system: str | None = None) -> list[dict[str, Any]]:
    """A string becomes one user message; `system` goes first."""
    msgs = (
        [{"role": "user", "content": messages}] if isinstance(messages, str) else [dict(m) for m in messages]
    )
    return ([{"role": "system", "content": system}] if system is not None else []) + msgs


def request_body(
    kind: Kind, model: str | None, payload: Any, stream: bool, params: Mapping[str, Any]
) -> dict[str, Any]:
    """The JSON body of a chat or completion request; streams ask for usage."""
    body: dict[str, Any] = {"messages": messages_of(payload)} if kind == "chat" else {"prompt": payload}
    if model is not None:
        body["model"] = model
    body.update({k: v for k, v in params.items() if v is not None})
    if stream:
        body["stream"] = True
        opts = dict(body.get("stream_options") or {})
        opts.setdefault("include_usage", True)
        body["stream_options"] = opts
    return body


def result_of(kind: Kind, data: dict[str, Any], metrics: RequestMetrics) -> Result:
    """A Result from a non-streaming response body."""
    choice = (data.get("choices") or [{}])[0]
    text = (choice.get("message") or {}).get("content") if kind == "chat" else choice.get("text")
    usage = Usage.of(data.get("usage"))
    if usage is not None:
        metrics.prompt_tokens = usage.prompt_tokens
        metrics.completion_tokens = usage.completion_tokens
    return Result(text or "", choice.get("finish_reason"), str(data.get("model", "")), usage, metrics, data)


def parse_body(resp: httpx.Response) -> Any:
    """JSON when it is JSON, else the text (error bodies from proxies are often HTML)."""
    try:
        return resp.json()
    except ValueError:
        return resp.text


class SSEDecoder:
    """Turns SSE lines into the data of complete events (comments and other fields ignored)."""

    def __init__(self) -> None:
        """No event pending."""
        self._data: list[str] = []

    def line(self, line: str) -> str | None:
        """Feed one line (without its newline); returns an event's data when the event ends."""
        if not line:
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data = []
            return data
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


class StreamState:
    """Accumulates a stream's text, usage and timing, event by event."""

    def __init__(self, kind: Kind, metrics: RequestMetrics, url: str) -> None:
        """Start with nothing received."""
        self.kind = kind
        self.metrics = metrics
        self.url = url
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.model = ""
        self.usage: Usage | None = None
        self.done = False
        self._last: float | None = None
        self._decoder = SSEDecoder()

    def line(self, line: str) -> StreamChunk | None:
        """Feed one SSE line; a chunk when it ends an event that carries one."""
        data = self._decoder.line(line)
        return None if data is None else self.event(data)

    def check_done(self) -> None:
        """Raise when the body ended before [DONE] (a dropped connection, retried like one)."""
        if not self.done:
            raise httpx.RemoteProtocolError("the stream ended without [DONE]")

    def interrupted(self, exc: Exception) -> StreamInterruptedError:
        """The error for a connection lost after some chunks, with the text received so far."""
        chunks = self.metrics.chunks
        return StreamInterruptedError(
            f"stream interrupted after {chunks} chunks: {exc!r}",
            url=self.url,
            chunks=chunks,
            text="".join(self.parts),
        )

    def event(self, data: str) -> StreamChunk | None:
        """Handle one event's data; a chunk when it carries text or a finish reason."""
        if data == "[DONE]":
            self.done = True
            return None
        obj = json.loads(data)
        if "error" in obj and "choices" not in obj:
            raise stream_error(obj, self.url)
        self.model = obj.get("model", self.model)
        usage = Usage.of(obj.get("usage"))
        if usage is not None:
            self.usage = usage
        choices = obj.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        text = (
            (choice.get("delta") or {}).get("content") if self.kind == "chat" else choice.get("text")
        ) or ""
        reason = choice.get("finish_reason")
        if reason is not None:
            self.finish_reason = reason
        if text:
            now = time.monotonic()
            m = self.metrics
            if m.ttft_s is None:
                m.ttft_s = now - m.started
            elif self._last is not None:
                m.chunk_gaps_s.append(now - self._last)
            self._last = now
            m.chunks += 1
            self.parts.append(text)
        if not text and reason is None:
            return None
        return StreamChunk(text, reason, obj)

    def result(self) -> Result:
        """The finished stream; without a usage event the token count is the chunk count."""
        m = self.metrics
        m.total_s = time.monotonic() - m.started
        if self.usage is not None:
            m.prompt_tokens = self.usage.prompt_tokens
            m.completion_tokens = self.usage.completion_tokens
        else:
            m.completion_tokens = m.chunks
        return Result("".join(self.parts), self.finish_reason, self.model, self.usage, m)


# Answers that say the server refused the request before doing its work: a non-idempotent
# request (a completion POST) may be sent again after these and after connection failures, but
# not after a read timeout or another 5xx, when the server may have generated it all already.
REFUSED_BEFORE_WORK = frozenset({408, 429, 503})


class Attempts:
    """Retry bookkeeping of one request across the endpoints of a pool."""

    def __init__(self, pool: EndpointPool, policy: RetryPolicy, repeatable: bool = True) -> None:
        """Start the request's clock and fix the endpoint order for it; `repeatable` is False for
        requests whose repetition repeats work (see REFUSED_BEFORE_WORK)."""
        self.metrics = RequestMetrics(started=time.monotonic())
        self.pool = pool
        self.policy = policy
        self.repeatable = repeatable
        self.order = pool.order()
        self.retries = 0

    @property
    def url(self) -> str:
        """Endpoint of the current attempt."""
        return self.order[self.retries % len(self.order)]

    def ok(self) -> None:
        """The current endpoint answered."""
        self.pool.succeeded(self.url)
        self.metrics.endpoint = self.url

    def transport_error(self, exc: Exception) -> ClientError:
        """Map an httpx error to ours and mark the endpoint as failing."""
        self.pool.failed(self.url)
        # The aiohttp transport maps any dropped connection to ConnectTimeout: look at the cause.
        cause = exc.__cause__
        if isinstance(exc, httpx.TimeoutException) and (
            cause is None or isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__
        ):
            return APITimeoutError(f"timed out: {exc!r}", url=self.url)
        return APIConnectionError(f"connection failed: {exc!r}", url=self.url)

    def status_error(self, resp: httpx.Response, body: Any) -> APIStatusError:
        """Our exception for an error response; 5xx marks the endpoint as failing."""
        if resp.status_code >= 500:
            self.pool.failed(self.url)
        return status_error(resp.status_code, body, resp.headers, self.url)

    def wait_or_raise(self, err: ClientError) -> float:
        """Seconds to wait before the next attempt, or raise `err` when it must not be retried."""
        retry_after: float | None = None
        if not self.repeatable and (
            isinstance(err, APITimeoutError)
            or (isinstance(err, APIStatusError) and err.status not in REFUSED_BEFORE_WORK)
        ):
            raise err
        if isinstance(err, APIStatusError):
            if not retryable_status(err.status):
                raise err
            retry_after = parse_retry_after(err.headers)
        elif not isinstance(err, APIConnectionError):
            raise err
        if self.retries >= self.policy.max_retries:
            raise err
        wait = self.policy.delay(self.retries // len(self.order), retry_after)
        self.retries += 1
        self.metrics.retries = self.retries
        # Another endpoint not yet tried in this round goes at once, unless the server asked
        # for a pause (then the whole service is likely throttling).
        if self.retries % len(self.order) != 0 and retry_after is None:
            return 0.0
        return wait


def adapter_request(
    action: Literal["load", "unload"], name: str, path: str = ""
) -> tuple[str, dict[str, str]]:
    """(path, body) of vLLM's runtime LoRA call: `load` NAME from PATH, or `unload` NAME."""
    body = {"lora_name": name, **({"lora_path": path} if action == "load" else {})}
    return f"/v1/{action}_lora_adapter", body


def auth_headers(api_key: str | None) -> dict[str, str]:
    """Bearer authorization when a key is set."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def timeout_of(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    """`timeout` seconds for connecting and for each read; waiting for a pooled connection is not
    limited (bounded concurrency would otherwise time out queued requests)."""
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout, pool=None)


class Closing(ABC):
    """Closed by `close()`, or on leaving a `with` block."""

    @abstractmethod
    def close(self) -> None:
        """Release what it holds."""

    def __enter__(self) -> Self:
        """Use in `with`: closed on the way out, early or not."""
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close."""
        self.close()


class AsyncClosing(ABC):
    """Closed by `aclose()`, or on leaving an `async with` block."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release what it holds."""

    async def __aenter__(self) -> Self:
        """Use in `async with`: closed on the way out, early or not."""
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close."""
        await self.aclose()


class BaseStream(Generic[C]):
    """A streaming completion: iterate for chunks, then read `result`."""

    def __init__(self, chunks: C, state: list[StreamState]) -> None:
        """Wrap the chunk generator; `state` holds the live StreamState once started."""
        self._chunks = chunks
        self._state = state
        self._result: Result | None = None

    @property
    def result(self) -> Result:
        """The whole completion; valid after the iteration ended."""
        if self._result is None:
            if not self._state or not self._state[-1].done:
                raise RuntimeError("the stream has not finished yet")
            self._result = self._state[-1].result()
        return self._result


class BaseClient(Generic[H]):
    """Endpoints, model, retry policy, headers and HTTP client of a sync or async client."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None,
        model: str | None,
        strategy: Strategy,
        retry: RetryPolicy | None,
        max_retries: int | None,
        timeout: float | httpx.Timeout | None,
        max_connections: int,
        http: H | None,
        make_http: Callable[[httpx.Timeout, httpx.Limits], H],
    ) -> None:
        """`make_http(timeout, limits)` builds the HTTP client when `http` is not passed in."""
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.pool = EndpointPool(urls, strategy)
        self.model = model
        policy = retry or RetryPolicy()
        self.retry = policy if max_retries is None else replace(policy, max_retries=max_retries)
        self._own_http = http is None
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http: H = http or make_http(timeout_of(timeout), limits)
        self._headers = auth_headers(api_key)
