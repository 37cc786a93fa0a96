"""OpenAI protocol <-> engine. No web framework here: routes hand in parsed requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from vllm_server import __version__
from vllm_server.engine import (
    Engine,
    EngineDeadError,
    EngineInputError,
    EngineOutput,
    EngineOverloadedError,
    SamplingSpec,
    TokenLogprobs,
)
from vllm_server.errors import ApiError, model_not_found
from vllm_server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    InfoResponse,
    LoadLoraAdapterRequest,
    LoraAdapterInfo,
    ModelCard,
    ModelList,
    StatsResponse,
    TokenLogprob,
    TopLogprob,
    UnloadLoraAdapterRequest,
    UsageInfo,
)
from vllm_server.settings import Settings
from vllm_server.stats import Stats

log = logging.getLogger(__name__)

_dumps = json.JSONEncoder(ensure_ascii=False).encode  # C encoder, no per-call setup
DONE = "data: [DONE]\n\n"

# The default body limit: what a prompt of max_model_len tokens can need as JSON. A token is
# at most ~8 bytes as an id ("151643,") and ~4 as text, up to ~12 when a client escapes
# non-ASCII as \uXXXX; 32 leaves room, and 1 MiB covers the rest of a request (many messages,
# sampling fields). 128k-token context: 5 MiB.
BODY_BYTES_PER_TOKEN = 32
BODY_BYTES_BASE = 1 << 20

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(slots=True)
class _Prepared:
    """A validated request ready for the engine."""

    request_id: str
    created: int
    model: str
    lora: str | None
    prompt_ids: list[int]
    params: SamplingSpec


class Serving:
    """Implements the endpoints on top of an `Engine` (attached once it is built)."""

    def __init__(self, settings: Settings, stats: Stats | None = None) -> None:
        """Start without an engine: /health answers 503 until `attach`."""
        self.settings = settings
        self.stats = stats or Stats()
        self.engine: Engine | None = None
        self.inflight = 0  # admitted requests (n counts n), for the bounded queue
        self._base_names = set(settings.model_names)
        # Chat templating and tokenizing run here, off the event loop: a 1 MB prompt held the
        # loop (and every stream and /health) for ~1 s. One thread, as vLLM's own server
        # does: a tokenizer is not meant for concurrent use, and it bounds the CPU taken.
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-server-prep")
        # Adapter changes one at a time: two concurrent loads of a name both passed the
        # "already loaded" check and left two copies in the engine.
        self._adapter_lock = asyncio.Lock()

    # ---- lifecycle -------------------------------------------------------------------------

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

    def _engine(self) -> Engine:
        """The engine, or 503 while it is starting."""
        if self.engine is None:
            raise ApiError(
                503, "The model is still loading.", code="engine_starting", headers={"Retry-After": "5"}
            )
        return self.engine

    async def healthy(self) -> bool:
        """Engine attached and alive."""
        return self.engine is not None and await self.engine.check_health()

    def body_limit(self) -> int:
        """Largest request body accepted, in bytes (503 while the default is not yet known)."""
        if self.settings.max_request_body_bytes is not None:
            return self.settings.max_request_body_bytes
        return BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * self._engine().info.max_model_len

    async def _off_loop(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run CPU-heavy request preparation in the preparation thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, lambda: fn(*args, **kwargs))

    # ---- models, info, stats -----------------------------------------------------------------

    def _max_model_len(self) -> int | None:
        """From the engine once loaded (it may derive it), else from the flags."""
        return self.engine.info.max_model_len if self.engine else self.settings.max_model_len

    def models(self) -> ModelList:
        """Base model name(s) and loaded LoRA adapters."""
        mml = self._max_model_len()
        cards = [
            ModelCard(id=name, root=self.settings.model, max_model_len=mml)
            for name in self.settings.model_names
        ]
        if self.engine is not None:
            parent = self.settings.model_name
            cards += [
                ModelCard(id=name, root=a.path, parent=parent, max_model_len=mml)
                for name, a in self.engine.lora_adapters().items()
            ]
        return ModelList(data=cards)

    def info(self) -> InfoResponse:
        """Deployment facts for operators and humans."""
        s = self.settings
        eng = self.engine
        return InfoResponse(
            model=s.model,
            served_model_name=s.model_name,
            max_model_len=self._max_model_len(),
            gpus=s.tensor_parallel_size * s.pipeline_parallel_size,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            dtype=eng.info.dtype if eng else s.dtype,
            gpu_memory_utilization=s.gpu_memory_utilization,
            quantization=(eng.info.quantization if eng else None) or s.quantization,
            kv_cache_dtype=(eng.info.kv_cache_dtype if eng else None) or s.kv_cache_dtype,
            lora_adapters=sorted(eng.lora_adapters()) if eng else [],
            engine_ready=eng is not None,
            version=__version__,
        )

    def stats_snapshot(self) -> StatsResponse:
        """Body of /v1/stats."""
        return self.stats.snapshot()

    # ---- LoRA ----------------------------------------------------------------------------------

    def lora_adapters(self) -> list[LoraAdapterInfo]:
        """Loaded adapters."""
        eng = self._engine()
        return [LoraAdapterInfo(name=n, path=a.path, id=a.id) for n, a in eng.lora_adapters().items()]

    async def load_lora(self, req: LoadLoraAdapterRequest) -> str:
        """Load an adapter; its name becomes a model name."""
        eng = self._engine()
        if not self.settings.lora_enabled:
            raise ApiError(
                400,
                "LoRA is not enabled; start the server with --enable-lora.",
                param="lora_name",
                code="lora_disabled",
            )
        if req.lora_name in self._base_names:
            raise ApiError(400, f"`{req.lora_name}` is the base model's name.", param="lora_name")
        async with self._adapter_lock:
            if req.lora_name in eng.lora_adapters():
                raise ApiError(
                    400,
                    f"The LoRA adapter `{req.lora_name}` has already been loaded.",
                    param="lora_name",
                    code="lora_already_loaded",
                )
            try:
                await eng.add_lora(req.lora_name, req.lora_path)
            except EngineInputError as exc:
                raise ApiError(400, str(exc), param="lora_path") from exc
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    async def unload_lora(self, req: UnloadLoraAdapterRequest) -> str:
        """Unload an adapter; its name is then an unknown model."""
        eng = self._engine()
        async with self._adapter_lock:
            if req.lora_name not in eng.lora_adapters():
                raise ApiError(
                    404,
                    f"The LoRA adapter `{req.lora_name}` is not loaded.",
                    param="lora_name",
                    code="lora_not_found",
                )
            await eng.remove_lora(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    # ---- shared request preparation ---------------------------------------------------------

    def _resolve_model(self, eng: Engine, name: str | None) -> tuple[str, str | None]:
        """(name to report, LoRA adapter or None); unknown names are 404."""
        if name is None or name in self._base_names:
            return name or self.settings.model_name, None
        if name in eng.lora_adapters():
            return name, name
        raise model_not_found(name)

    def _admit(self, n: int) -> None:
        """Bounded queue: refuse with 503 + Retry-After beyond running batch + queue."""
        eng = self._engine()
        limit = eng.info.max_num_seqs + self.settings.max_queued_requests
        if self.inflight + n > limit:
            raise ApiError(
                503, "The server is overloaded; retry later.", code="queue_full", headers={"Retry-After": "1"}
            )

    def _spec(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        prompt_len: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_param: str,
    ) -> SamplingSpec:
        """Check lengths against max_model_len and build the sampling spec."""
        mml = self._engine().info.max_model_len
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
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            min_tokens=req.min_tokens,
            stop=tuple(req.stop_list()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            n=req.n,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )

    async def _prepare_chat(self, req: ChatCompletionRequest) -> _Prepared:
        """Chat template -> token ids -> spec."""
        eng = self._engine()
        model, lora = self._resolve_model(eng, req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self._off_loop(_chat_ids, eng, messages, req.add_generation_prompt)
        top = (req.top_logprobs or 0) if req.logprobs else None
        spec = self._spec(req, len(ids), req.max_completion_tokens or req.max_tokens, top, "messages")
        return _Prepared(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, lora, ids, spec)

    async def _prepare_completion(self, req: CompletionRequest) -> _Prepared:
        """Prompt -> token ids -> spec."""
        eng = self._engine()
        model, lora = self._resolve_model(eng, req.model)
        if req.suffix:
            raise ApiError(400, "suffix is not supported.", param="suffix")
        if req.echo:
            raise ApiError(400, "echo is not supported.", param="echo")
        prompt = req.prompt_value()
        ids = await self._off_loop(eng.encode, prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise ApiError(400, "The prompt is empty.", param="prompt")
        spec = self._spec(req, len(ids), req.max_tokens, req.logprobs, "prompt")
        return _Prepared(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, lora, ids, spec)

    async def _start(self, p: _Prepared) -> tuple[AsyncIterator[EngineOutput], EngineOutput]:
        """Submit to the engine and wait for the first output, so that refusals are HTTP errors.

        The caller owns the returned iterator and must close it.
        """
        eng = self._engine()
        self._admit(p.params.n)
        self.inflight += p.params.n
        self.stats.started_request()
        gen = eng.generate(p.prompt_ids, p.params, p.request_id, p.lora)
        try:
            first = await anext(gen)
        except BaseException as exc:
            self._finish(p, 0, 0.0, ok=False)
            with contextlib.suppress(Exception):
                await _aclose(gen)
            if isinstance(exc, StopAsyncIteration):
                raise ApiError(500, "The engine produced no output.") from exc
            raise _engine_error(exc) from exc
        return gen, first

    def _finish(self, p: _Prepared, tokens: int, t0: float, ok: bool) -> None:
        """Release the queue slot and record stats (`t0` only matters when `ok`).

        A failure is not counted as an error here: errors are counted once, where they are
        reported (the app's HTTP error handlers, or `_events` for in-band stream errors).
        """
        self.inflight -= p.params.n
        if ok:
            self.stats.finished_request(len(p.prompt_ids), tokens, time.monotonic() - t0)
        else:
            self.stats.failed_request()

    # ---- non-streaming ----------------------------------------------------------------------------

    async def _collect(
        self, p: _Prepared
    ) -> tuple[list[list[str]], list[str | None], list[list[TokenLogprobs]], int]:
        """Run a request to the end: text pieces, finish reasons, logprobs, token count."""
        t0 = time.monotonic()
        gen, out = await self._start(p)
        n = p.params.n
        texts: list[list[str]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        lps: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        tokens = 0
        ok = False
        try:
            while True:
                for d in out.deltas:
                    tokens += d.num_tokens
                    texts[d.index].append(d.text)
                    if d.finish_reason is not None:
                        reasons[d.index] = d.finish_reason
                    if d.logprobs:
                        lps[d.index].extend(d.logprobs)
                if out.finished:
                    break
                try:
                    out = await anext(gen)
                except StopAsyncIteration:
                    break
            ok = True
        except Exception as exc:
            raise _engine_error(exc) from exc
        finally:
            self._finish(p, tokens, t0, ok)
            await _aclose(gen)
        return texts, reasons, lps, tokens

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        """Non-streaming chat completion."""
        p = await self._prepare_chat(req)
        texts, reasons, lps, tokens = await self._collect(p)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(texts[i])),
                logprobs=_chat_logprobs(lps[i], req.top_logprobs or 0) if req.logprobs else None,
                finish_reason=reasons[i],
            )
            for i in range(p.params.n)
        ]
        return ChatCompletionResponse(
            id=p.request_id,
            created=p.created,
            model=p.model,
            choices=choices,
            usage=_usage(len(p.prompt_ids), tokens),
        )

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        """Non-streaming text completion."""
        p = await self._prepare_completion(req)
        texts, reasons, lps, tokens = await self._collect(p)
        choices = [
            CompletionChoice(
                index=i,
                text="".join(texts[i]),
                logprobs=_completion_logprobs(lps[i], 0) if req.logprobs is not None else None,
                finish_reason=reasons[i],
            )
            for i in range(p.params.n)
        ]
        return CompletionResponse(
            id=p.request_id,
            created=p.created,
            model=p.model,
            choices=choices,
            usage=_usage(len(p.prompt_ids), tokens),
        )

    # ---- streaming -----------------------------------------------------------------------------------

    async def chat_stream(self, req: ChatCompletionRequest) -> EventStream:
        """Start a streaming chat completion; returns the SSE event iterator."""
        p = await self._prepare_chat(req)
        return await self._stream(p, req, chat=True)

    async def completion_stream(self, req: CompletionRequest) -> EventStream:
        """Start a streaming text completion; returns the SSE event iterator."""
        p = await self._prepare_completion(req)
        return await self._stream(p, req, chat=False)

    async def _stream(
        self, p: _Prepared, req: ChatCompletionRequest | CompletionRequest, *, chat: bool
    ) -> EventStream:
        """Submit now (errors become HTTP statuses), then stream every delta as an SSE event."""
        t0 = time.monotonic()
        gen, first = await self._start(p)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = self._events(p, gen, first, t0, chat, include_usage)

        async def never_started() -> None:
            # The client left before the first event: release what `_start` took.
            self._finish(p, 0, t0, True)
            await _aclose(gen)

        return EventStream(events, never_started)

    async def _events(
        self,
        p: _Prepared,
        gen: AsyncIterator[EngineOutput],
        out: EngineOutput,
        t0: float,
        chat: bool,
        include_usage: bool,
    ) -> AsyncGenerator[str, None]:
        """The hot loop: one SSE event per delta, JSON assembled from pre-encoded pieces."""
        # Chat: top_logprobs (or 0) when logprobs is on; completions' number is not used.
        top = p.params.logprobs
        obj = "chat.completion.chunk" if chat else "text_completion"
        meta = (
            f'data: {{"id":"{p.request_id}","object":"{obj}","created":{p.created},"model":{_dumps(p.model)}'
        )
        head = meta + ',"choices":[{"index":'
        n = p.params.n
        heads = [f"{head}{i}," for i in range(n)]
        if chat:
            # The role goes with each choice's first delta (saves an event per request).
            firsts = ['"delta":{"role":"assistant","content":'] * n
            rest = '"delta":{"content":'
            close = "}"
        else:
            firsts = ['"text":'] * n
            rest = '"text":'
            close = ""
        tokens = 0
        failed = False
        try:
            while True:
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
                        lp = (
                            _dumps(_chat_logprobs(d.logprobs, top).model_dump())
                            if chat
                            else _dumps(_completion_logprobs(d.logprobs, 0).model_dump())
                        )
                    else:
                        lp = "null"
                    fin = "null" if reason is None else f'"{reason}"'
                    yield (
                        f'{heads[i]}{lead}{_dumps(d.text)}{close},"logprobs":{lp},'
                        f'"finish_reason":{fin}}}]}}\n\n'
                    )
                if out.finished:
                    break
                try:
                    out = await anext(gen)
                except StopAsyncIteration:
                    break
            if include_usage:
                usage = _usage(len(p.prompt_ids), tokens).model_dump_json()
                yield f'{meta},"choices":[],"usage":{usage}}}\n\n'
        except Exception as exc:
            # Headers are gone: report in-band, as OpenAI and vLLM do.
            failed = True
            self.stats.error()
            err = _engine_error(exc)
            if not isinstance(err, ApiError):
                log.exception("generation failed", exc_info=exc)
                err = ApiError(500, f"Generation failed: {type(exc).__name__}")
            yield f"data: {err.body().model_dump_json()}\n\n"
        finally:
            # Runs on normal end, engine error, or client disconnect (cancel / aclose):
            # closing the engine iterator aborts the request in the engine. A client that
            # leaves early still counts as a processed request with the tokens it got.
            self._finish(p, tokens, t0, not failed)
            await _aclose(gen)
        yield DONE


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


async def _aclose(gen: AsyncIterator[EngineOutput]) -> None:
    """Close an engine iterator if it supports it."""
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()


def _engine_error(exc: BaseException) -> BaseException:
    """Map engine exceptions to ApiError; leave others (and cancellation) alone."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EngineInputError):
        return ApiError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return ApiError(
            503,
            str(exc) or "The engine is overloaded; retry later.",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineDeadError):
        return ApiError(500, f"The engine failed: {exc}", code="engine_dead")
    return exc


def _chat_ids(
    eng: Engine,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
) -> list[int]:
    """Apply the chat template and tokenize (in the preparation thread)."""
    try:
        text = eng.render_chat(messages, add_generation_prompt)
    except Exception as exc:  # template errors (e.g. roles a template refuses) are input
        raise ApiError(400, f"Cannot apply the chat template: {exc}", param="messages") from exc
    # The template already carries special tokens such as BOS.
    return eng.encode(text, add_special_tokens=False)


def _usage(prompt: int, completion: int) -> UsageInfo:
    """Usage block."""
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chat_logprobs(lps: list[TokenLogprobs], top: int) -> ChatLogprobs:
    """Chat-format logprobs."""
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=t.token,
                logprob=_finite(t.logprob),
                bytes=list(t.token.encode()),
                top_logprobs=[
                    TopLogprob(token=s, logprob=_finite(v), bytes=list(s.encode())) for s, v in t.top[:top]
                ],
            )
            for t in lps
        ]
    )


def _completion_logprobs(lps: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
    """Legacy completions-format logprobs."""
    out = CompletionLogprobs()
    for t in lps:
        out.tokens.append(t.token)
        out.token_logprobs.append(_finite(t.logprob))
        out.top_logprobs.append({s: _finite(v) for s, v in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


def _finite(v: float) -> float:
    """JSON has no -inf; OpenAI clients expect a number."""
    return v if v > -9999.0 else -9999.0
