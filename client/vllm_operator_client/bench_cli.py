"""`vllm-bench check|load`, also `vllm-operator bench check|load` (which adds `--model-ref`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vllm_operator_client import __version__, bench_check, bench_load
from vllm_operator_client.async_client import AsyncClient
from vllm_operator_client.errors import ClientError

EXIT_FAILED = 1
EXIT_USAGE = 2

ResolveRef = Callable[[str], tuple[str, str]]
"""`NAMESPACE/NAME` of a VLLMModel -> (base URL, served model name); ValueError when it cannot."""


def _common(p: argparse.ArgumentParser, resolve_ref: ResolveRef | None) -> None:
    """Target flags shared by check and load."""
    p.add_argument(
        "--base-url",
        action="append",
        default=[],
        help="server URL, with or without /v1 (repeat to spread load over replicas)",
    )
    p.add_argument("--model", help="model name; default: the first of /v1/models")
    p.add_argument(
        "--api-key", default=os.environ.get("VLLM_API_KEY"), help="Bearer key (default: $VLLM_API_KEY)"
    )
    if resolve_ref is not None:
        p.add_argument(
            "--model-ref",
            metavar="NAMESPACE/NAME",
            help="read the endpoint and servedModelName of a VLLMModel (KUBECONFIG); "
            "--base-url still wins, e.g. for a port-forward",
        )
    p.set_defaults(resolve_ref=resolve_ref, model_ref=None)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per connect/read")
    p.add_argument(
        "--http",
        choices=["auto", "httpx", "aiohttp"],
        default="auto",
        help="HTTP backend: aiohttp's parser (httpx-aiohttp) costs a third of httpx's CPU; "
        "auto uses it when installed",
    )


def register(sub: Any, resolve_ref: ResolveRef | None = None) -> None:
    """Add `bench` with its `check` and `load` subcommands to the top-level subparsers;
    `resolve_ref` (the operator's) adds `--model-ref`."""
    bench = sub.add_parser("bench", help="test or load an OpenAI-compatible endpoint")
    add_modes(bench.add_subparsers(dest="bench_command", required=True), resolve_ref)


def parser() -> argparse.ArgumentParser:
    """`vllm-bench`: the client distribution's own command."""
    top = argparse.ArgumentParser(
        prog="vllm-bench", description="Test or load any OpenAI-compatible endpoint."
    )
    top.add_argument("--version", action="version", version=__version__)
    add_modes(top.add_subparsers(dest="bench_command", required=True), None)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


def add_modes(modes: Any, resolve_ref: ResolveRef | None) -> None:
    """The `check` and `load` subcommands."""
    p = modes.add_parser("check", help="functional suite, PASS/FAIL per case")
    _common(p, resolve_ref)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-ttft-ms", type=float, default=5000.0, help="TTFT p50 limit")
    p.add_argument("--min-tokens-per-s", type=float, default=1.0, help="single-stream limit")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.set_defaults(func=cmd_check)

    p = modes.add_parser("load", help="load test: throughput and latency percentiles")
    _common(p, resolve_ref)
    p.add_argument("--requests", "-n", type=int, default=100)
    p.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=None,
        help="requests in flight (default 8; with --rate: no limit unless set)",
    )
    p.add_argument("--rate", type=float, default=None, help="requests/s, Poisson arrivals")
    p.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="non-streaming requests (no TTFT/inter-token figures)",
    )
    p.add_argument("--prompt-words", type=int, default=32, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--ignore-eos", action="store_true", help="always generate --max-tokens tokens (vLLM's ignore_eos)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line last")
    p.add_argument("--plot", metavar="FILE.png", help="plot TTFT and throughput over time")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_load)


def _target(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """Base URLs and model name from the flags and, when given, the VLLMModel."""
    urls: list[str] = list(args.base_url)
    model: str | None = args.model
    if args.model_ref:
        endpoint, served = args.resolve_ref(args.model_ref)
        urls = urls or [endpoint]
        model = model or served
    if not urls:
        raise ValueError(
            "give --base-url URL" + (" or --model-ref NAMESPACE/NAME" if args.resolve_ref else "")
        )
    return urls, model


async def _client(args: argparse.Namespace, max_retries: int, connections: int) -> AsyncClient:
    """A client on the target, with the model resolved from /v1/models if not given."""
    urls, model = _target(args)
    client = AsyncClient(
        urls,
        api_key=args.api_key,
        model=model,
        max_retries=max_retries,
        timeout=args.timeout,
        max_connections=connections,
        backend=args.http,
    )
    if client.model is None:
        try:
            models = await client.models()
            if not models:
                raise ValueError("/v1/models lists no model; give --model")
        except BaseException:
            await client.aclose()
            raise
        client.model = str(models[0]["id"])
    return client


def _fail(message: str) -> int:
    """Print an error and return the usage exit code."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_check(args: argparse.Namespace) -> int:
    """Run the functional suite."""
    cfg = bench_check.CheckConfig(
        max_tokens=args.max_tokens, max_ttft_ms=args.max_ttft_ms, min_tokens_per_s=args.min_tokens_per_s
    )

    async def run() -> list[bench_check.CaseResult]:
        client = await _client(args, max_retries=2, connections=32)
        async with client:
            print(f"bench check {' '.join(client.pool.urls)} model {client.model}", flush=True)
            return await bench_check.run_checks(
                client, cfg, lambda r: print(bench_check.format_case(r), flush=True)
            )

    try:
        results = asyncio.run(run())
    except (ValueError, ClientError) as exc:
        return _fail(str(exc))
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        print(
            json.dumps(
                {
                    "passed": len(results) - len(failed),
                    "failed": len(failed),
                    "cases": [vars(r) for r in results],
                }
            )
        )
    return EXIT_FAILED if failed else 0


def cmd_load(args: argparse.Namespace) -> int:
    """Run the load test and print the summary (and JSON, and a plot)."""
    if args.requests < 1:
        return _fail("--requests must be at least 1")
    if args.plot:
        bench_load.check_plot_support()
    concurrency = args.concurrency if args.concurrency or args.rate else 8
    cfg = bench_load.LoadConfig(
        requests=args.requests,
        concurrency=concurrency,
        rate=args.rate,
        stream=args.stream,
        prompt_words=args.prompt_words,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
    )

    async def run() -> bench_load.LoadReport:
        # No retries: a load test reports errors instead of hiding them.
        client = await _client(args, max_retries=0, connections=concurrency or args.requests)
        async with client:
            progress = bench_load.Progress(cfg.requests) if args.progress else None

            async def tick() -> None:
                # Completions come in waves at high concurrency: keep the clock moving between.
                while progress is not None:
                    await asyncio.sleep(progress.every)
                    progress.update(force=True)

            ticker = asyncio.create_task(tick())
            try:
                report = await bench_load.run_load(
                    client, cfg, progress.add if progress is not None else None
                )
            finally:
                ticker.cancel()
            if progress is not None:
                progress.finish()
            return report

    try:
        report = asyncio.run(run())
    except (ValueError, ClientError) as exc:
        return _fail(str(exc))
    summary = report.summary()
    print(bench_load.format_table(summary))
    if args.plot:
        bench_load.plot(report, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(summary))
    return EXIT_FAILED if summary["completed"] == 0 else 0
