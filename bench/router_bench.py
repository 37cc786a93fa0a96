"""Benchmark: `vllm-operator router` against the Rust `vllm-router` (PyPI 0.1.17), same tests, same run.

Each test starts a fresh upstream stand-in and fresh routers. Routers run on core 0
(`taskset -c 0`); the upstream stand-in, the load generator and this script share core 1. A
router's RSS and CPU time are read from /proc (summed over its process tree).

- added latency: open-loop non-streaming POSTs at --rate req/s. The upstream and every router are
  up at once and the load takes turns over them in 1 s slices (direct, router A, router B, ...),
  so that all see the same background load; after one warm-up round each gets --duration s. The
  figures are p50 and p99 via the router minus p50 and p99 direct.
- relayed SSE chunks/s: 64 keep-alive clients loop over streaming requests; the upstream writes
  --stream-chunks `data: {...}\\n\\n` events per stream as fast as it can, each its own HTTP chunk;
  the clients count `data:` lines. A direct run (no router) shows what core 1 can feed.
- open streams: --streams concurrent streaming requests through the router, one chunk a second
  for --stream-seconds; ok/errors, and the router's RSS increase over its idle RSS per stream.

The upstream stand-in and the load generator are bench/router_bench_net.py, each in its own
process: asyncio Protocols on uvloop with httptools parsing, so that neither is the bottleneck.
RLIMIT_NOFILE is raised here (as far as the hard limit allows) and inherited by every child.

    PYTHONPATH=. .venv/bin/python bench/router_bench.py [--only vllm-router|ours] [--quick] \\
        [--streams 8000] [--rate 500] [--duration 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router_bench_net import HOST, MODEL, nofile_limit, split_url, threads, tree_pids

from devtools.processes import exit_on_signals

ROUTER_CORE = 0
LOAD_CORE = 1
NOFILE = 65536
BIN = Path(sys.executable).parent
NET = str(Path(__file__).resolve().with_name("router_bench_net.py"))

# Bars from the issue; the anchor is vllm-router measured in the same run, these earlier
# figures stand in for it when it is not run (--only ours).
ANCHOR = {"added_p50_ms": 0.34, "added_p99_ms": 0.42, "chunks_per_s": 100_000.0}
MAX_KB_PER_STREAM = 100.0


# ---------------------------------------------------------------------------------------------
# Orchestration: processes, readiness, the tests.


class Procs:
    """Every process this script starts; stopped by pid (and their descendants) in stop()/stop_all()."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        kids = tree_pids(p.pid)[1:] if p.poll() is None else []
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        if p.stdout is not None:
            p.stdout.close()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_status(method: str, url: str, body: bytes | None = None) -> int:
    host, port = split_url(url)
    path = "/" + url.split("://", 1)[-1].split("/", 1)[1] if url.count("/") > 2 else "/"
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def wait_ready(p: subprocess.Popen[bytes], name: str, checks: list[tuple[str, str, bytes | None]]) -> None:
    deadline = time.monotonic() + 90
    for method, url, body in checks:
        while http_status(method, url, body) != 200:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} before answering {method} {url}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer {method} {url} within 90 s")
            time.sleep(0.1)


@dataclass
class Candidate:
    name: str
    argv: Callable[[int, str], list[str]]  # (port, upstream url) -> command
    health: str  # its own readiness path
    missing: Callable[[], str | None]  # why it cannot run, or None


def _vllm_router_argv(port: int, upstream: str) -> list[str]:
    return [
        str(BIN / "vllm-router"),
        "--host",
        HOST,
        "--port",
        str(port),
        "--worker-urls",
        upstream,
        "--policy",
        "round_robin",
        "--prometheus-port",
        str(free_port()),
        "--worker-startup-check-interval",
        "1",
    ]


def _ours_argv(port: int, upstream: str) -> list[str]:
    return [
        str(BIN / "vllm-operator"),
        "router",
        "--upstream",
        f"{MODEL}={upstream}",
        "--host",
        HOST,
        "--port",
        str(port),
    ]


def _vllm_router_missing() -> str | None:
    if not (BIN / "vllm-router").exists():
        return f"{BIN / 'vllm-router'} not found (pip install 'vllm-router==0.1.17', or the bench extra)"
    return None


def _ours_missing() -> str | None:
    exe = BIN / "vllm-operator"
    if not exe.exists():
        return f"{exe} not found (pip install -e .)"
    r = subprocess.run([str(exe), "router", "--help"], capture_output=True, timeout=60)
    if r.returncode != 0:
        return "`vllm-operator router --help` fails: the router command is not there yet"
    return None


CANDIDATES = [
    Candidate("vllm-router", _vllm_router_argv, "/health", _vllm_router_missing),
    Candidate("ours", _ours_argv, "/healthz", _ours_missing),
]


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Procs) -> None:
        self.args, self.procs = args, procs
        self.startup_s: dict[str, float] = {}

    @contextlib.contextmanager
    def upstream(self, chunks: int = 1, interval_ms: float = 0) -> Iterator[tuple[str, int]]:
        port = free_port()
        argv = [sys.executable, NET, "upstream", str(port), str(chunks), str(interval_ms)]
        p = self.procs.start("upstream", argv)
        try:
            wait_ready(p, "upstream", [("GET", f"http://{HOST}:{port}/health", None)])
            yield f"http://{HOST}:{port}", p.pid
        finally:
            self.procs.stop(p)

    @contextlib.contextmanager
    def router(self, cand: Candidate, upstream: str) -> Iterator[tuple[str, int]]:
        port = free_port()
        argv = ["taskset", "-c", str(ROUTER_CORE), *cand.argv(port, upstream)]
        t0 = time.monotonic()
        p = self.procs.start(cand.name, argv)
        url = f"http://{HOST}:{port}"
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
        try:
            wait_ready(
                p,
                cand.name,
                [("GET", url + cand.health, None), ("POST", url + "/v1/chat/completions", body)],
            )
            self.startup_s[cand.name] = time.monotonic() - t0
            yield url, p.pid
        finally:
            self.procs.stop(p)

    def load(self, kind: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
        argv = [sys.executable, NET, "load", kind, json.dumps(cfg)]
        p = self.procs.start(f"load-{kind}", argv, stdout_pipe=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"load generator {kind} took more than {timeout:.0f} s") from None
        finally:
            self.procs.stop(p)
        if p.returncode != 0:
            raise RuntimeError(f"load generator {kind} exited {p.returncode}; see {self.procs.logdir}")
        result: dict[str, Any] = json.loads(out)
        return result

    # the tests
    def ceiling(self) -> dict[str, Any]:
        """Chunks/s with no router: what the upstream and the clients on core 1 can do."""
        a = self.args
        with self.upstream(a.stream_chunks, 0) as (up, up_pid):
            cfg = {
                "url": up,
                "concurrency": a.concurrency,
                "chunks": a.stream_chunks,
                "warmup_s": 1.0,
                "duration_s": min(a.duration, 5.0),
                "watch_pids": [up_pid],
            }
            return self.load("chunks", cfg, 60 + a.duration)

    def latency(self, cands: list[Candidate]) -> dict[str, dict[str, Any]]:
        """All routers up at once (all on core 0, only one busy at a time); the load takes turns
        over the upstream and each router in 1 s slices, so all see the same background load."""
        a = self.args
        with contextlib.ExitStack() as stack:
            up, _ = stack.enter_context(self.upstream())
            routers = [stack.enter_context(self.router(c, up)) for c in cands]
            cfg = {
                "urls": [up, *(url for url, _ in routers)],
                "pids": [None, *(pid for _, pid in routers)],
                "rate": a.rate,
                "slice_s": 1.0,
                "duration_s": a.duration,
            }
            r = self.load("latency", cfg, 60 + (1 + len(cands)) * (1 + a.duration))
            out: dict[str, dict[str, Any]] = {}
            for k, (c, (_, pid)) in enumerate(zip(cands, routers, strict=True), start=1):
                out[c.name] = {
                    "direct": r["targets"][0],
                    "via": r["targets"][k],
                    "errors_direct": r["errors"][0],
                    "errors_via": r["errors"][k],
                    "new_conns_direct_via": [r["new_conns"][0], r["new_conns"][k]],
                    "send_lag_p99_ms": r["send_lag_p99_ms"],
                    "router_cpu_pct": r["cpu_pct_of_slices"][k],
                    "router_runq_ms_per_s": r["runq_ms_per_s"][k],
                    "router_nofile": nofile_limit(pid),
                    "router_threads": threads(pid),
                    "router_startup_s": self.startup_s[c.name],
                }
            return out

    def chunks(self, cand: Candidate) -> dict[str, Any]:
        a = self.args
        with self.upstream(a.stream_chunks, 0) as (up, up_pid), self.router(cand, up) as (url, pid):
            cfg = {
                "url": url,
                "concurrency": a.concurrency,
                "chunks": a.stream_chunks,
                "warmup_s": 1.0,
                "duration_s": a.duration,
                "watch_pids": [up_pid],
                "router_pid": pid,
            }
            return self.load("chunks", cfg, 60 + a.duration)

    def streams(self, cand: Candidate) -> dict[str, Any]:
        a = self.args
        chunks = max(1, round(a.stream_seconds))
        with self.upstream(chunks, 1000) as (up, _), self.router(cand, up) as (url, pid):
            cfg = {
                "url": url,
                "streams": a.streams,
                "chunks": chunks,
                "interval_ms": 1000,
                "ramp_per_s": a.ramp,
                "router_pid": pid,
            }
            return self.load("streams", cfg, 120 + a.stream_seconds + a.streams / a.ramp)

    def run(self, cand: Candidate) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for test in ("chunks", "streams"):
            t = time.monotonic()
            print(f"  {cand.name}: {test} ...", end="", flush=True)
            try:
                out[test] = getattr(self, test)(cand)
            except RuntimeError as e:
                out[test] = {"failed": str(e)}
                print(f" FAILED: {e}", flush=True)
                continue
            print(f" {time.monotonic() - t:.0f} s", flush=True)
        return out


# ---------------------------------------------------------------------------------------------
# The table


def figures(r: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one candidate's results (None where a test failed)."""
    f: dict[str, Any] = {}
    lat = r.get("latency", {})
    if "via" in lat and lat["via"].get("n") and lat["direct"].get("n"):
        f["added_p50_ms"] = lat["via"]["p50_ms"] - lat["direct"]["p50_ms"]
        f["added_p99_ms"] = lat["via"]["p99_ms"] - lat["direct"]["p99_ms"]
        f["direct_ms"] = f"{lat['direct']['p50_ms']:.3f} / {lat['direct']['p99_ms']:.3f}"
        f["via_ms"] = f"{lat['via']['p50_ms']:.3f} / {lat['via']['p99_ms']:.3f}"
        f["lat_errors"] = lat["errors_direct"] + lat["errors_via"]
        f["lat_cpu"] = lat["router_cpu_pct"]
        f["lat_runq"] = lat.get("router_runq_ms_per_s")
        f["startup_s"] = lat.get("router_startup_s")
        f["nofile"] = lat.get("router_nofile")
        f["threads"] = lat.get("router_threads")
    ch = r.get("chunks", {})
    if "chunks_per_s" in ch:
        f["chunks_per_s"] = ch["chunks_per_s"]
        f["chunks_cpu"] = ch["router_cpu_pct"]
        f["chunks_core1"] = ch["core1_cpu_pct"]
        f["chunks_errors"] = ch["errors"]
        f["lines_per_chunk"] = ch.get("data_lines_per_http_chunk")
        if ch["router_cpu_pct"]:
            f["chunks_per_cpu_s"] = ch["chunks_per_s"] / (ch["router_cpu_pct"] / 100)
    st = r.get("streams", {})
    if "ok" in st:
        f["streams_ok"] = f"{st['ok']} / {st['errors']}"
        f["streams_pass"] = st["errors"] == 0 and st["ok"] == st["streams"]
        f["kb_per_stream"] = st["kb_per_stream"]
        f["max_open"] = st["max_open"]
        f["rss"] = f"{st['idle_rss_kb'] / 1024:.1f} -> {st['peak_rss_kb'] / 1024:.1f}"
    if "nofile" in f:
        f["limits"] = f"{f['nofile']} / {f['threads']}"
    return f


def table(results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> str:
    fr = {name: figures(r) for name, r in results.items()}
    anchor = fr.get("vllm-router", {})
    src = "same run" if anchor else "earlier anchor"
    a50 = anchor.get("added_p50_ms", ANCHOR["added_p50_ms"])
    a99 = anchor.get("added_p99_ms", ANCHOR["added_p99_ms"])
    acs = anchor.get("chunks_per_s", ANCHOR["chunks_per_s"])
    acpu = anchor.get("chunks_per_cpu_s", ANCHOR["chunks_per_s"])  # the anchor ran one core flat out
    ours = fr.get("ours")

    def num(v: Any, fmt: str) -> str:
        if v is None:
            return "-"
        return format(v, fmt) if isinstance(v, int | float) else str(v)

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None or ours is None else ("PASS" if ok else "FAIL")

    def get(key: str) -> Any:
        return ours.get(key) if ours else None

    rows: list[tuple[str, str, str, str]] = [
        ("added latency p50 (ms)", "added_p50_ms", f"<= {2 * a50:.3f} (2x)", ".3f"),
        ("added latency p99 (ms)", "added_p99_ms", f"<= {2 * a99:.3f} (2x)", ".3f"),
        ("relayed SSE chunks/s (1 core)", "chunks_per_s", f">= {0.5 * acs:,.0f} (0.5x)", ",.0f"),
        ("  same, per router CPU-second", "chunks_per_cpu_s", f">= {0.5 * acpu:,.0f} (0.5x)", ",.0f"),
        ("open streams ok / errors", "streams_ok", "all ok, 0 errors", ""),
        ("router KB per open stream", "kb_per_stream", f"<= {MAX_KB_PER_STREAM:.0f}", ".1f"),
    ]

    def cmp(key: str, bar: float, most: bool) -> bool | None:
        v = get(key)
        return None if v is None else bool(v <= bar if most else v >= bar)

    checks: dict[str, bool | None] = {
        "added_p50_ms": cmp("added_p50_ms", 2 * a50, True),
        "added_p99_ms": cmp("added_p99_ms", 2 * a99, True),
        "chunks_per_s": cmp("chunks_per_s", 0.5 * acs, False),
        "chunks_per_cpu_s": cmp("chunks_per_cpu_s", 0.5 * acpu, False),
        "streams_ok": get("streams_pass"),
        "kb_per_stream": cmp("kb_per_stream", MAX_KB_PER_STREAM, True),
    }
    names = [c.name for c in CANDIDATES]
    header = ["figure", *names, f"bar for ours ({src})", "ours"]
    lines = [header]
    for label, key, bar, fmt in rows:
        lines.append([label, *(num(fr.get(n, {}).get(key), fmt) for n in names), bar, verdict(checks[key])])
    lines.append(["-- context --", *([""] * len(names)), "", ""])
    ctx = [
        ("direct p50 / p99 (ms)", "direct_ms", ""),
        ("via router p50 / p99 (ms)", "via_ms", ""),
        ("latency errors", "lat_errors", ""),
        ("router CPU % at the req rate", "lat_cpu", ".0f"),
        ("router waiting for its core (ms/s)", "lat_runq", ".1f"),
        ("router CPU % relaying chunks", "chunks_cpu", ".0f"),
        ("core 1 CPU % (upstream + clients)", "chunks_core1", ".0f"),
        ("chunk test errors", "chunks_errors", ""),
        ("data: lines per HTTP chunk received", "lines_per_chunk", ".2f"),
        ("max open streams at once", "max_open", ""),
        ("router RSS idle -> peak (MiB)", "rss", ""),
        ("router startup to first answer (s)", "startup_s", ".1f"),
        ("router RLIMIT_NOFILE / threads", "limits", ""),
    ]
    for label, key, fmt in ctx:
        lines.append([label, *(num(fr.get(n, {}).get(key), fmt) for n in names), "", ""])
    for n in names:
        if n not in results:
            for row in lines[1:]:
                if row[0] != "-- context --":
                    row[1 + names.index(n)] = "skipped" if n in skipped else "not run"
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for j, row in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    for n, why in skipped.items():
        out.append(f"{n}: skipped: {why}")
    for n, r in results.items():
        for test, t in r.items():
            if "failed" in t:
                out.append(f"{n}: {test} failed: {t['failed']}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=[c.name for c in CANDIDATES], help="run one candidate")
    p.add_argument("--quick", action="store_true", help="short smoke run (3 s tests, 500 streams)")
    p.add_argument("--streams", type=int, help="concurrent open streams (default 8000; --quick 500)")
    p.add_argument("--stream-seconds", type=float, help="how long each open stream lasts (default 20)")
    p.add_argument("--rate", type=float, default=500, help="non-streaming req/s (default 500)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 10; --quick 3)")
    p.add_argument("--concurrency", type=int, default=64, help="streaming clients in the chunk test")
    p.add_argument("--stream-chunks", type=int, default=1000, help="chunks per stream in the chunk test")
    p.add_argument("--ramp", type=float, default=2000, help="new open streams per second")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    a = p.parse_args(argv)
    a.streams = a.streams or (500 if a.quick else 8000)
    a.stream_seconds = a.stream_seconds or (5.0 if a.quick else 20.0)
    a.duration = a.duration or (3.0 if a.quick else 10.0)
    return a


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if len(os.sched_getaffinity(0) | {ROUTER_CORE, LOAD_CORE}) > len(os.sched_getaffinity(0)):
        print(f"needs cores {ROUTER_CORE} and {LOAD_CORE}", file=sys.stderr)
        return 2
    if shutil.which("taskset") is None:
        print("needs taskset (util-linux)", file=sys.stderr)
        return 2
    nofile = raise_nofile()
    if nofile < 2 * args.streams + 1000:  # the router holds a client and an upstream socket per stream
        print(
            f"warning: RLIMIT_NOFILE is {nofile} (hard limit), short for {args.streams} streams",
            file=sys.stderr,
        )
    os.sched_setaffinity(0, {LOAD_CORE})  # this script, the upstream and the clients: core 1
    exit_on_signals()

    logdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    procs = Procs(logdir)
    bench = Bench(args, procs)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    print(
        f"router on core {ROUTER_CORE}; upstream + clients on core {LOAD_CORE}; RLIMIT_NOFILE {nofile}; "
        f"rate {args.rate:g}/s x {args.duration:g} s; "
        f"{args.concurrency} streams x {args.stream_chunks} chunks; "
        f"{args.streams} open streams x {args.stream_seconds:g} s; logs in {logdir}",
        flush=True,
    )
    try:
        cands = [c for c in CANDIDATES if args.only in (None, c.name)]
        for c in cands:
            why = c.missing()
            if why:
                skipped[c.name] = why
                print(f"  {c.name}: SKIPPED: {why}", flush=True)
        if len(skipped) < len(cands):
            ceiling = bench.ceiling()
            print(
                f"  no router (upstream + clients alone on core {LOAD_CORE}): "
                f"{ceiling['chunks_per_s']:,.0f} chunks/s, core 1 at {ceiling['core1_cpu_pct']:.0f}%",
                flush=True,
            )
        cands = [c for c in cands if c.name not in skipped]
        lat: dict[str, dict[str, Any]] = {}
        if cands:
            t = time.monotonic()
            names = ", ".join(c.name for c in cands)
            print(f"  added latency (upstream, {names} taking turns) ...", end="", flush=True)
            try:
                lat = bench.latency(cands)
            except RuntimeError as e:
                print(f" FAILED: {e}", flush=True)
                lat = {c.name: {"failed": str(e)} for c in cands}
            else:
                print(f" {time.monotonic() - t:.0f} s", flush=True)
        for c in cands:
            results[c.name] = {"latency": lat[c.name], **bench.run(c)}
    except KeyboardInterrupt:
        print("\ninterrupted; stopping what was started", file=sys.stderr)
        return 130
    except SystemExit as e:  # SIGTERM, SIGHUP (_on_signal)
        print(f"\nstopped by a signal; stopping what was started (exit {e.code})", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print()
    print(table(results, skipped))
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
