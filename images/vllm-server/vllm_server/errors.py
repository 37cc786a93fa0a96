"""The one error type the serving layer raises; the app turns it into OpenAI's error shape."""

from __future__ import annotations

from vllm_server.protocol import ErrorInfo, ErrorResponse

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


def model_not_found(name: str) -> ApiError:
    """404 for an unknown model (OpenAI's wording and code)."""
    return ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
