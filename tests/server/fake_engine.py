"""A deterministic in-process engine implementing vllm_server.engine.Engine for unit tests."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

from vllm_server.engine import (
    Delta,
    EngineInfo,
    EngineInputError,
    EngineOutput,
    LoraAdapter,
    SamplingSpec,
    TokenLogprobs,
)


class FakeEngine:
    """Emits `word{i} ` per token; one output per token, with an optional delay."""

    def __init__(
        self,
        max_model_len: int = 128,
        max_num_seqs: int = 4,
        delay: float = 0.0,
        lora_delay: float = 0.0,
        template_seconds: float = 0.0,
    ) -> None:
        """Configure limits, per-token delay, adapter load time and (blocking) template time."""
        self._info = EngineInfo(max_model_len=max_model_len, max_num_seqs=max_num_seqs, dtype="float32")
        self.delay = delay
        self.lora_delay = lora_delay
        self.template_seconds = template_seconds
        self.lora_loads: list[str] = []  # every add_lora call that reached the engine, by name
        self.loras: dict[str, str] = {}  # name -> path
        self.lora_ids: dict[str, int] = {}  # name -> id, as vLLM's lora_int_id (from 1)
        self._next_lora_id = itertools.count(1)
        self.produced: dict[str, int] = {}  # request id -> tokens produced
        self.finished: set[str] = set()
        self.aborted: set[str] = set()
        self.closed: set[str] = set()
        self.last_params: SamplingSpec | None = None
        self.last_lora: str | None = None
        self.healthy = True
        self.shut_down = False
        self.fail_with: Exception | None = None

    @property
    def info(self) -> EngineInfo:
        """Static facts."""
        return self._info

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """One token per whitespace-separated word (plus BOS when asked)."""
        ids = [len(w) for w in text.split()]
        return ([1] if add_special_tokens else []) + ids

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """A trivial template; blocks for `template_seconds`, like a big prompt's templating."""
        time.sleep(self.template_seconds)
        out = " ".join(f"<{m['role']}> {m['content']}" for m in messages)
        return out + (" <assistant>" if add_generation_prompt else "")

    async def generate(
        self, prompt_ids: list[int], params: SamplingSpec, request_id: str, lora_name: str | None = None
    ) -> AsyncIterator[EngineOutput]:
        """Yield max_tokens tokens per choice; stop strings end early."""
        self.last_params = params
        self.last_lora = lora_name
        if self.fail_with is not None:
            raise self.fail_with
        if params.temperature is not None and params.temperature > 1.5:
            raise EngineInputError("temperature too high for the fake engine", param="temperature")
        self.produced[request_id] = 0
        done = [False] * params.n
        try:
            for step in range(params.max_tokens):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                deltas = []
                for i in range(params.n):
                    if done[i]:
                        continue
                    word = f"w{step}" if lora_name is None else f"{lora_name}{step}"
                    text = word + " "
                    reason = None
                    if word in params.stop:
                        text, reason = "", "stop"
                    elif step == params.max_tokens - 1:
                        reason = "length"
                    if reason:
                        done[i] = True
                    lps = None
                    if params.logprobs is not None:
                        top = [(text, -0.5), ("x", -1.5), ("y", -2.5)][: max(1, params.logprobs)]
                        lps = [TokenLogprobs(text, -0.5, top)]
                    self.produced[request_id] += 1
                    deltas.append(Delta(i, text, 1, reason, lps))
                finished = all(done)
                yield EngineOutput(deltas, finished)
                if finished:
                    self.finished.add(request_id)
                    return
        finally:
            if request_id not in self.finished:
                self.aborted.add(request_id)
            self.closed.add(request_id)

    async def add_lora(self, name: str, path: str) -> None:
        """Paths containing 'bad' fail to load; loading takes `lora_delay` seconds."""
        self.lora_loads.append(name)
        await asyncio.sleep(self.lora_delay)
        if "bad" in path:
            raise EngineInputError(f"cannot load {path}")
        self.loras[name] = path
        self.lora_ids[name] = next(self._next_lora_id)

    async def remove_lora(self, name: str) -> None:
        """Forget an adapter."""
        del self.loras[name]
        self.lora_ids.pop(name, None)

    def lora_adapters(self) -> dict[str, LoraAdapter]:
        """Loaded adapters (one set directly in `loras` by a test gets id 0)."""
        return {n: LoraAdapter(p, self.lora_ids.get(n, 0)) for n, p in self.loras.items()}

    async def check_health(self) -> bool:
        """Configurable health."""
        return self.healthy

    def shutdown(self) -> None:
        """Record shutdown."""
        self.shut_down = True
