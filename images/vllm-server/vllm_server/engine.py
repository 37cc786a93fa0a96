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
        self, prompt_ids: list[int], params: SamplingSpec, request_id: str,
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
        self._errors = _vllm_errors()

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
        try:
            return self._sampling_params(**kw)
        except (ValueError, TypeError) as exc:
            raise EngineInputError(str(exc)) from exc

    async def generate(
        self, prompt_ids: list[int], params: SamplingSpec, request_id: str,
        lora_name: str | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream outputs; closing this iterator closes vLLM's, which aborts the request."""
        lora = None
        if lora_name is not None:
            lora = self._loras.get(lora_name)
            if lora is None:
                raise EngineInputError(f"LoRA adapter {lora_name!r} is not loaded")
        sp = self._params(params)
        want_logprobs = params.logprobs is not None
        client_errors, overload_errors, dead_errors = self._errors
        stream = self._llm.generate(
            self._tokens_input(prompt_ids), sp, request_id, lora_request=lora
        )
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
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
        except overload_errors as exc:
            raise EngineOverloadedError(str(exc) or "engine queue is full") from exc
        except client_errors as exc:
            raise EngineInputError(str(exc)) from exc
        except dead_errors as exc:
            raise EngineDeadError(str(exc) or "engine is dead") from exc

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
            result.append(TokenLogprobs(
                token=text(token_id, chosen) if chosen else decode([token_id]),
                logprob=float(chosen.logprob) if chosen else float("-inf"),
                top=[(text(t, lp), float(lp.logprob)) for t, lp in top],
            ))
        return result

    async def add_lora(self, name: str, path: str) -> None:
        """Load an adapter; the engine reads its weights now, so a bad path fails here."""
        req = self._lora_request(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=path)
        try:
            ok = await self._llm.add_lora(req)
        except Exception as exc:  # vLLM raises various errors for unreadable adapters
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
        return {name: LoraAdapter(str(req.lora_path), int(req.lora_int_id))
                for name, req in self._loras.items()}

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


def _vllm_errors() -> tuple[tuple[type[BaseException], ...], ...]:
    """vLLM's exception classes: (client errors, overload errors, dead-engine errors)."""
    from vllm import exceptions as vx
    from vllm.v1.engine import exceptions as v1x

    overload = tuple(
        c for c in (getattr(vx, "QueueOverflowError", None),
                    getattr(vx, "MaxQueuedTokensError", None)) if isinstance(c, type)
    )
    client = tuple(
        c for c in (getattr(vx, "VLLMClientError", None), getattr(vx, "GracefulHTTPError", None),
                    ValueError) if isinstance(c, type)
    )
    dead = (v1x.EngineDeadError,)
    return client, overload, dead


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
