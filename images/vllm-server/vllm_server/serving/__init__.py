"""OpenAI protocol <-> engine, one service per endpoint family. Routes hand in parsed requests:
no web framework is used here.

`state` (engine, bounded queue, preparation thread) is shared by `models` (model names,
adapters, info) and by the generating services, `chat` and `completions`, over `base` (limits,
the engine loop, accounting); `sse` spells their streams.
"""

from __future__ import annotations

from vllm_server.protocol import ChatCompletionRequest, CompletionRequest
from vllm_server.serving.chat import ChatServing
from vllm_server.serving.completions import CompletionServing
from vllm_server.serving.models import ModelsServing
from vllm_server.serving.sse import EventStream
from vllm_server.serving.state import BODY_BYTES_BASE, BODY_BYTES_PER_TOKEN, ServingState
from vllm_server.settings import Settings
from vllm_server.stats import Stats

__all__ = ["BODY_BYTES_BASE", "BODY_BYTES_PER_TOKEN", "EventStream", "Serving"]


class Serving(ServingState):
    """A server's shared state and its services; what the app and its routes hold."""

    def __init__(self, settings: Settings, stats: Stats | None = None) -> None:
        """Start without an engine: /health answers 503 until `attach`."""
        super().__init__(settings, stats)
        self.models = ModelsServing(self)
        self.chat = ChatServing(self, self.models)
        self.completions = CompletionServing(self, self.models)

    async def chat_stream(self, req: ChatCompletionRequest) -> EventStream:
        """Start a streaming chat completion (`chat.stream`)."""
        return await self.chat.stream(req)

    async def completion_stream(self, req: CompletionRequest) -> EventStream:
        """Start a streaming text completion (`completions.stream`)."""
        return await self.completions.stream(req)
