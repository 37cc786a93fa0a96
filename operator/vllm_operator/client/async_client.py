"""Asynchronous client of a vLLM OpenAI-compatible server (or several, one model)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import httpx

from vllm_operator.client._core import (
    PATHS,
    Attempts,
    Kind,
    Messages,
    Result,
    SSEDecoder,
    StreamChunk,
    StreamState,
    auth_headers,
    parse_body,
    request_body,
    result_of,
    timeout_of,
)
from vllm_operator.client.endpoints import EndpointPool, Strategy
from vllm_operator.client.errors import ClientError, StreamInterruptedError
from vllm_operator.client.metrics import BatchMetrics, RequestMetrics
from vllm_operator.client.retry import RetryPolicy

Backend = Literal["httpx", "aiohttp", "auto"]


def transport_of(backend: Backend, limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    """The transport for `backend`; None means httpx's own."""
    if backend == "httpx":
        return None
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        if backend == "auto":
            return None
        raise ImportError(
            "backend 'aiohttp' needs httpx-aiohttp: pip install httpx-aiohttp "
            "(or pip install 'vllm-operator[bench]')"
        ) from None
    transport: httpx.AsyncBaseTransport = AiohttpTransport(limits=limits)
    return transport


@dataclass
class BatchResult:
    """Results in prompt order (a Result or the error that ended the item) and the aggregate."""

    results: list[Result | ClientError]
    metrics: BatchMetrics


class AsyncStream:
    """A streaming completion: iterate for chunks, then read `result`."""

    def __init__(self, chunks: AsyncIterator[StreamChunk], state: list[StreamState]) -> None:
        """Wrap the chunk generator; `state` holds the live StreamState once started."""
        self._chunks = chunks
        self._state = state
        self._result: Result | None = None

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        """The chunks, one per event that carries text."""
        return self._chunks

    @property
    def result(self) -> Result:
        """The whole completion; valid after the iteration ended."""
        if self._result is None:
            if not self._state or not self._state[-1].done:
                raise RuntimeError("the stream has not finished yet")
            self._result = self._state[-1].result()
        return self._result

    async def collect(self) -> Result:
        """Consume the rest of the stream and return the result."""
        async for _ in self._chunks:
            pass
        return self.result

    async def aclose(self) -> None:
        """Stop early, closing the connection (the server aborts the request)."""
        await self._chunks.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncStream:
        """Use in `async with` to close on early exit."""
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the stream."""
        await self.aclose()


class AsyncClient:
    """Chat, completions, streaming and server endpoints, with retries and failover."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        model: str | None = None,
        strategy: Strategy = "round_robin",
        retry: RetryPolicy | None = None,
        max_retries: int | None = None,
        timeout: float | httpx.Timeout | None = 60.0,
        max_connections: int = 100,
        http: httpx.AsyncClient | None = None,
        backend: Backend = "httpx",
    ) -> None:
        """`base_url` with or without /v1; a list spreads or fails over between servers.

        `backend="aiohttp"` (or "auto" when httpx-aiohttp is installed) keeps the httpx API on
        aiohttp's C HTTP parser: about a third of httpx's CPU per streamed token at high
        concurrency (encode/httpx#3215).
        """
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.pool = EndpointPool(urls, strategy)
        self.model = model
        policy = retry or RetryPolicy()
        if max_retries is not None:
            policy = RetryPolicy(
                max_retries, policy.initial_delay, policy.max_delay, policy.max_retry_after, policy.jitter
            )
        self.retry = policy
        self._own_http = http is None
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = http or httpx.AsyncClient(
            timeout=timeout_of(timeout), limits=limits, transport=transport_of(backend, limits)
        )
        self._headers = auth_headers(api_key)

    async def aclose(self) -> None:
        """Close the connection pool (unless it was passed in)."""
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        """Use in `async with`."""
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close."""
        await self.aclose()

    # ---- transport -----------------------------------------------------------------------------

    async def _send(
        self, attempts: Attempts, method: str, path: str, body: Any, stream: bool
    ) -> httpx.Response:
        """Send with retries; returns a 2xx response (streamed responses still open)."""
        while True:
            err: ClientError
            try:
                req = self._http.build_request(method, attempts.url + path, json=body, headers=self._headers)
                resp = await self._http.send(req, stream=stream)
            except httpx.TransportError as exc:
                err = attempts.transport_error(exc)
            else:
                if resp.status_code < 400:
                    attempts.ok()
                    return resp
                await resp.aread()
                await resp.aclose()
                err = attempts.status_error(resp, parse_body(resp))
            await asyncio.sleep(attempts.wait_or_raise(err))

    async def request(self, method: str, path: str, body: Any = None) -> tuple[Any, RequestMetrics]:
        """Any JSON endpoint, with retries: (parsed body, metrics)."""
        metrics = RequestMetrics(started=time.monotonic())
        attempts = Attempts(self.pool, self.retry, metrics)
        resp = await self._send(attempts, method, path, body, stream=False)
        metrics.total_s = time.monotonic() - metrics.started
        return parse_body(resp), metrics

    async def _events(
        self, kind: Kind, body: dict[str, Any], holder: list[StreamState]
    ) -> AsyncIterator[StreamChunk]:
        """Stream events; a connection lost before the first chunk is retried like any other."""
        metrics = RequestMetrics(started=time.monotonic())
        attempts = Attempts(self.pool, self.retry, metrics)
        while True:
            resp = await self._send(attempts, "POST", PATHS[kind], body, stream=True)
            state = StreamState(kind, metrics, attempts.url)
            holder[:] = [state]
            decoder = SSEDecoder()
            try:
                async for line in resp.aiter_lines():
                    data = decoder.line(line)
                    if data is None:
                        continue
                    chunk = state.event(data)
                    if chunk is not None:
                        yield chunk
                    if state.done:
                        break
                if not state.done:
                    raise httpx.RemoteProtocolError("the stream ended without [DONE]")
                return
            except httpx.TransportError as exc:
                err = attempts.transport_error(exc)
                if metrics.chunks:
                    raise StreamInterruptedError(
                        f"stream interrupted after {metrics.chunks} chunks: {exc!r}",
                        url=attempts.url,
                        chunks=metrics.chunks,
                        text="".join(state.parts),
                    ) from exc
            finally:
                await resp.aclose()
            await asyncio.sleep(attempts.wait_or_raise(err))

    # ---- completions ---------------------------------------------------------------------------

    async def _complete(
        self, kind: Kind, payload: Any, model: str | None, params: Mapping[str, Any]
    ) -> Result:
        """A non-streaming chat or text completion."""
        body = request_body(kind, model or self.model, payload, False, params)
        data, metrics = await self.request("POST", PATHS[kind], body)
        return result_of(kind, data, metrics)

    def _stream(self, kind: Kind, payload: Any, model: str | None, params: Mapping[str, Any]) -> AsyncStream:
        """A streaming chat or text completion (nothing is sent before iterating)."""
        body = request_body(kind, model or self.model, payload, True, params)
        holder: list[StreamState] = []
        return AsyncStream(self._events(kind, body, holder), holder)

    async def chat(self, messages: Messages, *, model: str | None = None, **params: Any) -> Result:
        """POST /v1/chat/completions; `messages` is a list of messages or one user string."""
        return await self._complete("chat", messages, model, params)

    def chat_stream(self, messages: Messages, *, model: str | None = None, **params: Any) -> AsyncStream:
        """Streaming chat: `async for chunk in client.chat_stream(...)`, then `.result`."""
        return self._stream("chat", messages, model, params)

    async def completion(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> Result:
        """POST /v1/completions."""
        return await self._complete("completion", prompt, model, params)

    def completion_stream(
        self, prompt: str | list[int], *, model: str | None = None, **params: Any
    ) -> AsyncStream:
        """Streaming text completion."""
        return self._stream("completion", prompt, model, params)

    async def batch_chat(
        self,
        prompts: Sequence[Messages],
        *,
        concurrency: int = 8,
        stream: bool = False,
        model: str | None = None,
        **params: Any,
    ) -> BatchResult:
        """Many chats with at most `concurrency` in flight; errors are kept, not raised."""
        sem = asyncio.Semaphore(concurrency)

        async def one(p: Messages) -> Result | ClientError:
            async with sem:
                try:
                    if stream:
                        return await self.chat_stream(p, model=model, **params).collect()
                    return await self.chat(p, model=model, **params)
                except ClientError as exc:
                    return exc

        t0 = time.monotonic()
        results = list(await asyncio.gather(*(one(p) for p in prompts)))
        wall = time.monotonic() - t0
        ok = [r.metrics for r in results if isinstance(r, Result)]
        return BatchResult(results, BatchMetrics.of(ok, len(results) - len(ok), wall))

    # ---- server endpoints ----------------------------------------------------------------------

    async def _get(self, path: str) -> Any:
        """GET a JSON endpoint."""
        return (await self.request("GET", path))[0]

    async def models(self) -> list[dict[str, Any]]:
        """GET /v1/models: the base model and loaded adapters."""
        return list((await self._get("/v1/models")).get("data", []))

    async def stats(self) -> dict[str, Any]:
        """GET /v1/stats of the bundled server."""
        return dict(await self._get("/v1/stats"))

    async def info(self) -> dict[str, Any]:
        """GET /v1/info of the bundled server."""
        return dict(await self._get("/v1/info"))

    async def lora_adapters(self) -> list[dict[str, Any]]:
        """GET /v1/lora_adapters."""
        return list(await self._get("/v1/lora_adapters"))

    async def load_lora_adapter(self, name: str, path: str) -> str:
        """POST /v1/load_lora_adapter; returns the server's message."""
        body = {"lora_name": name, "lora_path": path}
        return str((await self.request("POST", "/v1/load_lora_adapter", body))[0])

    async def unload_lora_adapter(self, name: str) -> str:
        """POST /v1/unload_lora_adapter; returns the server's message."""
        body = {"lora_name": name}
        return str((await self.request("POST", "/v1/unload_lora_adapter", body))[0])
