"""POST /v1/chat/completions: the chat template, and chat's responses and chunks."""

from __future__ import annotations

import time
import uuid

from vllm_server.engine import Engine, TokenLogprobs
from vllm_server.errors import ApiError
from vllm_server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    TokenLogprob,
    TopLogprob,
)
from vllm_server.serving.base import BaseServing, Collected, Prepared, finite
from vllm_server.serving.sse import ChunkFormat


def chat_logprobs(lps: list[TokenLogprobs], top: int) -> ChatLogprobs:
    """Chat-format logprobs, with up to `top` alternatives per token."""
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=t.token,
                logprob=finite(t.logprob),
                bytes=list(t.token.encode()),
                top_logprobs=[
                    TopLogprob(token=s, logprob=finite(v), bytes=list(s.encode())) for s, v in t.top[:top]
                ],
            )
            for t in lps
        ]
    )


CHAT_CHUNK = ChunkFormat(
    object="chat.completion.chunk",
    # The role goes with each choice's first delta (saves an event per request).
    first='"delta":{"role":"assistant","content":',
    later='"delta":{"content":',
    close="}",
    logprobs=chat_logprobs,
)


class ChatServing(BaseServing[ChatCompletionRequest, ChatCompletionResponse]):
    """Chat completions, whole or streamed."""

    response = ChatCompletionResponse
    chunk = CHAT_CHUNK

    def _choice(self, req: ChatCompletionRequest, c: Collected, i: int) -> ChatChoice:
        """A chat choice: the message, and its logprobs when asked for."""
        return ChatChoice(
            index=i,
            message=AssistantMessage(content="".join(c.texts[i])),
            logprobs=chat_logprobs(c.logprobs[i], req.top_logprobs or 0) if req.logprobs else None,
            finish_reason=c.reasons[i],
        )

    async def _prepare(self, req: ChatCompletionRequest) -> Prepared:
        """Chat template -> token ids -> spec."""
        eng = self.state.attached_engine()
        model, lora = self.models.resolve(eng, req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self.state.off_loop(_chat_ids, eng, messages, req.add_generation_prompt)
        top = (req.top_logprobs or 0) if req.logprobs else None
        spec = self._sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, top, "messages")
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, lora, ids, spec)


def _chat_ids(eng: Engine, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Apply the chat template and tokenize (in the preparation thread)."""
    try:
        text = eng.render_chat(messages, add_generation_prompt)
    except Exception as exc:  # template errors (e.g. roles a template refuses) are input
        raise ApiError(400, f"Cannot apply the chat template: {exc}", param="messages") from exc
    # The template already carries special tokens such as BOS.
    return eng.encode(text, add_special_tokens=False)
