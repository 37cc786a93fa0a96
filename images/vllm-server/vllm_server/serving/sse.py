"""Server-sent events: how an endpoint spells its chunks, and the stream a route sends."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from vllm_server.engine import TokenLogprobs

dumps = json.JSONEncoder(ensure_ascii=False).encode  # C encoder, no per-call setup
DONE = "data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ChunkFormat:
    """The pieces of an endpoint's stream chunk; the streaming loop splices text between them.

    A choice's event reads `..."index":I,` + `first` (or `later` after its first event) +
    the JSON text + `close` + `,"logprobs":...,"finish_reason":...}]}`.
    """

    object: str
    """The chunk's `object`."""
    first: str
    """Opens a choice's first delta."""
    later: str
    """Opens each later delta."""
    close: str
    """Closes a delta."""
    logprobs: Callable[[list[TokenLogprobs], int], BaseModel]
    """The endpoint's logprobs block for a delta's tokens, given how many alternatives were asked."""


class EventStream:
    """SSE events; closing it releases the request even if iteration never started.

    (A bare async generator that was never started skips its `finally` on aclose().)
    """

    __slots__ = ("_agen", "_cleanup", "_started")

    def __init__(self, agen: AsyncGenerator[str, None], cleanup: Callable[[], Awaitable[None]]) -> None:
        """Wrap the event generator and the cleanup for the never-started case."""
        self._agen = agen
        self._cleanup = cleanup
        self._started = False

    def __aiter__(self) -> EventStream:
        """Iterate over events."""
        return self

    async def __anext__(self) -> str:
        """Next SSE event."""
        self._started = True
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        """Stop: abort the engine request if it is still running."""
        if not self._started:
            self._started = True
            await self._cleanup()
        await self._agen.aclose()
