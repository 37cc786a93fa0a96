"""Synchronous client: the same API as AsyncClient, on httpx.Client (thread-safe)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from vllm_operator_client._core import (
    PATHS,
    Attempts,
    BaseClient,
    BaseStream,
    BatchResult,
    Closing,
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


class Stream(BaseStream[Iterator[StreamChunk]], Closing):
    """A streaming completion: iterate for chunks, then read `result`."""

    def __iter__(self) -> Iterator[StreamChunk]:
        """The chunks, one per event that carries text."""
        return self._chunks

    def collect(self) -> Result:
        """Consume the rest of the stream and return the result."""
        for _ in self._chunks:
            pass
        return self.result

    def close(self) -> None:
        """Stop early, closing the connection."""
        self._chunks.close()  # type: ignore[attr-defined]


class Client(BaseClient[httpx.Client], Closing):
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
        http: httpx.Client | None = None,
    ) -> None:
        """`base_url` with or without /v1; a list spreads or fails over between servers."""
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
            make_http=lambda t, limits: httpx.Client(timeout=t, limits=limits),
        )

    def close(self) -> None:
        """Close the connection pool (unless it was passed in)."""
        if self._own_http:
            self._http.close()

    # ---- transport -----------------------------------------------------------------------------

    def _send(self, attempts: Attempts, method: str, path: str, body: Any, stream: bool) -> httpx.Response:
        """Send with retries; returns a 2xx response (streamed responses still open)."""
        while True:
            err: ClientError
            try:
                req = self._http.build_request(method, attempts.url + path, json=body, headers=self._headers)
                resp = self._http.send(req, stream=stream)
            except httpx.TransportError as exc:
                err = attempts.transport_error(exc)
            else:
                if resp.status_code < 400:
                    attempts.ok()
                    return resp
                resp.read()
                resp.close()
                err = attempts.status_error(resp, parse_body(resp))
            time.sleep(attempts.wait_or_raise(err))

    def request(self, method: str, path: str, body: Any = None) -> tuple[Any, RequestMetrics]:
        """Any JSON endpoint, with retries: (parsed body, metrics). A POST is sent again only when
        the server did not start on it (connection failed, 408, 429, 503)."""
        attempts = Attempts(self.pool, self.retry, repeatable=method in ("GET", "HEAD"))
        metrics = attempts.metrics
        resp = self._send(attempts, method, path, body, stream=False)
        metrics.total_s = time.monotonic() - metrics.started
        return parse_body(resp), metrics

    def _events(self, kind: Kind, body: dict[str, Any], holder: list[StreamState]) -> Iterator[StreamChunk]:
        """Stream events; a connection lost before the first chunk is retried like any other."""
        attempts = Attempts(self.pool, self.retry)
        while True:
            resp = self._send(attempts, "POST", PATHS[kind], body, stream=True)
            state = StreamState(kind, attempts.metrics, attempts.url)
            holder[:] = [state]
            try:
                for line in resp.iter_lines():
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
                resp.close()
            time.sleep(attempts.wait_or_raise(err))

    # ---- completions ---------------------------------------------------------------------------

    def _complete(self, kind: Kind, payload: Any, model: str | None, params: Mapping[str, Any]) -> Result:
        """A non-streaming chat or text completion."""
        body = request_body(kind, model or self.model, payload, False, params)
        data, metrics = self.request("POST", PATHS[kind], body)
        return result_of(kind, data, metrics)

    def _stream(self, kind: Kind, payload: Any, model: str | None, params: Mapping[str, Any]) -> Stream:
        """A streaming chat or text completion (nothing is sent before iterating)."""
        body = request_body(kind, model or self.model, payload, True, params)
        holder: list[StreamState] = []
        return Stream(self._events(kind, body, holder), holder)

    def chat(self, messages: Messages, *, model: str | None = None, **params: Any) -> Result:
        """POST /v1/chat/completions; `messages` is a list of messages or one user string."""
        return self._complete("chat", messages, model, params)

    def chat_stream(self, messages: Messages, *, model: str | None = None, **params: Any) -> Stream:
        """Streaming chat: `for chunk in client.chat_stream(...)`, then `.result`."""
        return self._stream("chat", messages, model, params)

    def completion(self, prompt: str | list[int], *, model: str | None = None, **params: Any) -> Result:
        """POST /v1/completions."""
        return self._complete("completion", prompt, model, params)

    def completion_stream(
        self, prompt: str | list[int], *, model: str | None = None, **params: Any
    ) -> Stream:
        """Streaming text completion."""
        return self._stream("completion", prompt, model, params)

    def batch_chat(
        self,
        prompts: Sequence[Messages],
        *,
        concurrency: int = 8,
        stream: bool = False,
        model: str | None = None,
        **params: Any,
    ) -> BatchResult:
        """Many chats on `concurrency` threads; errors are kept, not raised."""

        def one(p: Messages) -> Result | ClientError:
            try:
                if stream:
                    return self.chat_stream(p, model=model, **params).collect()
                return self.chat(p, model=model, **params)
            except ClientError as exc:
                return exc

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            results = list(pool.map(one, prompts))
        return BatchResult.of(results, time.monotonic() - t0)

    # ---- server endpoints ----------------------------------------------------------------------

    def _get(self, path: str) -> Any:
        """GET a JSON endpoint."""
        return self.request("GET", path)[0]

    def models(self) -> list[dict[str, Any]]:
        """GET /v1/models: the base model and loaded adapters."""
        return list(self._get("/v1/models").get("data", []))

    def stats(self) -> dict[str, Any]:
        """GET /v1/stats of the bundled server."""
        return dict(self._get("/v1/stats"))

    def info(self) -> dict[str, Any]:
        """GET /v1/info of the bundled server."""
        return dict(self._get("/v1/info"))

    def lora_adapters(self) -> list[dict[str, Any]]:
        """GET /v1/lora_adapters."""
        return list(self._get("/v1/lora_adapters"))

    def load_lora_adapter(self, name: str, path: str) -> str:
        """POST /v1/load_lora_adapter; returns the server's message."""
        return str(self.request("POST", *adapter_request("load", name, path))[0])

    def unload_lora_adapter(self, name: str) -> str:
        """POST /v1/unload_lora_adapter; returns the server's message."""
        return str(self.request("POST", *adapter_request("unload", name))[0])
