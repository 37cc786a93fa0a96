"""Thin HTTP routes: parse, call the endpoint's service (`Serving`), wrap the result."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from vllm_server import metrics
from vllm_server.auth import Access
from vllm_server.errors import ApiError, body_too_large, client_closed, invalid_body
from vllm_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from vllm_server.serving import Serving
from vllm_server.serving.base import BaseServing, Req, Resp

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

_JSON = "application/json"


def serving_of(request: Request) -> Serving:
    """The app's Serving instance."""
    s: Serving = request.app.state.serving
    return s


def _authorization(request: Request) -> bytes | None:
    """The raw bytes of the Authorization header (Starlette's str view decodes as latin-1)."""
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            return bytes(value)
    return None


def require_api_key(request: Request) -> None:
    """401 unless the API key (or the admin token) is presented, when an API key is set."""
    access: Access = request.app.state.access
    access.check_api(_authorization(request))


def require_adapter_admin(request: Request) -> None:
    """401/403 unless the caller may load and unload adapters (see `vllm_server.auth`)."""
    access: Access = request.app.state.access
    access.check_adapter_change(_authorization(request))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes.

    A declared Content-Length is checked before reading anything; a chunked body is counted
    as it arrives, so at most `limit` bytes (plus one chunk) are ever held. The rest is left
    to the server, which discards it.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise client_closed() from exc
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M]) -> M:
    """Read (bounded) and validate the JSON body; errors are 400 naming the parameter."""
    body = await read_body(request, serving_of(request).body_limit())
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_body(exc) from exc


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its event iterator (aborting the request)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream, then close the iterator even when the client went away mid-send."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so the engine request) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also reached when we are cancelled ourselves (shutdown): stop both, re-raise.
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task in done:
        return task.result()
    raise client_closed()


def _json(model: BaseModel) -> Response:
    """Serialize with pydantic-core directly (skips FastAPI's response validation)."""
    return Response(model.model_dump_json(), media_type=_JSON)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(events: Any) -> SSEResponse:
    """An SSE response."""
    return SSEResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)


async def _generate(request: Request, model: type[Req], service: BaseServing[Req, Resp]) -> Response:
    """Parse a generation request; the whole response, or its SSE stream when `stream` is true."""
    req = await parse_body(request, model)
    if req.stream:
        return _sse(await until_disconnect(request, service.stream(req)))
    return _json(await until_disconnect(request, service.create(req)))


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that parses `model` itself (fuzzers and docs read it).

    Pydantic's schema points into its own `$defs`; an OpenAPI document has none at its root,
    so the definitions are inlined (the request models are not recursive).
    """
    schema = model.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"content": {_JSON: {"schema": inline(schema)}}, "required": True}}


def api_router() -> APIRouter:
    """The /v1 routes (behind the API key when one is set)."""
    r = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @r.post("/chat/completions", openapi_extra=body_doc(ChatCompletionRequest))
    async def chat(request: Request) -> Response:
        """OpenAI chat completions (SSE when stream is true)."""
        return await _generate(request, ChatCompletionRequest, serving_of(request).chat)

    @r.post("/completions", openapi_extra=body_doc(CompletionRequest))
    async def completions(request: Request) -> Response:
        """OpenAI text completions (SSE when stream is true)."""
        return await _generate(request, CompletionRequest, serving_of(request).completions)

    @r.get("/models")
    async def models(request: Request) -> Response:
        """Base model and loaded LoRA adapters."""
        return _json(serving_of(request).models.model_list())

    @r.get("/stats")
    async def stats(request: Request) -> Response:
        """Request and token statistics."""
        return _json(serving_of(request).stats.snapshot())

    @r.get("/info")
    async def info(request: Request) -> Response:
        """Model and deployment facts."""
        return _json(serving_of(request).models.info())

    @r.get("/lora_adapters")
    async def lora_adapters(request: Request) -> Response:
        """Loaded LoRA adapters."""
        items = serving_of(request).models.lora_adapters()
        return JSONResponse([i.model_dump() for i in items])

    return r


def adapter_router() -> APIRouter:
    """Adapter administration: its own credentials (see `vllm_server.auth`)."""
    r = APIRouter(prefix="/v1", dependencies=[Depends(require_adapter_admin)])

    @r.post("/load_lora_adapter", openapi_extra=body_doc(LoadLoraAdapterRequest))
    async def load_lora_adapter(request: Request) -> Response:
        """Load an adapter (vLLM's body: lora_name, lora_path)."""
        req = await parse_body(request, LoadLoraAdapterRequest)
        return PlainTextResponse(await serving_of(request).models.load_lora(req))

    @r.post("/unload_lora_adapter", openapi_extra=body_doc(UnloadLoraAdapterRequest))
    async def unload_lora_adapter(request: Request) -> Response:
        """Unload an adapter (vLLM's body: lora_name)."""
        req = await parse_body(request, UnloadLoraAdapterRequest)
        return PlainTextResponse(await serving_of(request).models.unload_lora(req))

    return r


def open_router() -> APIRouter:
    """Routes that stay open without the API key (probes and scraping)."""
    r = APIRouter()

    @r.get("/health")
    async def health(request: Request) -> Response:
        """200 once the engine is up and alive, 503 before."""
        s = serving_of(request)
        if await s.healthy():
            return JSONResponse({"status": "ok"})
        msg = "The model is still loading." if not s.ready else "The engine is not healthy."
        raise ApiError(503, msg, code="not_ready", headers={"Retry-After": "5"})

    @r.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus exposition: vLLM's `vllm:` series plus our HTTP series."""
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return r
