"""Application wiring: routes, error handlers, metrics, and the engine's lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_server import __version__
from vllm_server.auth import Access
from vllm_server.engine import Engine, SamplingSpec, build_engine
from vllm_server.errors import ApiError
from vllm_server.metrics import HttpMetrics, MetricsMiddleware
from vllm_server.routes import adapter_router, api_router, open_router
from vllm_server.serving import Serving
from vllm_server.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def _error_response(err: ApiError) -> Response:
    """OpenAI's error shape."""
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


def create_app(
    settings: Settings, engine: Engine | None = None, engine_factory: EngineFactory | None = None
) -> FastAPI:
    """Build the app. With `engine` it serves at once; otherwise the lifespan builds one."""
    serving = Serving(settings)
    if engine is not None:
        serving.attach(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task: asyncio.Task[None] | None = None
        if serving.engine is None:
            factory = engine_factory or build_engine
            task = asyncio.create_task(_start_engine(app, serving, factory))
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            # Only shut down an engine we built; a test's engine belongs to the test.
            if engine is None and serving.engine is not None:
                serving.engine.shutdown()
            serving.close()

    app = FastAPI(title="vllm_server", version=__version__, lifespan=lifespan)
    app.state.serving = serving
    app.state.access = Access.from_settings(settings)
    app.state.startup_error = None
    app.include_router(open_router())
    app.include_router(api_router())
    app.include_router(adapter_router())
    app.add_middleware(MetricsMiddleware, metrics=HttpMetrics())

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        # The one place HTTP errors are counted. Only API errors: a probe's 503 while loading
        # is not a failed request, nor is a client that left (499).
        if exc.status != 499 and request.url.path.startswith("/v1/"):
            serving.stats.error()
        return _error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> Response:
        # FastAPI-parsed parameters (query/path); bodies are parsed in routes.
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(ApiError(400, str(first.get("msg", "invalid request")), param=param))

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        err = ApiError(exc.status_code, str(exc.detail), code=exc.status_code)
        return _error_response(err)

    async def on_any(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        serving.stats.error()
        return _error_response(ApiError(500, f"Internal server error: {type(exc).__name__}"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_any)
    return app


async def _start_engine(app: FastAPI, serving: Serving, factory: EngineFactory) -> None:
    """Build the engine off the event loop (so /health answers 503 meanwhile), then attach."""
    settings = serving.settings
    try:
        engine = await asyncio.to_thread(factory, settings)
        for module in settings.lora_modules:
            await engine.add_lora(module.name, module.path)
        await _warm_up(engine)
        # Move the large startup heap (torch, transformers, vLLM) out of the collector's
        # reach: otherwise full collections walk it again and again under load and stall
        # the event loop (measured: ~40% lower tokens/s in the first minutes).
        gc.collect()
        gc.freeze()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        # A server without an engine is useless: exit so that Kubernetes restarts the pod.
        log.exception("engine failed to start")
        app.state.startup_error = exc
        os.kill(os.getpid(), signal.SIGTERM)
        return
    serving.attach(engine)
    log.info("engine ready: %s (max_model_len=%d)", settings.model_name, engine.info.max_model_len)


async def _warm_up(engine: Engine) -> None:
    """Run one tiny request: the first one pays one-time setup costs, not a client."""
    ids = engine.encode("warm up") or [0]
    gen = engine.generate(ids, SamplingSpec(max_tokens=2, temperature=0.0), "warmup-0")
    async for _ in gen:
        pass
