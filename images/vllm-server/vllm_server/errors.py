"""Every error the server reports, in OpenAI's shape: `ApiError`, what each failure maps to, and
the only writers of an error: the app's exception handlers, and the in-band stream event."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vllm_server.engine import EngineDeadError, EngineInputError, EngineOverloadedError
from vllm_server.protocol import ErrorInfo, ErrorResponse
from vllm_server.stats import Stats

log = logging.getLogger(__name__)

# OpenAI's `type` strings by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An HTTP error with OpenAI's fields (message, type, param, code) and optional headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Describe the error."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        """The JSON body."""
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )


# ---- errors the server raises itself -------------------------------------------------------------


def model_not_found(name: str) -> ApiError:
    """404 for an unknown model (OpenAI's wording and code)."""
    return ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def client_closed() -> ApiError:
    """499 (nginx's status): the client went away before the response; not counted as an error."""
    return ApiError(499, "Client disconnected.", code="client_closed_request")


def body_too_large(limit: int) -> ApiError:
    """413 naming the setting that raises the limit."""
    return ApiError(
        413,
        f"The request body is larger than {limit} bytes. If such requests are "
        f"expected, raise --max-request-body-bytes "
        f"(VLLM_SERVER_MAX_REQUEST_BODY_BYTES).",
        code="request_too_large",
    )


# ---- what other exceptions become ------------------------------------------------------------------


def engine_failure(exc: BaseException) -> BaseException:
    """An engine exception as the ApiError it means; anything else (and cancellation) unchanged."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineInputError):
        return ApiError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return ApiError(
            503,
            str(exc) or "The engine is overloaded; retry later.",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineDeadError):
        return ApiError(500, f"The engine failed: {exc}", code="engine_dead")
    return exc


def invalid_body(exc: ValidationError) -> ApiError:
    """A request body's first validation problem as an OpenAI-style 400 naming the parameter."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {err['msg']}", code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if not str(p).startswith("function-")]
    # Drop pydantic's union branch names (e.g. "str", "list[...]") from the path.
    loc = [p for p in loc if not (p[:1].islower() and ("[" in p or p in {"str", "int", "float"}))]
    param = ".".join(loc) or None
    msg = str(err["msg"]).removeprefix("Value error, ")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def internal_error(exc: BaseException, message: str, log_message: str) -> ApiError:
    """500 for a fault: logged with its traceback; the client sees only the exception's type."""
    log.exception(log_message, exc_info=exc)
    return ApiError(500, f"{message}: {type(exc).__name__}")


def _invalid_parameter(exc: RequestValidationError) -> ApiError:
    """FastAPI-parsed parameters (query/path); bodies are parsed in routes (`invalid_body`)."""
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return ApiError(400, str(first.get("msg", "invalid request")), param=param)


# ---- the app's handlers ---------------------------------------------------------------------------


def error_response(err: ApiError) -> Response:
    """OpenAI's error shape, with the error's status and headers."""
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


def error_event(err: ApiError) -> str:
    """The SSE event of an error in a stream, whose response headers are gone (as OpenAI and
    vLLM report it)."""
    return f"data: {err.body().model_dump_json()}\n\n"


def install_error_handlers(app: FastAPI, stats: Stats) -> None:
    """Answer every exception a request raises in OpenAI's shape, and count the failures."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        # The one place HTTP errors are counted. Only API errors: a probe's 503 while loading
        # is not a failed request, nor is a client that left (499).
        if exc.status != 499 and request.url.path.startswith("/v1/"):
            stats.error()
        return error_response(exc)

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(_invalid_parameter(exc))

    async def on_http(_: Request, exc: Exception) -> Response:
        # The framework's own refusals (unknown route, wrong method): not counted.
        assert isinstance(exc, StarletteHTTPException)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=exc.status_code))

    async def on_any(_: Request, exc: Exception) -> Response:
        stats.error()
        return error_response(internal_error(exc, "Internal server error", "unhandled error"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_any)
