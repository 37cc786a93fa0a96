"""Asynchronous client of a vLLM OpenAI-compatible server (or several, one model)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

import httpx

from vllm_operator_client._core import (
    PATHS,
    AsyncClosing,
    Attempts,
    BaseClient,
    BaseStream,
    BatchResult,
    Kind,
    Messages,
    Result,
    StreamChunk,
    StreamState,
    adapter_request,
    parse_body,
    request_body,
    result_of,
)
from vllm_operator_client.endpoints import Strategy
from vllm_operator_client.errors import ClientError
from vllm_operator_client.metrics import RequestMetrics
from vllm_operator_client.retry import RetryPolicy

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


class AsyncStream(BaseStream[AsyncIterator[StreamChunk]], AsyncClosing):
    """A streaming completion: iterate for chunks, then read `result`."""

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        """The chunks, one per event that carries text."""
        return self._chunks

    async def collect(self) -> Result:
        """Consume the rest of the stream and return the result."""
        async for _ in self._chunks:
            pass
        return self.result

    async def aclose(self) -> None:
        """Stop early, closing the connection (the server aborts the request)."""
        await self._chunks.aclose()  # type: ignore[attr-defined]


class AsyncClient(BaseClient[httpx.AsyncClient], AsyncClosing):
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
        super().__init__(
            base_url,
            api_key=api_key,
            model=model,
            strategy=strategy,
            retry=retry,
            max_retries=max_retries,
            timeout=timeout,
            max_connections=max_connections,
            http=http,
            make_http=lambda t, limits: httpx.AsyncClient(
                timeout=t, limits=limits, transport=transport_of(backend, limits)
            ),
        )

    async def aclose(self) -> None:
        """Close the connection pool (unless it was passed in)."""
        if self._own_http:
            await self._http.aclose()

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
        """Any JSON endpoint, with retries: (parsed body, metrics). A POST is sent again only when
        the server did not start on it (connection failed, 408, 429, 503)."""
        attempts = Attempts(self.pool, self.retry, repeatable=method in ("GET", "HEAD"))
        metrics = attempts.metrics
        resp = await self._send(attempts, method, path, body, stream=False)
        metrics.total_s = time.monotonic() - metrics.started
        return parse_body(resp), metrics

    async def _events(
        self, kind: Kind, body: dict[str, Any], holder: list[StreamState]
    ) -> AsyncIterator[StreamChunk]:
        """Stream events; a connection lost before the first chunk is retried like any other."""
        attempts = Attempts(self.pool, self.retry)
        while True:
            resp = await self._send(attempts, "POST", PATHS[kind], body, stream=True)
            state = StreamState(kind, attempts.metrics, attempts.url)
            holder[:] = [state]
            try:
                async for line in resp.aiter_lines():
                    chunk = state.line(line)
                    if chunk is not None:
                        yield chunk
                    if state.done:
                        break
                state.check_done()
                return
            except httpx.TransportError as exc:
                err = attempts.transport_error(exc)
                if attempts.metrics.chunks:
                    raise state.interrupted(exc) from exc
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
        return BatchResult.of(results, time.monotonic() - t0)

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
        return str((await self.request("POST", *adapter_request("load", name, path)))[0])

    async def unload_lora_adapter(self, name: str) -> str:
        """POST /v1/unload_lora_adapter; returns the server's message."""
        return str((await self.request("POST", *adapter_request("unload", name)))[0])
