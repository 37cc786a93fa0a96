"""What every endpoint service shares: the engine once it is attached, and what limits it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from vllm_server.engine import Engine
from vllm_server.errors import ApiError
from vllm_server.settings import Settings
from vllm_server.stats import Stats

# The default body limit: what a prompt of max_model_len tokens can need as JSON. A token is
# at most ~8 bytes as an id ("151643,") and ~4 as text, up to ~12 when a client escapes
# non-ASCII as \uXXXX; 32 leaves room, and 1 MiB covers the rest of a request (many messages,
# sampling fields). 128k-token context: 5 MiB.
BODY_BYTES_PER_TOKEN = 32
BODY_BYTES_BASE = 1 << 20

P = ParamSpec("P")
R = TypeVar("R")


class ServingState:
    """Settings, stats, the engine (attached once it is built), the bounded queue's count, and
    the thread that prepares requests."""

    def __init__(self, settings: Settings, stats: Stats | None = None) -> None:
        """Start without an engine: /health answers 503 until `attach`."""
        self.settings = settings
        self.stats = stats or Stats()
        self.engine: Engine | None = None
        self.inflight = 0  # admitted requests (n counts n), for the bounded queue
        # Chat templating and tokenizing run here, off the event loop: a 1 MB prompt held the
        # loop (and every stream and /health) for ~1 s. One thread, as vLLM's own server
        # does: a tokenizer is not meant for concurrent use, and it bounds the CPU taken.
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-server-prep")

    def attach(self, engine: Engine) -> None:
        """Start serving with this engine."""
        self.engine = engine

    def close(self) -> None:
        """Stop the preparation thread (work it is running finishes on its own)."""
        self._prep.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        """True once an engine is attached."""
        return self.engine is not None

    async def healthy(self) -> bool:
        """Engine attached and alive."""
        return self.engine is not None and await self.engine.check_health()

    def attached_engine(self) -> Engine:
        """The engine, or 503 while it is starting."""
        if self.engine is None:
            raise ApiError(
                503, "The model is still loading.", code="engine_starting", headers={"Retry-After": "5"}
            )
        return self.engine

    def max_model_len(self) -> int | None:
        """From the engine once loaded (it may derive it), else from the flags."""
        return self.engine.info.max_model_len if self.engine else self.settings.max_model_len

    def body_limit(self) -> int:
        """Largest request body accepted, in bytes (503 while the default is not yet known)."""
        if self.settings.max_request_body_bytes is not None:
            return self.settings.max_request_body_bytes
        return BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * self.attached_engine().info.max_model_len

    def admit(self, n: int) -> None:
        """Take `n` places in the bounded queue; 503 + Retry-After beyond running batch + queue."""
        eng = self.attached_engine()
        limit = eng.info.max_num_seqs + self.settings.max_queued_requests
        if self.inflight + n > limit:
            raise ApiError(
                503, "The server is overloaded; retry later.", code="queue_full", headers={"Retry-After": "1"}
            )
        self.inflight += n

    async def off_loop(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run CPU-heavy request preparation in the preparation thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, lambda: fn(*args, **kwargs))
