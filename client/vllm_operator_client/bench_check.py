"""`vllm-operator bench check`: a functional suite against an endpoint, PASS/FAIL per case."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vllm_operator_client._core import Result
from vllm_operator_client.async_client import AsyncClient
from vllm_operator_client.metrics import percentile


class CheckFailed(AssertionError):
    """A case's expectation did not hold."""


def expect(cond: bool, message: str) -> None:
    """Fail the case with `message` unless `cond`."""
    if not cond:
        raise CheckFailed(message)


@dataclass(frozen=True)
class CheckConfig:
    """Thresholds and sizes of the suite."""

    max_tokens: int = 32
    max_ttft_ms: float = 5000.0
    min_tokens_per_s: float = 1.0
    rapid_streams: int = 8


@dataclass
class CaseResult:
    """Outcome of one case."""

    name: str
    ok: bool
    seconds: float
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)


Case = Callable[[AsyncClient, CheckConfig], Awaitable[tuple[str, dict[str, Any]]]]


def usage_ok(r: Result, max_tokens: int) -> str:
    """Usage present and consistent, or '' when fine."""
    u = r.usage
    if u is None:
        return "no usage in the response"
    if u.prompt_tokens <= 0:
        return f"prompt_tokens is {u.prompt_tokens}"
    if u.total_tokens != u.prompt_tokens + u.completion_tokens:
        return f"total_tokens {u.total_tokens} != {u.prompt_tokens} + {u.completion_tokens}"
    if not 0 < u.completion_tokens <= max_tokens:
        return f"completion_tokens {u.completion_tokens} not in 1..{max_tokens}"
    return ""


def _figs(r: Result) -> dict[str, Any]:
    """The metrics shown for one request."""
    m = r.metrics
    return {
        "ttft_ms": None if m.ttft_s is None else round(m.ttft_s * 1000, 1),
        "total_ms": round(m.total_s * 1000, 1),
        "chunks": m.chunks,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "tokens_per_s": round(m.tokens_per_s, 1),
    }


async def case_models(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """GET /v1/models lists the model."""
    ids = [m.get("id") for m in await c.models()]
    expect(c.model in ids, f"{c.model!r} not in /v1/models: {ids}")
    return f"{len(ids)} model(s): {', '.join(map(str, ids))}", {}


async def case_chat(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """Non-streaming chat returns text, a finish reason and usage."""
    r = await c.chat("Tell me about Kubernetes operators.", max_tokens=cfg.max_tokens)
    problem = usage_ok(r, cfg.max_tokens)
    expect(not problem, problem)
    expect(r.finish_reason in ("stop", "length"), f"finish_reason {r.finish_reason!r}")
    expect(bool(r.text), "empty text")
    return f"{r.metrics.completion_tokens} tokens, finish {r.finish_reason}", _figs(r)


async def case_stream(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """Streaming chat: chunks one by one, the first well before the end, then [DONE]."""
    stream = c.chat_stream("Count from one to fifty.", max_tokens=cfg.max_tokens)
    arrivals: list[float] = []
    async for chunk in stream:
        if chunk.text:
            arrivals.append(time.monotonic())
    r = stream.result
    m = r.metrics
    expect(m.chunks >= 2, f"only {m.chunks} text chunk(s)")
    expect(
        r.usage is not None and m.chunks >= r.usage.completion_tokens // 2,
        f"{m.chunks} chunks for {m.completion_tokens} tokens: not streamed token by token",
    )
    spread = arrivals[-1] - arrivals[0]
    expect(
        spread > 0 and m.ttft_s is not None and m.ttft_s < m.total_s - spread / 2,
        f"chunks arrived together (spread {spread * 1000:.1f} ms)",
    )
    return (
        f"{m.chunks} chunks over {spread * 1000:.0f} ms, first at {m.ttft_s * 1000:.0f} ms"
        if m.ttft_s is not None
        else "",
        _figs(r),
    )


async def case_multi_turn(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """Three turns with the history sent back: the prompt grows every turn."""
    history: list[dict[str, Any]] = []
    prompts: list[int] = []
    for q in ("My name is Ada.", "What did I just tell you?", "Say it once more."):
        history.append({"role": "user", "content": q})
        r = await c.chat(history, max_tokens=cfg.max_tokens // 2 or 1)
        expect(r.usage is not None, "no usage")
        prompts.append(r.metrics.prompt_tokens)
        history.append({"role": "assistant", "content": r.text})
    expect(prompts[0] < prompts[1] < prompts[2], f"prompt tokens did not grow: {prompts}")
    return f"prompt tokens per turn {prompts}", {"prompt_tokens": prompts}


async def case_temperature(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """Temperature 0 repeats itself; 0.7 and 1.5 with seeds answer and vary."""
    q = "Write a short poem about the sea."
    a = await c.chat(q, max_tokens=cfg.max_tokens, temperature=0.0)
    b = await c.chat(q, max_tokens=cfg.max_tokens, temperature=0.0)
    expect(a.text == b.text, "temperature 0 gave two different answers")
    hot = [
        await c.chat(q, max_tokens=cfg.max_tokens, temperature=t, seed=s)
        for t, s in ((0.7, 1), (1.5, 2), (1.5, 3))
    ]
    expect(all(h.text for h in hot), "an empty answer at temperature > 0")
    expect(len({h.text for h in hot} | {a.text}) > 1, "temperature > 0 never changed the text")
    return "0.0 deterministic; 0.7, 1.5 sampled", {}


async def case_rapid_fire(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """Several streams started at once all finish with usage."""
    n = cfg.rapid_streams
    results = await asyncio.gather(
        *(c.chat_stream(f"Stream {i}: hello", max_tokens=cfg.max_tokens).collect() for i in range(n))
    )
    bad = [i for i, r in enumerate(results) if usage_ok(r, cfg.max_tokens) or not r.metrics.chunks]
    expect(not bad, f"streams {bad} incomplete")
    ttfts = [r.metrics.ttft_s for r in results if r.metrics.ttft_s is not None]
    p50 = percentile(ttfts, 50) or 0.0
    return f"{n} concurrent streams complete, TTFT p50 {p50 * 1000:.0f} ms", {
        "ttft_p50_ms": round(p50 * 1000, 1)
    }


async def case_stream_vs_plain(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """At temperature 0 the streamed text and usage equal the non-streamed ones."""
    q = "Explain paged attention in one sentence."
    plain = await c.chat(q, max_tokens=cfg.max_tokens, temperature=0.0)
    streamed = await c.chat_stream(q, max_tokens=cfg.max_tokens, temperature=0.0).collect()
    expect(streamed.text == plain.text, "streamed text differs from the non-streamed text")
    expect(streamed.usage == plain.usage, f"usage differs: {streamed.usage} vs {plain.usage}")
    return (
        f"same text and usage ({plain.metrics.completion_tokens} tokens); total "
        f"{streamed.metrics.total_s * 1000:.0f} ms streamed vs {plain.metrics.total_s * 1000:.0f}"
        " ms"
    ), {}


async def case_system(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """A system message is accepted and counted in the prompt."""
    q = [{"role": "user", "content": "Who are you?"}]
    without = await c.chat(q, max_tokens=cfg.max_tokens)
    sys_msg = {"role": "system", "content": "You are a terse assistant that answers in haiku."}
    with_sys = await c.chat([sys_msg, *q], max_tokens=cfg.max_tokens)
    a, b = without.metrics.prompt_tokens, with_sys.metrics.prompt_tokens
    expect(b > a, f"prompt tokens with a system message {b} <= without {a}")
    return f"prompt tokens {a} -> {b} with the system message", {}


async def case_ttft(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """Median time to first token of 5 sequential streams is under the limit."""
    ttfts = []
    for i in range(5):
        r = await c.chat_stream(f"Question {i}: why is the sky blue?", max_tokens=8).collect()
        expect(r.metrics.ttft_s is not None, "no text chunk")
        ttfts.append((r.metrics.ttft_s or 0.0) * 1000)
    p50 = percentile(ttfts, 50) or 0.0
    expect(p50 <= cfg.max_ttft_ms, f"TTFT p50 {p50:.0f} ms > {cfg.max_ttft_ms:.0f} ms")
    return f"TTFT p50 {p50:.1f} ms (limit {cfg.max_ttft_ms:.0f})", {"ttft_p50_ms": round(p50, 1)}


async def case_tokens_per_s(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """One stream of 2 x max_tokens decodes faster than the limit."""
    r = await c.chat_stream("Tell me a long story.", max_tokens=cfg.max_tokens * 2).collect()
    m = r.metrics
    rate = m.tokens_per_s
    expect(rate >= cfg.min_tokens_per_s, f"{rate:.1f} tokens/s < {cfg.min_tokens_per_s}")
    itl = m.inter_token_s
    return (
        f"{rate:.1f} tokens/s, inter-token {itl * 1000:.1f} ms" if itl is not None else f"{rate:.1f} tokens/s"
    ), _figs(r)


async def case_usage(c: AsyncClient, cfg: CheckConfig) -> tuple[str, dict[str, Any]]:
    """Streamed usage is present and matches the chunks received."""
    r = await c.chat_stream("Name three colours.", max_tokens=cfg.max_tokens).collect()
    problem = usage_ok(r, cfg.max_tokens)
    expect(not problem, problem)
    u = r.usage
    assert u is not None
    expect(
        r.metrics.chunks <= u.completion_tokens,
        f"{r.metrics.chunks} text chunks but completion_tokens {u.completion_tokens}",
    )
    expect(
        r.finish_reason != "length" or u.completion_tokens == cfg.max_tokens,
        f"finish 'length' with {u.completion_tokens} of {cfg.max_tokens} tokens",
    )
    return (f"usage {u.prompt_tokens}+{u.completion_tokens}={u.total_tokens}, {r.metrics.chunks} chunks"), {}


CASES: list[tuple[str, Case]] = [
    ("models", case_models),
    ("chat", case_chat),
    ("streaming chat", case_stream),
    ("multi-turn", case_multi_turn),
    ("temperature", case_temperature),
    ("rapid-fire streams", case_rapid_fire),
    ("stream vs non-stream", case_stream_vs_plain),
    ("system message", case_system),
    ("TTFT", case_ttft),
    ("tokens/s", case_tokens_per_s),
    ("token usage", case_usage),
]


async def run_checks(
    client: AsyncClient, cfg: CheckConfig, report: Callable[[CaseResult], None] | None = None
) -> list[CaseResult]:
    """Run every case in order; a case's exception is its failure, the suite goes on."""
    out: list[CaseResult] = []
    for name, case in CASES:
        t0 = time.monotonic()
        try:
            detail, figures = await case(client, cfg)
            res = CaseResult(name, True, time.monotonic() - t0, detail, figures)
        except Exception as exc:  # any failure of a case is reported, not raised
            msg = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
            res = CaseResult(name, False, time.monotonic() - t0, msg)
        out.append(res)
        if report is not None:
            report(res)
    return out


def format_case(r: CaseResult) -> str:
    """One line of the report."""
    return f"{'PASS' if r.ok else 'FAIL'}  {r.name:<22}{r.seconds:7.2f}s  {r.detail}"
