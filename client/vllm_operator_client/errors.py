"""Exceptions of the client: connection problems and OpenAI-shaped API errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class ClientError(Exception):
    """Base of every error the client raises."""


class APIConnectionError(ClientError):
    """The server could not be reached, or the connection broke."""

    def __init__(self, message: str, *, url: str | None = None) -> None:
        """Describe the failure and where it happened."""
        super().__init__(message)
        self.message = message
        self.url = url


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class StreamInterruptedError(APIConnectionError):
    """The connection broke after some chunks had arrived; not retried (output would repeat)."""

    def __init__(self, message: str, *, url: str | None = None, chunks: int = 0, text: str = "") -> None:
        """Keep what arrived before the break."""
        super().__init__(message, url=url)
        self.chunks = chunks
        self.text = text


class APIError(ClientError):
    """An error the server reported in OpenAI's shape: message, type, param, code."""

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        body: Any = None,
        url: str | None = None,
        status: int | None = None,
    ) -> None:
        """Carry the OpenAI error fields and the raw body."""
        super().__init__(f"{status} {message}" if status else message)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.url = url
        self.status = status


class APIStatusError(APIError):
    """An HTTP response with a 4xx or 5xx status."""

    status: int

    def __init__(
        self, message: str, *, status: int, headers: Mapping[str, str] | None = None, **fields: Any
    ) -> None:
        """Also keep the status and the response headers."""
        super().__init__(message, status=status, **fields)
        self.headers = dict(headers or {})


class BadRequestError(APIStatusError):
    """400."""


class AuthenticationError(APIStatusError):
    """401."""


class PermissionDeniedError(APIStatusError):
    """403."""


class NotFoundError(APIStatusError):
    """404."""


class UnprocessableEntityError(APIStatusError):
    """422."""


class RateLimitError(APIStatusError):
    """429."""


class InternalServerError(APIStatusError):
    """5xx."""


class APIStreamError(APIError):
    """An error event sent inside a stream after the 200 headers."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def error_fields(body: Any, fallback: str) -> dict[str, Any]:
    """message/type/param/code from an OpenAI error body (or a plain text one)."""
    inner = body.get("error") if isinstance(body, dict) else None
    if isinstance(inner, dict):
        return {
            "message": str(inner.get("message") or fallback),
            "type": inner.get("type"),
            "param": inner.get("param"),
            "code": inner.get("code"),
        }
    if isinstance(body, dict) and "detail" in body:  # FastAPI's default shape
        return {"message": str(body["detail"]), "type": None, "param": None, "code": None}
    if isinstance(body, dict) and "message" in body:  # Kubernetes' Status and other plain shapes
        return {"message": str(body["message"]), "type": None, "param": None, "code": None}
    text = body if isinstance(body, str) and body else fallback
    return {"message": text, "type": None, "param": None, "code": None}


def message_of(body: bytes, limit: int | None = None) -> str:
    """The message of an error body (OpenAI's shape, FastAPI's, `{"message"}` or plain text),
    cut at `limit` characters; unclipped by default, for a caller that redacts first."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        message = text
    else:
        message = str(error_fields(parsed, text)["message"])
    return message if limit is None else message[:limit]


def status_error(
    status: int, body: Any, headers: Mapping[str, str] | None = None, url: str | None = None
) -> APIStatusError:
    """The exception for an HTTP error status and its body."""
    cls = _BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    fields = error_fields(body, f"HTTP {status}")
    message = fields.pop("message")
    return cls(message, status=status, headers=headers, body=body, url=url, **fields)


def stream_error(body: Any, url: str | None = None) -> APIStreamError:
    """The exception for an in-band error event."""
    fields = error_fields(body, "error event in the stream")
    message = fields.pop("message")
    return APIStreamError(message, body=body, url=url, **fields)
