"""The upstream stand-in and the load generators of bench/router_bench.py, one process each.

    python bench/router_bench_net.py upstream PORT CHUNKS INTERVAL_MS
    python bench/router_bench_net.py load latency|chunks|streams CONFIG_JSON   # prints JSON

Both are asyncio Protocols on uvloop, HTTP parsed by httptools, so that neither is the bottleneck:

- upstream: an OpenAI-compatible HTTP/1.1 keep-alive server. `POST /v1/chat/completions` and
  `/v1/completions` answer a small fixed JSON, or with `"stream": true` CHUNKS `data: {...}` SSE
  events (each its own HTTP chunk) INTERVAL_MS apart then `data: [DONE]`; the request headers
  `x-bench-chunks` and `x-bench-interval-ms` override both. `GET /v1/models`, `GET /health`.
- load: raw keep-alive HTTP/1.1 connections, one request at a time each; per-request latency with
  time.perf_counter, `data:` lines counted in the bytes received. The router's CPU time and RSS
  are read from /proc in the same process, over the same window.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools
import uvloop

MODEL = "bench-model"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------------------------
# /proc


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (from /proc/PID/task/TID/children)."""
    out, i = [pid], 0
    while i < len(out):
        p, i = out[i], i + 1
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
    return out


def rss_kb(pid: int) -> int:
    """VmRSS in kB summed over pid's process tree."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds."""
    ticks = 0
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def runq_s(pids: list[int]) -> float:
    """Time these processes' threads spent runnable but waiting for a CPU (schedstat), in seconds."""
    ns = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[1])
    return ns / 1e9


def threads(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/task")) for p in tree_pids(pid) if os.path.exists(f"/proc/{p}"))


def nofile_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


# ---------------------------------------------------------------------------------------------
# Upstream stand-in: an OpenAI-compatible server that answers at once.


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHAT_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"delta":{"content":"tok"},"logprobs":null,"finish_reason":null}]}\n\n'
)
TEXT_EVENT = (
    b'data: {"id":"cmpl-bench","object":"text_completion","created":0,"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"text":"tok","logprobs":null,"finish_reason":null}]}\n\n'
)
DONE_TAIL = _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
CHAT_JSON = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15},
    },
    separators=(",", ":"),
).encode()
TEXT_JSON = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "text": "Hello from the bench upstream.", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15},
    },
    separators=(",", ":"),
).encode()
MODELS_JSON = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}]}
).encode()
BATCH = 16  # events per transport.write when streaming as fast as possible (each its own chunk)


def _response(status: str, body: bytes, ctype: bytes = b"application/json", close: bool = False) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status.encode(),
        ctype,
        len(body),
        conn,
        body,
    )


@dataclass
class Request:
    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool


class Upstream(asyncio.Protocol):
    """One connection of the stand-in; requests are answered in order, one at a time."""

    def __init__(self, chunks: int, interval_ms: float) -> None:
        self.chunks, self.interval_ms = chunks, interval_ms
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.pending: deque[Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.resume: asyncio.Future[None] | None = None

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)

    def pause_writing(self) -> None:
        self.resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)
        self.resume = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_response("400 Bad Request", b"", close=True))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req = Request(
            self.parser.get_method(),
            self.url.split(b"?", 1)[0],
            self.headers,
            b"".join(self.body),
            self.parser.should_keep_alive(),
        )
        if self.task is not None:
            self.pending.append(req)
        else:
            self.handle(req)

    # answers
    def handle(self, req: Request) -> None:
        t = self.transport
        assert t is not None
        if t.is_closing():
            return
        close = not req.keep_alive
        if req.method == b"GET" and req.path in (b"/health", b"/healthz"):
            t.write(_response("200 OK", b"", b"text/plain", close))
        elif req.method == b"GET" and req.path == b"/v1/models":
            t.write(_response("200 OK", MODELS_JSON, close=close))
        elif req.method == b"POST" and req.path in (b"/v1/chat/completions", b"/v1/completions"):
            chat = req.path == b"/v1/chat/completions"
            try:
                body = json.loads(req.body)
            except ValueError:
                t.write(_response("400 Bad Request", b'{"error":"bad json"}', close=close))
            else:
                if isinstance(body, dict) and body.get("stream"):
                    chunks = int(req.headers.get(b"x-bench-chunks", self.chunks))
                    interval = float(req.headers.get(b"x-bench-interval-ms", self.interval_ms))
                    self.task = asyncio.ensure_future(self.stream(chunks, interval / 1000, chat, close))
                    return
                t.write(_response("200 OK", CHAT_JSON if chat else TEXT_JSON, close=close))
        else:
            t.write(_response("404 Not Found", b'{"error":"not found"}', close=close))
        self.done(close)

    def done(self, close: bool) -> None:
        assert self.transport is not None
        if close:
            self.transport.close()
        elif self.pending:
            self.handle(self.pending.popleft())

    async def stream(self, chunks: int, interval_s: float, chat: bool, close: bool) -> None:
        t = self.transport
        assert t is not None
        event = _frame(CHAT_EVENT if chat else TEXT_EVENT)
        t.write(STREAM_HEAD)
        try:
            if interval_s > 0:
                for i in range(chunks):
                    if i:
                        await asyncio.sleep(interval_s)
                    if t.is_closing():
                        return
                    t.write(event)
            else:
                batch = event * BATCH
                left = chunks
                while left > 0:
                    if t.is_closing():
                        return
                    t.write(batch if left >= BATCH else event * left)
                    left -= BATCH
                    if self.resume is not None:
                        await self.resume
                    else:
                        await asyncio.sleep(0)
            t.write(DONE_TAIL)
        except asyncio.CancelledError:
            return
        self.task = None
        self.done(close)


async def serve_upstream(port: int, chunks: int, interval_ms: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(chunks, interval_ms), HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------------------------
# Load generator: raw keep-alive HTTP/1.1 connections, one request at a time each.


class Counter:
    def __init__(self) -> None:
        self.chunks = 0
        self.bodies = 0  # on_body calls: HTTP chunks received (or pieces of them, split across reads)
        self.open = 0  # responses whose headers arrived and that have not ended
        self.max_open = 0


class Client(asyncio.Protocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.chunks = 0
        self.tail = b""
        self.t_send = 0.0
        self.t_done = 0.0
        self.keep_alive = True
        self.in_response = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._end()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(ConnectionError(f"bad response: {e!r}"))
            assert self.transport is not None
            self.transport.close()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.in_response = True
        c = self.counter
        c.open += 1
        if c.open > c.max_open:
            c.max_open = c.open

    def on_body(self, body: bytes) -> None:
        n = body.count(b"data:")
        if self.tail:
            n += (self.tail + body[:4]).count(b"data:")
        self.tail = body[-4:]
        self.chunks += n
        self.counter.chunks += n
        self.counter.bodies += 1

    def on_message_complete(self) -> None:
        self.t_done = time.perf_counter()
        self._end()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _end(self) -> None:
        if self.in_response:
            self.in_response = False
            self.counter.open -= 1

    def request(self, data: bytes) -> asyncio.Future[None]:
        assert self.transport is not None
        self.status, self.chunks, self.tail = 0, 0, b""
        self.waiter = asyncio.get_running_loop().create_future()
        self.t_send = time.perf_counter()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def split_url(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[-1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


def build_request(url: str, stream: bool, headers: dict[str, str] | None = None) -> bytes:
    host, port = split_url(url)
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": stream,
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: {'text/event-stream' if stream else 'application/json'}\r\n"
        f"Content-Length: {len(raw)}\r\n{extra}\r\n"
    )
    return head.encode() + raw


async def connect(url: str, counter: Counter) -> Client:
    host, port = split_url(url)
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Client(counter), host, port)
    return proto


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile of values (not empty)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def summary_ms(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": pct(values, 0.50) * 1000,
        "p99_ms": pct(values, 0.99) * 1000,
        "mean_ms": sum(values) / len(values) * 1000,
        "max_ms": max(values) * 1000,
    }


async def load_latency(cfg: dict[str, Any]) -> dict[str, Any]:
    """Open loop at cfg['rate'] req/s over cfg['urls'] (the upstream first, then each router), in
    slices of cfg['slice_s'] taking turns, so that every target sees the same background load.
    The first round of slices warms up; then each target gets cfg['duration_s'] seconds."""
    urls: list[str] = cfg["urls"]
    pids = [tree_pids(p) if p else [] for p in cfg["pids"]]
    n = len(urls)
    reqs = [build_request(u, False) for u in urls]
    counter = Counter()
    idle: list[list[Client]] = [[await connect(u, counter) for _ in range(cfg.get("pool", 16))] for u in urls]
    lat: list[list[float]] = [[] for _ in urls]
    errors = [0] * n
    new_conns = [0] * n
    lags: list[float] = []
    slice_s = cfg["slice_s"]
    period = 1 / cfg["rate"]
    warm_s = n * slice_s
    total_s = warm_s + n * cfg["duration_s"]
    tasks: set[asyncio.Task[None]] = set()

    async def one(k: int, record: bool) -> None:
        conn = idle[k].pop() if idle[k] else None
        try:
            if conn is None:
                new_conns[k] += 1
                conn = await connect(urls[k], counter)
            await asyncio.wait_for(conn.request(reqs[k]), 10)
        except (OSError, TimeoutError):
            errors[k] += 1
            if conn is not None:
                conn.close()
            return
        if conn.status != 200:
            errors[k] += 1
        elif record:
            lat[k].append(conn.t_done - conn.t_send)
        if conn.keep_alive and not conn.lost:
            idle[k].append(conn)
        else:
            conn.close()

    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    cpu0: list[float] = []
    wait0: list[float] = []
    tc0 = 0.0
    i = 0
    while True:
        t_sched = t0 + i * period
        elapsed = t_sched - t0
        if elapsed >= total_s:
            break
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = elapsed >= warm_s
        if record and not cpu0:
            cpu0, wait0, tc0 = [cpu_s(p) for p in pids], [runq_s(p) for p in pids], time.perf_counter()
        if record:
            lags.append(time.perf_counter() - t_sched)
        task = asyncio.ensure_future(one(int(elapsed / slice_s) % n, record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    cpu1, wait1, tc1 = [cpu_s(p) for p in pids], [runq_s(p) for p in pids], time.perf_counter()
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    gc.enable()
    active = (tc1 - tc0) / n  # each target's share of the window
    return {
        "targets": [summary_ms(v) for v in lat],
        "errors": errors,
        "new_conns": new_conns,
        "send_lag_p99_ms": pct(lags, 0.99) * 1000 if lags else None,
        # CPU time over the whole window (idle slices included) per second of the target's slices
        "cpu_pct_of_slices": [
            100 * (b - a) / active if p else None for a, b, p in zip(cpu0, cpu1, pids, strict=True)
        ],
        # time runnable but not running (another process had the core), per second of its slices
        "runq_ms_per_s": [
            1000 * (b - a) / active if p else None for a, b, p in zip(wait0, wait1, pids, strict=True)
        ],
    }


async def load_chunks(cfg: dict[str, Any]) -> dict[str, Any]:
    """cfg['concurrency'] clients each loop over streaming requests; chunks/s in the window."""
    url = cfg["url"]
    req = build_request(url, True)
    counter = Counter()
    conns = [await connect(url, counter) for _ in range(cfg["concurrency"])]
    expect = cfg["chunks"] + 1 if cfg.get("chunks") else 0  # + the [DONE] line
    stop = False
    streams = errors = 0
    watch = [p for pid in cfg.get("watch_pids", []) for p in tree_pids(pid)]

    async def user(conn: Client) -> None:
        nonlocal streams, errors
        while not stop:
            try:
                await conn.request(req)
            except OSError:
                if not stop:
                    errors += 1
                return
            if conn.status != 200 or (expect and conn.chunks != expect):
                errors += 1
            streams += 1
            if not conn.keep_alive:
                conn.close()
                conn = await connect(url, counter)

    gc.collect()
    gc.disable()
    tasks = [asyncio.ensure_future(user(c)) for c in conns]
    await asyncio.sleep(cfg["warmup_s"])
    c0, b0, s0, t0 = counter.chunks, counter.bodies, streams, time.perf_counter()
    cpu0, own0 = cpu_s(watch), time.process_time()
    router0 = cpu_s(tree_pids(cfg["router_pid"])) if cfg.get("router_pid") else 0.0
    await asyncio.sleep(cfg["duration_s"])
    c1, b1, s1, t1 = counter.chunks, counter.bodies, streams, time.perf_counter()
    cpu1, own1 = cpu_s(watch), time.process_time()
    router1 = cpu_s(tree_pids(cfg["router_pid"])) if cfg.get("router_pid") else 0.0
    stop = True
    for c in conns:
        c.close()
    await asyncio.wait(tasks, timeout=5)
    gc.enable()
    wall = t1 - t0
    return {
        "chunks_per_s": (c1 - c0) / wall,
        "streams_per_s": (s1 - s0) / wall,
        "data_lines_per_http_chunk": (c1 - c0) / max(1, b1 - b0),
        "errors": errors,
        "router_cpu_pct": 100 * (router1 - router0) / wall if cfg.get("router_pid") else None,
        "core1_cpu_pct": 100 * ((cpu1 - cpu0) + (own1 - own0)) / wall,
    }


async def load_streams(cfg: dict[str, Any]) -> dict[str, Any]:
    """cfg['streams'] concurrent streams through the router; RSS of its tree sampled meanwhile."""
    url, n, expect = cfg["url"], cfg["streams"], cfg["chunks"] + 1  # + the [DONE] line
    pid = cfg["router_pid"]
    counter = Counter()
    # Warm the router (pools, first-request allocations), then read its idle RSS.
    warm = build_request(url, True, {"x-bench-chunks": "2", "x-bench-interval-ms": "0"})
    conn = await connect(url, counter)
    for _ in range(20):
        await asyncio.wait_for(conn.request(warm), 10)
    conn.close()
    await asyncio.sleep(1.0)
    idle_kb = rss_kb(pid)
    req = build_request(url, True)
    ok = 0
    errors: dict[str, int] = {}
    timeout = cfg["chunks"] * cfg["interval_ms"] / 1000 + 60

    def err(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def one() -> None:
        nonlocal ok
        conn: Client | None = None
        try:
            conn = await asyncio.wait_for(connect(url, counter), 60)
            await asyncio.wait_for(conn.request(req), timeout)
        except TimeoutError:
            err("timeout")
        except OSError as e:
            err(type(e).__name__)
        else:
            if conn.status != 200:
                err(f"status {conn.status}")
            elif conn.chunks != expect:
                err("short stream")
            else:
                ok += 1
        finally:
            if conn is not None:
                conn.close()

    peak = {"kb": idle_kb, "kb_all_open": 0}

    async def sample() -> None:
        while True:
            kb = rss_kb(pid)
            peak["kb"] = max(peak["kb"], kb)
            if counter.open >= n:
                peak["kb_all_open"] = max(peak["kb_all_open"], kb)
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample())
    tasks: list[asyncio.Task[None]] = []
    batch = max(1, int(cfg["ramp_per_s"] / 10))
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        tasks += [asyncio.ensure_future(one()) for _ in range(min(batch, n - i))]
        await asyncio.sleep(0.1)
    ramp_s = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    sampler.cancel()
    return {
        "streams": n,
        "ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "max_open": counter.max_open,
        "idle_rss_kb": idle_kb,
        "peak_rss_kb": peak["kb"],
        "rss_all_open_kb": peak["kb_all_open"] or None,
        "kb_per_stream": (peak["kb"] - idle_kb) / n,
        "ramp_s": ramp_s,
        "wall_s": time.perf_counter() - t0,
        "router_threads_peak": threads(pid),
    }


LOADS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "latency": load_latency,
    "chunks": load_chunks,
    "streams": load_streams,
}


def main(argv: list[str]) -> int:
    gc.disable()  # short-lived, allocation-light processes: no collector pauses in the figures
    if argv[:1] == ["upstream"] and len(argv) == 4:
        uvloop.run(serve_upstream(int(argv[1]), int(argv[2]), float(argv[3])))
        return 0
    if argv[:1] == ["load"] and len(argv) == 3 and argv[1] in LOADS:
        result = uvloop.run(LOADS[argv[1]](json.loads(argv[2])))
        print(json.dumps(result))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
