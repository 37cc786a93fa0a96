"""Client of vLLM OpenAI-compatible servers: async and sync, retries, failover, metrics.

Its own distribution (`pip install ./client`): httpx is its one dependency, and it imports
nothing of the operator (an import-linter contract)."""

__version__ = "0.1.0"

from vllm_operator_client._core import BatchResult, Result, StreamChunk, Usage
from vllm_operator_client.async_client import AsyncClient, AsyncStream
from vllm_operator_client.endpoints import EndpointPool
from vllm_operator_client.errors import (
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
from vllm_operator_client.metrics import BatchMetrics, RequestMetrics
from vllm_operator_client.retry import RetryPolicy
from vllm_operator_client.sync_client import Client, Stream

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
