"""Client of vLLM OpenAI-compatible servers: async and sync, retries, failover, metrics."""

from vllm_operator.client._core import BatchResult, Result, StreamChunk, Usage
from vllm_operator.client.async_client import AsyncClient, AsyncStream
from vllm_operator.client.endpoints import EndpointPool
from vllm_operator.client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APIStreamError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StreamInterruptedError,
    UnprocessableEntityError,
)
from vllm_operator.client.metrics import BatchMetrics, RequestMetrics
from vllm_operator.client.retry import RetryPolicy
from vllm_operator.client.sync_client import Client, Stream

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APIStreamError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "BatchMetrics",
    "BatchResult",
    "Client",
    "ClientError",
    "EndpointPool",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestMetrics",
    "Result",
    "RetryPolicy",
    "Stream",
    "StreamChunk",
    "StreamInterruptedError",
    "UnprocessableEntityError",
    "Usage",
]
