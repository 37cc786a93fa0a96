"""OpenAI-shaped errors, the one place the router builds them (same shape as the bundled server);
the client's `message_of` reads them (and the pods')."""

from __future__ import annotations

import json

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    502: "server_error",
    503: "service_unavailable_error",
}


def body(status: int, message: str, param: str | None = None) -> bytes:
    """`{"error": {message, type, param, code}}` as bytes."""
    error = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": status}
    return json.dumps({"error": error}).encode()


def sse_event(status: int, message: str) -> bytes:
    """The last event of a stream that broke after its first byte: clients see an error, not a cut."""
    return b"data: " + body(status, message) + b"\n\ndata: [DONE]\n\n"


def model_not_found(name: str) -> tuple[int, bytes]:
    return 404, body(404, f"The model `{name}` does not exist.", "model")


def no_model(detail: str) -> tuple[int, bytes]:
    return 400, body(400, f"{detail}: send a JSON object with a string field `model`", "model")


def no_ready_pod(name: str) -> tuple[int, bytes]:
    return 503, body(503, f"no ready pod serves model `{name}` yet; retry shortly")


def upstream_failed(name: str, attempts: int) -> tuple[int, bytes]:
    return 502, body(502, f"model `{name}`: {attempts} pod(s) failed before answering; retry shortly")


def woke_too_late(name: str, seconds: float) -> tuple[int, bytes]:
    return 503, body(
        503, f"model `{name}` is waking from zero and had no ready pod within {seconds:g}s; retry shortly"
    )


def loading() -> tuple[int, bytes]:
    return 503, body(503, "the router is still loading its list of models; retry shortly")
