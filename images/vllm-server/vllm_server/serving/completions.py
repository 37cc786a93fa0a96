"""POST /v1/completions: a prompt's tokens, and the legacy completions' responses and chunks."""

from __future__ import annotations

import time
import uuid

from vllm_server.engine import TokenLogprobs
from vllm_server.errors import ApiError
from vllm_server.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from vllm_server.serving.base import BaseServing, Collected, Prepared, finite
from vllm_server.serving.sse import ChunkFormat


def completion_logprobs(lps: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
    """Legacy completions-format logprobs; text offsets count from `offset`."""
    out = CompletionLogprobs()
    for t in lps:
        out.tokens.append(t.token)
        out.token_logprobs.append(finite(t.logprob))
        out.top_logprobs.append({s: finite(v) for s, v in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


COMPLETION_CHUNK = ChunkFormat(
    object="text_completion",
    first='"text":',
    later='"text":',
    close="",
    # The engine was asked for the request's number of alternatives: all of them go in.
    logprobs=lambda lps, _top: completion_logprobs(lps, 0),
)


class CompletionServing(BaseServing[CompletionRequest, CompletionResponse]):
    """Text completions, whole or streamed."""

    response = CompletionResponse
    chunk = COMPLETION_CHUNK

    def _choice(self, req: CompletionRequest, c: Collected, i: int) -> CompletionChoice:
        """A text choice, with the legacy logprobs when asked for."""
        return CompletionChoice(
            index=i,
            text="".join(c.texts[i]),
            logprobs=completion_logprobs(c.logprobs[i], 0) if req.logprobs is not None else None,
            finish_reason=c.reasons[i],
        )

    async def _prepare(self, req: CompletionRequest) -> Prepared:
        """Prompt -> token ids -> spec."""
        eng = self.state.attached_engine()
        model, lora = self.models.resolve(eng, req.model)
        if req.suffix:
            raise ApiError(400, "suffix is not supported.", param="suffix")
        if req.echo:
            raise ApiError(400, "echo is not supported.", param="echo")
        prompt = req.prompt_value()
        ids = await self.state.off_loop(eng.encode, prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        spec = self._sampling(req, len(ids), req.max_tokens, req.logprobs, "prompt")
        return Prepared(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, lora, ids, spec)
