"""What the generating services share: a request checked against the engine's limits, its run
in the engine (whole or streamed), and its accounting."""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from vllm_server.engine import Delta, EngineOutput, SamplingSpec, TokenLogprobs
from vllm_server.errors import ApiError, engine_failure, error_event, internal_error
from vllm_server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from vllm_server.serving.models import ModelsServing
from vllm_server.serving.sse import DONE, ChunkFormat, EventStream, dumps
from vllm_server.serving.state import ServingState

# The sampling parameters that go from the request to the engine unchanged (validated by the
# request model); the others are worked out in `BaseServing._sampling`.
PASSED_AS_IS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "min_tokens",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
)


@dataclass(slots=True)
class Prepared:
    """A validated request ready for the engine."""

    request_id: str
    created: int
    model: str
    lora: str | None
    prompt_ids: list[int]
    params: SamplingSpec


@dataclass(slots=True)
class Collected:
    """A request run to its end, per choice: text pieces, finish reason, logprobs."""

    texts: list[list[str]]
    reasons: list[str | None]
    logprobs: list[list[TokenLogprobs]]
    tokens: int
    """Generated over all choices."""

    @classmethod
    def empty(cls, n: int) -> Collected:
        """Nothing yet of `n` choices."""
        return cls([[] for _ in range(n)], [None] * n, [[] for _ in range(n)], 0)

    def add(self, d: Delta) -> None:
        """Append one delta to its choice."""
        self.tokens += d.num_tokens
        self.texts[d.index].append(d.text)
        if d.finish_reason is not None:
            self.reasons[d.index] = d.finish_reason
        if d.logprobs:
            self.logprobs[d.index].extend(d.logprobs)


Req = TypeVar("Req", ChatCompletionRequest, CompletionRequest)
Resp = TypeVar("Resp", ChatCompletionResponse, CompletionResponse)


class BaseServing(ABC, Generic[Req, Resp]):
    """Base of the chat and completions services. A subclass prepares its requests (`_prepare`),
    builds one choice of its responses (`_choice`) and names its response type and chunk format;
    creating, streaming, limits and accounting are here."""

    response: type[Resp]
    chunk: ChunkFormat

    def __init__(self, state: ServingState, models: ModelsServing) -> None:
        """Serve on the shared state; `models` resolves a request's model name."""
        self.state = state
        self.models = models

    async def create(self, req: Req) -> Resp:
        """Non-streaming completion."""
        p = await self._prepare(req)
        c = await self._collect(p)
        return self.response(
            id=p.request_id,
            created=p.created,
            model=p.model,
            choices=[self._choice(req, c, i) for i in range(p.params.n)],
            usage=usage(len(p.prompt_ids), c.tokens),
        )

    async def stream(self, req: Req) -> EventStream:
        """Start a streaming completion; returns the SSE event iterator."""
        p = await self._prepare(req)
        return await self._stream(p, req, self.chunk)

    @abstractmethod
    async def _prepare(self, req: Req) -> Prepared:
        """The request's token ids and sampling spec, checked."""

    @abstractmethod
    def _choice(self, req: Req, c: Collected, i: int) -> BaseModel:
        """Choice `i` of the response to `req`, from what the engine produced."""

    # ---- preparation -----------------------------------------------------------------------------

    def _sampling(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_param: str,
    ) -> SamplingSpec:
        """Check lengths against max_model_len and build the sampling spec."""
        mml = self.state.attached_engine().info.max_model_len
        if prompt_len >= mml:
            raise ApiError(
                400,
                f"The prompt is {prompt_len} tokens long, which reaches the "
                f"model's maximum context length of {mml} tokens.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = mml - prompt_len
        elif prompt_len + max_tokens > mml:
            raise ApiError(
                400,
                f"This model's maximum context length is {mml} tokens; "
                f"the prompt has {prompt_len} and max_tokens is {max_tokens}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if req.min_tokens > max_tokens:
            raise ApiError(400, "min_tokens must not exceed max_tokens.", param="min_tokens")
        return SamplingSpec(
            max_tokens=max_tokens,
            stop=tuple(req.stop_list()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            logprobs=logprobs,
            **{name: getattr(req, name) for name in PASSED_AS_IS},
        )

    # ---- running in the engine -----------------------------------------------------------------

    async def _start(self, p: Prepared) -> tuple[AsyncIterator[EngineOutput], EngineOutput]:
        """Submit to the engine and wait for the first output, so that refusals are HTTP errors.

        The caller owns the returned iterator and must close it.
        """
        eng = self.state.attached_engine()
        self.state.admit(p.params.n)
        self.state.stats.started_request()
        gen = eng.generate(p.prompt_ids, p.params, p.request_id, p.lora)
        try:
            first = await anext(gen)
        except BaseException as exc:
            self._finish(p, 0, 0.0, ok=False)
            with contextlib.suppress(Exception):
                await _aclose(gen)
            if isinstance(exc, StopAsyncIteration):
                raise ApiError(500, "The engine produced no output.") from exc
            raise engine_failure(exc) from exc
        return gen, first

    def _finish(self, p: Prepared, tokens: int, t0: float, ok: bool) -> None:
        """Release the queue places and record stats (`t0` only matters when `ok`).

        A failure is not counted as an error here: errors are counted once, where they are
        reported (the app's error handlers, or `_events` for in-band stream errors).
        """
        self.state.inflight -= p.params.n
        if ok:
            self.state.stats.finished_request(len(p.prompt_ids), tokens, time.monotonic() - t0)
        else:
            self.state.stats.failed_request()

    async def _collect(self, p: Prepared) -> Collected:
        """Run a request to the end."""
        t0 = time.monotonic()
        gen, first = await self._start(p)
        c = Collected.empty(p.params.n)
        ok = False
        try:
            async for out in _outputs(first, gen):
                for d in out.deltas:
                    c.add(d)
            ok = True
        except Exception as exc:
            raise engine_failure(exc) from exc
        finally:
            self._finish(p, c.tokens, t0, ok)
            await _aclose(gen)
        return c

    async def _stream(
        self, p: Prepared, req: ChatCompletionRequest | CompletionRequest, fmt: ChunkFormat
    ) -> EventStream:
        """Submit now (errors become HTTP statuses), then stream every delta as an SSE event."""
        t0 = time.monotonic()
        gen, first = await self._start(p)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = self._events(p, gen, first, t0, fmt, include_usage)

        async def never_started() -> None:
            # The client left before the first event: release what `_start` took.
            self._finish(p, 0, t0, True)
            await _aclose(gen)

        return EventStream(events, never_started)

    async def _events(
        self,
        p: Prepared,
        gen: AsyncIterator[EngineOutput],
        first: EngineOutput,
        t0: float,
        fmt: ChunkFormat,
        include_usage: bool,
    ) -> AsyncGenerator[str, None]:
        """The hot loop: one SSE event per delta, JSON assembled from pre-encoded pieces."""
        top = p.params.logprobs  # None: no logprobs asked for
        meta = (
            f'data: {{"id":"{p.request_id}","object":"{fmt.object}","created":{p.created},'
            f'"model":{dumps(p.model)}'
        )
        head = meta + ',"choices":[{"index":'
        n = p.params.n
        heads = [f"{head}{i}," for i in range(n)]
        firsts = [fmt.first] * n
        rest = fmt.later
        close = fmt.close
        tokens = 0
        failed = False
        try:
            async for out in _outputs(first, gen):
                for d in out.deltas:
                    tokens += d.num_tokens
                    reason = d.finish_reason
                    if not d.text and reason is None and not d.logprobs:
                        continue  # nothing to show yet (e.g. a partial UTF-8 sequence)
                    i = d.index
                    lead = firsts[i]
                    if lead is not rest:
                        firsts[i] = rest
                    if top is not None and d.logprobs:
                        lp = dumps(fmt.logprobs(d.logprobs, top).model_dump())
                    else:
                        lp = "null"
                    fin = "null" if reason is None else f'"{reason}"'
                    yield (
                        f'{heads[i]}{lead}{dumps(d.text)}{close},"logprobs":{lp},'
                        f'"finish_reason":{fin}}}]}}\n\n'
                    )
            if include_usage:
                used = usage(len(p.prompt_ids), tokens).model_dump_json()
                yield f'{meta},"choices":[],"usage":{used}}}\n\n'
        except Exception as exc:
            # Headers are gone: report in-band.
            failed = True
            self.state.stats.error()
            err = engine_failure(exc)
            if not isinstance(err, ApiError):
                err = internal_error(exc, "Generation failed", "generation failed")
            yield error_event(err)
        finally:
            # Runs on normal end, engine error, or client disconnect (cancel / aclose):
            # closing the engine iterator aborts the request in the engine. A client that
            # leaves early still counts as a processed request with the tokens it got.
            self._finish(p, tokens, t0, not failed)
            await _aclose(gen)
        yield DONE


async def _outputs(first: EngineOutput, gen: AsyncIterator[EngineOutput]) -> AsyncIterator[EngineOutput]:
    """`first` and the engine's outputs after it, up to the finished one."""
    yield first
    if not first.finished:
        async for out in gen:
            yield out
            if out.finished:
                return


async def _aclose(gen: AsyncIterator[EngineOutput]) -> None:
    """Close an engine iterator if it supports it."""
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()


def usage(prompt: int, completion: int) -> UsageInfo:
    """Usage block."""
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def finite(v: float) -> float:
    """JSON has no -inf; OpenAI clients expect a number."""
    return v if v > -9999.0 else -9999.0
