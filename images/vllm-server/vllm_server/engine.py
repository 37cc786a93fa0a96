"""The engine seam: a small Protocol the server needs, and its vLLM AsyncLLM implementation.

Everything vLLM-specific is imported lazily inside `VllmEngine` so unit tests (and
`--help`) run without vLLM installed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vllm_server.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Engine-neutral sampling parameters (mapped to vLLM's SamplingParams)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass(slots=True)
class TokenLogprobs:
    """Log probability of one sampled token and its top alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class Delta:
    """What one choice produced since the previous output (text and token ids)."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class EngineOutput:
    """One step's output of a request: a delta per choice that moved."""

    deltas: list[Delta]
    finished: bool


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A loaded LoRA adapter: where it came from and the engine's id for it."""

    path: str
    id: int


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Static facts about the loaded engine."""

    max_model_len: int
    max_num_seqs: int
    dtype: str
    quantization: str | None = None
    kv_cache_dtype: str | None = None


class EngineError(Exception):
    """Base of errors the engine reports to the server."""


class EngineInputError(EngineError):
    """The engine refused a request's input or parameters (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        """`param`: the request field at fault, when known."""
        super().__init__(message)
        self.param = param


class EngineOverloadedError(EngineError):
    """The engine's own admission control refused the request (HTTP 503)."""


class EngineDeadError(EngineError):
    """The engine died; the server cannot serve any more (HTTP 500, unhealthy)."""


class Engine(Protocol):
    """What the server needs from an inference engine."""

    @property
    def info(self) -> EngineInfo:
        """Static facts about the engine."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize text."""
        ...

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Apply the tokenizer's chat template."""
        ...

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingSpec,
        request_id: str,
        lora_name: str | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream a request's outputs; closing the iterator aborts the request."""
        ...

    async def add_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter under a name."""
        ...

    async def remove_lora(self, name: str) -> None:
        """Unload a LoRA adapter."""
        ...

    def lora_adapters(self) -> dict[str, LoraAdapter]:
        """Loaded adapters by name (the engine assigns their ids)."""
        ...

    async def check_health(self) -> bool:
        """True while the engine can serve."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
        ...


class VllmEngine:
    """`Engine` on vLLM's v1 AsyncLLM."""

    def __init__(self, llm: Any) -> None:
        """Wrap an already-built AsyncLLM."""
        from vllm.inputs.engine import tokens_input
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        self._llm = llm
        self._tokens_input = tokens_input
        self._lora_request = LoRARequest
        self._sampling_params = SamplingParams
        self._delta_kind = RequestOutputKind.DELTA
        self._tokenizer = llm.get_tokenizer()
        self._loras: dict[str, Any] = {}  # name -> LoRARequest
        self._lora_ids = itertools.count(1)
        mc, sc, cc = llm.model_config, llm.scheduler_config, llm.vllm_config.cache_config
        self._info = EngineInfo(
            max_model_len=int(mc.max_model_len),
            max_num_seqs=int(sc.max_num_seqs),
            dtype=str(mc.dtype).removeprefix("torch."),
            quantization=mc.quantization,
            kv_cache_dtype=str(cc.cache_dtype),
        )
        self._errors = _VllmErrors()

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> VllmEngine:
        """Build AsyncLLM from a vLLM command line (blocking: seconds to minutes)."""
        from vllm.v1.engine.async_llm import AsyncLLM

        return cls(AsyncLLM.from_engine_args(engine_args_from_argv(argv)))

    @property
    def info(self) -> EngineInfo:
        """Static facts about the engine."""
        return self._info

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize with the model's tokenizer."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """Apply the tokenizer's chat template to text messages."""
        out = self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(out)

    def _params(self, p: SamplingSpec) -> Any:
        """Map our spec to vLLM's SamplingParams (DELTA: one output per engine step)."""
        kw: dict[str, Any] = {
            "n": p.n,
            "max_tokens": p.max_tokens,
            "min_tokens": p.min_tokens,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "seed": p.seed,
            "stop": list(p.stop) or None,
            "stop_token_ids": list(p.stop_token_ids) or None,
            "ignore_eos": p.ignore_eos,
            "logprobs": p.logprobs,
            "output_kind": self._delta_kind,
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(p, name)
            if value is not None:
                kw[name] = value
        return self._sampling_params(**kw)

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingSpec,
        request_id: str,
        lora_name: str | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream outputs; closing this iterator closes vLLM's, which aborts the request."""
        lora = None
        if lora_name is not None:
            lora = self._loras.get(lora_name)
            if lora is None:
                raise EngineInputError(f"LoRA adapter {lora_name!r} is not loaded")
        want_logprobs = params.logprobs is not None
        started = False
        try:
            stream = self._llm.generate(
                self._tokens_input(prompt_ids),
                self._params(params),
                request_id,
                lora_request=lora,
            )
            async with contextlib.aclosing(stream):
                async for out in stream:
                    started = True
                    deltas = [
                        Delta(
                            c.index,
                            c.text,
                            len(c.token_ids),
                            c.finish_reason,
                            self._logprobs(c) if want_logprobs else None,
                        )
                        for c in out.outputs
                    ]
                    yield EngineOutput(deltas, out.finished)
        except Exception as exc:
            mapped = self._errors.classify(exc, started)
            if mapped is None:
                raise
            raise mapped from exc

    def _logprobs(self, c: Any) -> list[TokenLogprobs] | None:
        """Convert vLLM's per-token logprob dicts (token id -> Logprob)."""
        if not c.logprobs:
            return None
        decode = self._tokenizer.decode

        def text(tid: int, lp: Any) -> str:
            return str(lp.decoded_token) if lp.decoded_token is not None else decode([tid])

        result: list[TokenLogprobs] = []
        for token_id, entry in zip(c.token_ids, c.logprobs, strict=False):
            chosen = entry.get(token_id)
            top = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
            result.append(
                TokenLogprobs(
                    token=text(token_id, chosen) if chosen else decode([token_id]),
                    logprob=float(chosen.logprob) if chosen else float("-inf"),
                    top=[(text(t, lp), float(lp.logprob)) for t, lp in top],
                )
            )
        return result

    async def add_lora(self, name: str, path: str) -> None:
        """Load an adapter; the engine reads its weights now, so a bad path fails here."""
        req = self._lora_request(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=path)
        try:
            ok = await self._llm.add_lora(req)
        except Exception as exc:
            # vLLM raises various errors for unreadable adapters; all are the caller's input,
            # except a dead engine.
            if isinstance(exc, self._errors.dead):
                raise EngineDeadError(str(exc) or "engine is dead") from exc
            raise EngineInputError(f"failed to load LoRA adapter {name!r}: {exc}") from exc
        if ok is False:
            raise EngineInputError(f"failed to load LoRA adapter {name!r}")
        self._loras[name] = req

    async def remove_lora(self, name: str) -> None:
        """Unload an adapter by name."""
        req = self._loras.pop(name)
        await self._llm.remove_lora(req.lora_int_id)

    def lora_adapters(self) -> dict[str, LoraAdapter]:
        """Loaded adapters by name, with the lora_int_id vLLM knows them by."""
        return {
            name: LoraAdapter(str(req.lora_path), int(req.lora_int_id)) for name, req in self._loras.items()
        }

    async def check_health(self) -> bool:
        """True unless the engine core died."""
        try:
            await self._llm.check_health()
        except Exception:
            return False
        return True

    def shutdown(self) -> None:
        """Stop the engine core process."""
        self._llm.shutdown()


# Plain exceptions vLLM still raises for bad input (its own server maps these to 400 too).
_INPUT_ERRORS = (ValueError, TypeError, OverflowError)


class _VllmErrors:
    """The one place vLLM's exceptions become engine-neutral ones (then HTTP, in serving).

    vLLM reports bad input in three ways: `VLLMValidationError` (with the parameter when it
    knows it) and other `VLLMClientError`s; plain ValueError/TypeError/OverflowError; and,
    for those raised while AsyncLLM adds a request (e.g. a value too large for its
    MessagePack transport), an `EngineGenerateError` caused by one. That last one is input
    only before the request produced anything: later, the same types are engine faults.
    """

    def __init__(self) -> None:
        """Look up vLLM's exception classes (names vary across versions)."""
        from vllm import exceptions as vx
        from vllm.v1.engine import exceptions as v1x

        def classes(*names: str) -> tuple[type[BaseException], ...]:
            found = (getattr(vx, n, None) for n in names)
            return tuple(c for c in found if isinstance(c, type))

        self.overload = classes("QueueOverflowError", "MaxQueuedTokensError")
        self.client = classes("VLLMClientError", "GracefulHTTPError")
        self.dead: tuple[type[BaseException], ...] = (v1x.EngineDeadError,)
        self.generate: tuple[type[BaseException], ...] = tuple(
            c for c in (getattr(v1x, "EngineGenerateError", None),) if isinstance(c, type)
        )

    def classify(self, exc: BaseException, started: bool) -> EngineError | None:
        """The engine error for `exc`, or None to let it through (a server fault: 500)."""
        if isinstance(exc, EngineError):
            return exc
        if isinstance(exc, self.overload):
            return EngineOverloadedError(str(exc) or "engine queue is full")
        if isinstance(exc, self.dead):
            return EngineDeadError(str(exc) or "engine is dead")
        cause = exc.__cause__
        if isinstance(exc, self.generate) and not started and isinstance(cause, _INPUT_ERRORS):
            exc = cause
        if isinstance(exc, self.client + _INPUT_ERRORS):
            message = str(exc.args[0]) if exc.args else str(exc)
            return EngineInputError(message, _param_of(exc, message))
        return None


_SPEC_FIELDS = frozenset(SamplingSpec.__dataclass_fields__)


def _param_of(exc: BaseException, message: str) -> str | None:
    """The parameter vLLM names: its `parameter`, else the message's first word if a field."""
    param = getattr(exc, "parameter", None)
    if isinstance(param, str):
        return param
    first = message.split(" ", 1)[0]
    return first if first in _SPEC_FIELDS else None


def engine_args_from_argv(argv: Sequence[str]) -> Any:
    """Parse a vLLM command line with vLLM's own parser into AsyncEngineArgs."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(
        FlexibleArgumentParser(prog="vllm_server engine")  # type: ignore[no-untyped-call]
    )
    ns = parser.parse_args(list(argv))
    return AsyncEngineArgs.from_cli_args(ns)


def build_engine(settings: Settings) -> Engine:
    """Build the real engine from settings (blocking)."""
    return VllmEngine.from_argv(settings.engine_argv())
