"""`vllm-operator bench load`: many requests at a fixed concurrency or rate; latency and throughput."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from vllm_operator_client.async_client import AsyncClient
from vllm_operator_client.errors import ClientError
from vllm_operator_client.metrics import RequestMetrics, percentile

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "operators",
    "reconcile",
    "state",
    "and",
    "servers",
    "stream",
    "tokens",
    "as",
    "soon",
    "as",
    "they",
    "are",
    "generated",
]


def make_prompt(index: int, words: int) -> str:
    """A prompt of about `words` words, distinct per request (defeats prefix caches)."""
    body = " ".join(_WORDS[(index + i) % len(_WORDS)] for i in range(max(0, words - 2)))
    return f"Request {index}: {body}".strip()


@dataclass(frozen=True)
class LoadConfig:
    """What to send."""

    requests: int = 100
    concurrency: int | None = 8
    rate: float | None = None  # requests/s (Poisson arrivals); None sends as fast as allowed
    stream: bool = True
    prompt_words: int = 32
    max_tokens: int = 64
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0


@dataclass
class Sample:
    """One request's outcome, times relative to the start of the run."""

    start_s: float
    ok: bool
    e2e_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_gaps_s: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LoadReport:
    """All samples and the wall time of the run."""

    config: LoadConfig
    samples: list[Sample]
    duration_s: float
    started_at: float  # time.time() at the start

    def summary(self) -> dict[str, Any]:
        """The figures printed in the table and as JSON."""
        ok = [s for s in self.samples if s.ok]
        out = sum(s.output_tokens for s in ok)
        prompt = sum(s.prompt_tokens for s in ok)
        d = self.duration_s or float("nan")
        ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
        itl = [g for s in ok for g in s.chunk_gaps_s]
        e2e = [s.e2e_s for s in ok]
        tpot = [
            (s.e2e_s - s.ttft_s) / (s.output_tokens - 1)
            for s in ok
            if s.ttft_s is not None and s.output_tokens > 1
        ]
        res: dict[str, Any] = {
            "requests": len(self.samples),
            "completed": len(ok),
            "errors": len(self.samples) - len(ok),
            "duration_s": round(self.duration_s, 3),
            "requests_per_s": round(len(ok) / d, 3),
            "prompt_tokens": prompt,
            "output_tokens": out,
            "output_tokens_per_s": round(out / d, 2),
            "total_tokens_per_s": round((out + prompt) / d, 2),
            "concurrency": self.config.concurrency,
            "rate": self.config.rate,
            "stream": self.config.stream,
            "max_tokens": self.config.max_tokens,
        }
        for name, values in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
            for q in (50, 90, 99):
                p = percentile(values, q)
                res[f"{name}_p{q}_ms"] = None if p is None else round(p * 1000, 2)
        errors = sorted({s.error for s in self.samples if not s.ok})
        if errors:
            res["error_kinds"] = errors[:5]
        return res


class Progress:
    """A one-line progress bar on a stream, redrawn at most every `every` seconds."""

    def __init__(self, total: int, out: TextIO | None = None, every: float = 0.25, width: int = 30) -> None:
        """Nothing drawn yet."""
        self.total = total
        self.out = out or sys.stderr
        self.every = every
        self.width = width
        self.t0 = time.monotonic()
        self._last = 0.0
        self.done = 0
        self.errors = 0
        self.tokens = 0

    def add(self, sample: Sample) -> None:
        """Count a finished request and redraw if due."""
        self.done += 1
        self.errors += 0 if sample.ok else 1
        self.tokens += sample.output_tokens
        self.update()

    def update(self, force: bool = False) -> None:
        """Redraw if due."""
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        el = now - self.t0
        fill = self.width * self.done // max(1, self.total)
        bar = "#" * fill + "-" * (self.width - fill)
        rate = self.tokens / el if el > 0 else 0.0
        self.out.write(
            f"\r[{bar}] {self.done}/{self.total}  errors {self.errors}  {rate:7.1f} tok/s  {el:6.1f}s "
        )
        self.out.flush()

    def finish(self) -> None:
        """Final state and a newline."""
        self.update(force=True)
        self.out.write("\n")
        self.out.flush()


async def _one(client: AsyncClient, cfg: LoadConfig, index: int, t0: float) -> Sample:
    """Send request `index` and record its sample."""
    params: dict[str, Any] = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    if cfg.ignore_eos:
        params["ignore_eos"] = True
    prompt = make_prompt(index, cfg.prompt_words)
    start = time.monotonic()
    try:
        if cfg.stream:
            result = await client.chat_stream(prompt, **params).collect()
        else:
            result = await client.chat(prompt, **params)
    except ClientError as exc:
        return Sample(start - t0, False, time.monotonic() - start, error=f"{type(exc).__name__}: {exc}"[:200])
    m: RequestMetrics = result.metrics
    return Sample(start - t0, True, m.total_s, m.ttft_s, m.prompt_tokens, m.completion_tokens, m.chunk_gaps_s)


async def run_load(
    client: AsyncClient, cfg: LoadConfig, on_done: Callable[[Sample], None] | None = None
) -> LoadReport:
    """Run the load; `on_done` sees every sample as it finishes (progress)."""
    samples: list[Sample] = []
    sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    t0 = time.monotonic()
    wall0 = time.time()

    async def task(i: int) -> None:
        async with sem or contextlib.nullcontext():
            s = await _one(client, cfg, i, t0)
        samples.append(s)
        if on_done is not None:
            on_done(s)

    if cfg.rate:
        rng = random.Random(cfg.seed)
        tasks = []
        for i in range(cfg.requests):
            tasks.append(asyncio.ensure_future(task(i)))
            await asyncio.sleep(rng.expovariate(cfg.rate))
        await asyncio.gather(*tasks)
    else:
        await asyncio.gather(*(task(i) for i in range(cfg.requests)))
    samples.sort(key=lambda s: s.start_s)
    return LoadReport(cfg, samples, time.monotonic() - t0, wall0)


def _ms(v: Any) -> str:
    """A millisecond figure or a dash."""
    return "-" if v is None else f"{v:.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """The human summary."""
    s = summary
    mode = f"rate {s['rate']}/s" if s["rate"] else f"concurrency {s['concurrency']}"
    lines = [
        f"requests          {s['requests']} ({s['completed']} ok, {s['errors']} errors), "
        f"{mode}, {'streaming' if s['stream'] else 'non-streaming'}",
        f"duration          {s['duration_s']:.2f} s",
        f"requests/s        {s['requests_per_s']:.2f}",
        f"tokens            {s['prompt_tokens']} prompt, {s['output_tokens']} output",
        f"output tokens/s   {s['output_tokens_per_s']:.1f}",
        f"total tokens/s    {s['total_tokens_per_s']:.1f}",
        "",
        f"{'latency (ms)':<24}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for key, label in (
        ("ttft", "time to first token"),
        ("itl", "inter-token"),
        ("tpot", "time per output token"),
        ("e2e", "end-to-end"),
    ):
        lines.append(f"{label:<24}" + "".join(f"{_ms(s[f'{key}_p{q}_ms']):>10}" for q in (50, 90, 99)))
    for e in s.get("error_kinds", []):
        lines.append(f"error: {e}")
    return "\n".join(lines)


def check_plot_support() -> None:
    """Fail before the run when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib") from None


def plot(report: LoadReport, path: str) -> None:
    """TTFT per request and output tokens/s per second over the run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in report.samples if s.ok]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.scatter(
        [s.start_s for s in ok if s.ttft_s is not None],
        [s.ttft_s * 1000 for s in ok if s.ttft_s is not None],
        s=6,
    )
    ax1.set_ylabel("TTFT (ms)")
    ax1.set_title("bench load: TTFT by request start, output tokens/s by second")
    seconds = int(report.duration_s) + 1
    bins = [0.0] * seconds
    for s in ok:
        # Spread a request's tokens evenly from its first token to its end.
        first = s.start_s + (s.ttft_s or 0.0)
        end = s.start_s + s.e2e_s
        for k in range(s.output_tokens):
            t = first + (end - first) * k / max(1, s.output_tokens - 1)
            bins[min(seconds - 1, int(t))] += 1
    # The last second is partial: a rate, not a count, keeps it comparable.
    last = report.duration_s - (seconds - 1)
    if last > 0.05:
        bins[-1] /= last
    ax2.plot([*range(seconds), report.duration_s], [*bins, bins[-1]], drawstyle="steps-post")
    ax2.set_ylabel("output tokens/s")
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
