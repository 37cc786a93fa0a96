"""Benchmark: does `vllm-operator bench load` measure what the server counts, and cheaply?

One vllm_server on the tiny model (built here, nothing downloaded). Each round runs the same
load four ways, one after the other:

- `bench load --http aiohttp` and `--http httpx`: `vllm_operator.cli.main([...])` in this
  process (the command a user runs), its JSON summary next to the server's counters over the run:
  `/v1/stats` tokens_generated and `/metrics` `vllm:generation_tokens_total` deltas divided by
  the server's uptime delta.
- `aiohttp-minimal` and `httpx-minimal`: bare loops at the same concurrency that stream the
  same requests and read the bytes without parsing anything; their rate is the server's token
  delta over their own wall time.

The client's CPU time per 1000 output tokens (this process's, the server runs apart) shows
what measuring costs. Results go to bench/client_bench_results.json.

    PYTHONPATH=. .venv/bin/python bench/client_bench.py [--requests 256] [--tokens 64] \
        [--concurrency 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.realserver import start_server  # noqa: E402
from devtools.tinymodel import build_tiny_model  # noqa: E402
from vllm_operator.cli import main as cli_main  # noqa: E402
from vllm_operator_client._core import request_body  # noqa: E402
from vllm_operator_client.bench_load import make_prompt  # noqa: E402

_GEN = re.compile(r"^vllm:generation_tokens_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def counters(base: str, before: bool) -> dict[str, float]:
    """The server's token counters and clock; /v1/stats (the clock) is read next to the run."""
    if before:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        stats = httpx.get(f"{base}/v1/stats", timeout=10).json()
    else:
        stats = httpx.get(f"{base}/v1/stats", timeout=10).json()
        text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        "tokens": stats["tokens_generated"],
        "requests": stats["requests_processed"],
        "uptime": stats["uptime_seconds"],
        "gen_total": sum(float(v) for v in _GEN.findall(text)),
    }


def body(i: int, tokens: int) -> dict[str, Any]:
    """The request bench load sends for index i (same prompt, same sampling)."""
    params = {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    return request_body("chat", "tiny", make_prompt(i, 32), True, params)


async def aiohttp_minimal(base: str, n: int, c: int, tokens: int) -> None:
    """Stream n requests, c at a time, reading and discarding the bytes."""
    sem = asyncio.Semaphore(c)
    conn = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as s:

        async def one(i: int) -> None:
            async with sem, s.post(f"{base}/v1/chat/completions", json=body(i, tokens)) as r:
                r.raise_for_status()
                async for _ in r.content.iter_any():
                    pass

        await asyncio.gather(*(one(i) for i in range(n)))


async def httpx_minimal(base: str, n: int, c: int, tokens: int) -> None:
    """The same with httpx (the client's transport), no SSE parsing."""
    sem = asyncio.Semaphore(c)
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600, pool=None)) as s:

        async def one(i: int) -> None:
            async with sem, s.stream("POST", f"{base}/v1/chat/completions", json=body(i, tokens)) as r:
                r.raise_for_status()
                async for _ in r.aiter_bytes():
                    pass

        await asyncio.gather(*(one(i) for i in range(n)))


def measure(base: str, run: Callable[[], Any]) -> dict[str, Any]:
    """Run `run` between two counter reads; wall, CPU and server-side rates."""
    before = counters(base, True)
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = counters(base, False)
    d = {k: after[k] - before[k] for k in before}
    return {
        "wall_s": wall,
        "client_cpu_s": cpu,
        "server_tokens": d["tokens"],
        "server_requests": d["requests"],
        "server_window_s": d["uptime"],
        "server_tokens_per_s": d["tokens"] / d["uptime"],
        "metrics_tokens_per_s": d["gen_total"] / d["uptime"],
        "client_cpu_ms_per_1k_tokens": 1000 * 1000 * cpu / max(1, d["tokens"]),
        "out": out,
    }


def run_bench_load(base: str, n: int, c: int, tokens: int, http: str = "auto") -> dict[str, Any]:
    """`vllm-operator bench load --json`, in this process; returns its summary."""
    buf = io.StringIO()
    argv = [
        "bench",
        "load",
        "--base-url",
        base,
        "--model",
        "tiny",
        "--requests",
        str(n),
        "--concurrency",
        str(c),
        "--max-tokens",
        str(tokens),
        "--ignore-eos",
        "--json",
        "--no-progress",
        "--http",
        http,
    ]
    with contextlib.redirect_stdout(buf):
        code = cli_main(argv)
    if code:
        raise RuntimeError(f"bench load exited {code}:\n{buf.getvalue()}")
    return dict(json.loads(buf.getvalue().strip().splitlines()[-1]))


def minimal(
    fn: Callable[[str, int, int, int], Awaitable[None]], base: str, n: int, c: int, tokens: int
) -> None:
    """Run a minimal generator to completion."""
    asyncio.run(fn(base, n, c, tokens))  # type: ignore[arg-type]


def main() -> None:
    """Start the server, run the rounds, print and save the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "client_bench_results.json"))
    a = ap.parse_args()
    n, c, tok = a.requests, a.concurrency, a.tokens

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        srv = start_server(model, [], log_path=Path(tmp) / "server.log")
        base = srv.url
        try:
            run_bench_load(base, 64, 16, 16)  # warm-up: first requests are slower
            rows: list[dict[str, Any]] = []
            for r in range(a.rounds):
                for http in ("aiohttp", "httpx"):
                    m = measure(base, lambda http=http: run_bench_load(base, n, c, tok, http))  # type: ignore[misc]
                    s = m.pop("out")
                    m |= {
                        "round": r,
                        "generator": f"bench load ({http})",
                        "client_tokens_per_s": s["output_tokens_per_s"],
                        "client_output_tokens": s["output_tokens"],
                        "client_requests": s["completed"],
                        "errors": s["errors"],
                        "ttft_p50_ms": s["ttft_p50_ms"],
                        "ttft_p99_ms": s["ttft_p99_ms"],
                        "itl_p50_ms": s["itl_p50_ms"],
                        "e2e_p50_ms": s["e2e_p50_ms"],
                        "duration_s": s["duration_s"],
                    }
                    rows.append(m)
                for name, fn in (("aiohttp-minimal", aiohttp_minimal), ("httpx-minimal", httpx_minimal)):
                    m = measure(base, lambda fn=fn: minimal(fn, base, n, c, tok))  # type: ignore[misc]
                    m.pop("out")
                    m |= {
                        "round": r,
                        "generator": name,
                        "client_tokens_per_s": m["server_tokens"] / m["wall_s"],
                    }
                    rows.append(m)
                for row in rows[-4:]:
                    print_row(row)
        finally:
            srv.stop()

    result = {
        "requests": n,
        "concurrency": c,
        "max_tokens": tok,
        "rows": rows,
        "machine": "2 cores, client and server on the same host",
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten {a.out}")


def print_row(r: dict[str, Any]) -> None:
    """One line per generator run."""
    extra = ""
    if r["generator"].startswith("bench load"):
        dev = 100 * (r["client_tokens_per_s"] / r["server_tokens_per_s"] - 1)
        extra = (
            f"  vs server {dev:+.1f}%  TTFT p50 {r['ttft_p50_ms']:.0f} ms  "
            f"tokens {r['client_output_tokens']}/{r['server_tokens']}"
        )
    print(
        f"round {r['round']} {r['generator']:<20} client {r['client_tokens_per_s']:7.1f} tok/s  "
        f"server /v1/stats {r['server_tokens_per_s']:7.1f}  /metrics "
        f"{r['metrics_tokens_per_s']:7.1f}  client CPU {r['client_cpu_ms_per_1k_tokens']:.0f} "
        f"ms/1k tok{extra}",
        flush=True,
    )


if __name__ == "__main__":
    main()
