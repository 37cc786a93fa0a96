"""Benchmark: prefix affinity in `vllm-operator router` on real vLLM CPU replicas, vs RoundRobin.

Four `python -m vllm_server` replicas of a random Llama built here (devtools/tinymodel.py, nothing
downloaded) with prefix caching on, started once; for each strategy a fresh
`vllm-operator router --strategy S --upstream tiny=...` in front of them. Same servers, same run.

The model and the cache are sized so that prefix caching can matter, as it does for a real model:
- hidden 512, 4 layers (--hidden-size, --layers; the tests' tiny model is 128 x 2, on which a
  cold 450-token prefill costs ~26 ms more than a cached one, less than the engines' per-step
  overhead under load, so no routing could change TTFT much);
- each replica's KV cache holds --kv-sessions whole conversations (default 12 of the 32, by
  --num-gpu-blocks-override), as a real replica's cache holds a fraction of the conversations in
  flight: a router that spreads a conversation over every replica makes each cache hold them all.

Scenarios, each run --rounds times per strategy (default 3; the strategy that goes first
alternates by round, each run has a fresh router and its own texts); the figures pool the rounds
(counters summed, TTFTs and samples pooled) and show each round's too:

- multiturn: --sessions conversations x --turns turns, --concurrency sessions at a time (default
  all), the turns of a session in order, with a think time before each turn >= 2 drawn uniformly
  from [0, --think-ms]. Turn k sends the whole history: a short system prompt (shared by the
  run's sessions), the session's own first user message (--context-words words, ~1.35 tokens
  each, distinct per session), the assistant answers it got back and the later user messages
  (~20 tokens each). Streaming, --max-tokens 1 (ignore_eos, temperature 0): TTFT is the figure,
  and with longer answers a TTFT here is mostly the decode steps of the requests already running
  (4 engines on one core), which prefix caching does not shorten: with 8-token answers even
  Direct (below) gets only 0.64x RoundRobin's TTFT.
- shared: the same, but every request starts with one long system prompt (--context-words
  words) and the sessions differ only after it (a ~80-token first user message).

Figures per strategy and scenario:

- prefix-cache hit rate on turns >= 2: the run has two phases, turn 1 of every session (phase A),
  then turns 2.. of every session (phase B, same concurrency). The 4 servers' counters
  `vllm:prefix_cache_hits_total` and `vllm:prefix_cache_queries_total` (vLLM counts tokens: prompt
  tokens looked up, and those found cached) are read after phase A and after phase B; the hit rate
  is the cluster's delta of hits over its delta of queries in phase B.
- TTFT: request sent to the first SSE chunk with non-empty `delta.content`, measured by this
  client through the router; p50/p99 over turns >= 2 (and turn 1 for reference).
- balance: every 0.1 s the router's `/router/demand` `podInFlight` map is read (the router's own
  in-flight count per replica, one consistent snapshot of all 4, and the quantity the balancer
  bounds); every 10th of them is a 1 s sample, the bar's. Each sample's max/mean over the
  replicas. The bars are judged on the steady 1 s samples: phase B from its start until the first
  session has ended. After that fewer sessions are left than replicas x their share, the busiest
  replica is the slowest to drain, and max/mean grows for any router (with 2 requests left it is
  at least 2); the worst "loaded" sample (in flight >= replicas) over the whole run, drains
  included, and the 0.1 s samples are printed too. Also the requests each replica got over the
  run (the router's `vllm_router_pod_requests_total`), max/mean.
- shared scenario, "load": the same in-flight max/mean (bar 1.3 at every steady 1 s sample), and
  the requests per replica over the run.

The bundled server has no route to reset the prefix cache (vLLM's /reset_prefix_cache is not
served), so every (scenario, strategy) run uses its own texts: a per-run tag (the run's number in
hex, then a random salt) starts the system prompt of every request (in the first 32-token KV
block), so no run can hit blocks cached by another.

A third column, Direct, is a reference without the router (--no-reference skips it): the client
sends session s straight to replica s mod n, perfect affinity with an even spread of sessions;
its hit rate is the most this trace and block size allow, its TTFT what the replicas give without
the router and without affinity's imbalance. It has no in-flight samples.

For each run the machine's /proc/vmstat major page faults and direct-reclaim stalls are counted,
to tell memory stalls from routing effects: this VM pages out cold page-cache pages (DAMON), and
an engine that faults its code back in stalls.

An idle probe on one replica (no router, nothing else in flight) times a cold first turn
against the same prompt again with a few new tokens (cached): what prefix caching can save per
request on this model at all, next to the TTFTs under load.

Engine settings: devtools/realserver.py's ENGINE_FLAGS plus --enable-prefix-caching and
--block-size 32 (vLLM's CPU default is 128; only full blocks are cached, so 128-token rounding
alone would cost a turn ~64 tokens of hits). Placement (--layout): `split` (default) puts every
process of the replicas on all cores but the last and the router and this client on the last
core; `shared` lets everything share every core. Each replica's OpenMP threads are bound to one
core (VLLM_CPU_OMP_THREADS_BIND; replicas alternate over their cores) and the replicas run at
--niceness. Each vLLM replica is 3 processes (API server, engine core, worker) and the engine
core and worker busy-poll for 1 s after every message, so with `shared` the router competes
with 8 spinning processes for 2 cores and its hop picks up tail latency from that contention;
`split` keeps most of that out of the TTFTs (compare with the Direct column).

    PYTHONPATH=. .venv/bin/python bench/router_affinity.py [--quick] [--servers 4] [--sessions 32]
        [--turns 6] [--concurrency 32] [--rounds 3] [--think-ms 0] [--layout split]
        [--context-words 1200] [--hidden-size 512] [--layers 4] [--kv-sessions 12]
        [--strategies RoundRobin,PrefixAffinity] [--block-size 32] [--scenario both] [--json out.json]

Every process started here (replicas, their engine processes, routers) is stopped by pid in a
`finally`, also on SIGINT/SIGTERM. Needs vLLM's CPU build (`make engine`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devtools.processes import exit_on_signals, terminate  # noqa: E402
from devtools.realserver import RealServer, free_port, spawn_server  # noqa: E402
from devtools.tinymodel import build_tiny_model  # noqa: E402

MODEL = "tiny"
STRATEGIES = ("RoundRobin", "PrefixAffinity", "LeastLoad")
BASELINES = ("RoundRobin", "LeastLoad")
"""The TTFT bar compares PrefixAffinity with the first of these that ran."""
MAX_POSITIONS = 4096
"""The tiny model's context here: its default 1024 is too short for the long conversations."""
DIRECT = "Direct"
"""Reference without the router: session s goes straight to replica s mod n (perfect affinity)."""
ROUTER_BIN = Path(sys.executable).parent / "vllm-operator"
SAMPLES_PER_SECOND = 10
SAMPLE_SECONDS = 1 / SAMPLES_PER_SECOND
BARS = {"hit_rate": 0.85, "ttft_ratio": 1 / 3, "inflight": 1.25, "shared_load": 1.3}

_WORDS = (
    "the quick brown fox jumps over lazy dog kubernetes operators reconcile desired state with "
    "observed vllm serves large language models paged attention hello how are you today fine "
    "thank system message sets behaviour of assistant streaming responses send tokens as soon "
    "they generated user tool function json yaml python"
)
WORDS = _WORDS.split()

_COUNTER = re.compile(r"^(vllm:prefix_cache_(?:hits|queries)(?:_total)?)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.M)
_POD_REQUESTS = re.compile(r'^vllm_router_pod_requests_total\{pod="([^"]+)"\} ([0-9.eE+-]+)$', re.M)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ---------------------------------------------------------------------------------------------
# Processes: every one is remembered by pid and stopped in stop_all().


def descendants(pid: int) -> list[int]:
    """Pids below `pid` (children, grandchildren, ...), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def pin(pid: int, cores: Sequence[int]) -> None:
    """Every thread of `pid` on `cores` (threads it starts later inherit it)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cores)


def started(pid: int) -> str | None:
    """The start time of a live pid (to tell it from a later process with the same pid)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.servers: list[RealServer] = []
        self.router: subprocess.Popen[bytes] | None = None
        self.kids: dict[int, str] = {}
        """Descendants seen of the replicas (vLLM's engine-core and worker processes): their
        start times by pid."""

    def note_kids(self) -> None:
        for s in self.servers:
            if s.proc.poll() is None:
                for pid in descendants(s.proc.pid):
                    since = started(pid)
                    if since is not None:
                        self.kids.setdefault(pid, since)

    def start_servers(
        self, model: Path, n: int, flags: list[str], niceness: int, cores: Sequence[int], at_once: int = 2
    ) -> None:
        """`n` replicas, `at_once` at a time; replica i's OpenMP threads on cores[i % len(cores)],
        all its processes on `cores`."""
        for first in range(0, n, at_once):
            batch = []
            for i in range(first, min(n, first + at_once)):
                srv = spawn_server(
                    model,
                    flags,
                    log_path=self.logdir / f"server{i}.log",
                    served_name=MODEL,
                    env={"VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])},
                    niceness=niceness,
                )
                pin(srv.proc.pid, cores)  # before it starts its engine processes, which inherit it
                self.servers.append(srv)
                batch.append(srv)
            for srv in batch:
                srv.wait_healthy(900)
            self.note_kids()
            for srv in batch:
                for pid in [srv.proc.pid, *descendants(srv.proc.pid)]:
                    pin(pid, cores)
            print(f"  replicas up: {len(self.servers)}/{n}", flush=True)

    def start_router(self, strategy: str, port: int, cores: Sequence[int]) -> subprocess.Popen[bytes]:
        argv = [str(ROUTER_BIN), "router", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--strategy", strategy, "--grace-seconds", "2"]
        for s in self.servers:
            argv += ["--upstream", f"{MODEL}=http://127.0.0.1:{s.port}"]
        with open(self.logdir / f"router-{strategy}.log", "ab") as log:
            self.router = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        pin(self.router.pid, cores)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.router.poll() is not None:
                raise RuntimeError(f"router exited with {self.router.returncode}; see {self.logdir}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return self.router
            time.sleep(0.2)
        raise RuntimeError("router not ready after 30 s")

    def stop_router(self) -> None:
        p, self.router = self.router, None
        if p is None:
            return
        terminate(p, grace=10)

    def stop_all(self) -> None:
        self.stop_router()
        self.note_kids()
        for s in self.servers:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in self.servers:
            s.stop(timeout=30)  # waits; SIGKILL after 30 s
        for pid, since in sorted(self.kids.items()):
            if started(pid) == since:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.servers.clear()


# ---------------------------------------------------------------------------------------------
# Load: one streamed turn, sessions, the in-flight sampler.


@dataclass
class Turn:
    session: int
    turn: int
    ttft: float
    prompt_tokens: int
    text: str
    error: str = ""
    start: float = 0.0
    """time.monotonic() when it was sent."""


async def stream_turn(
    http: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, int, str]:
    """One streamed chat completion: (TTFT s, prompt tokens, answer text)."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = math.nan
    parts: list[str] = []
    prompt_tokens = 0
    async with http.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            content = (choices[0].get("delta") or {}).get("content") if choices else None
            if content:
                if math.isnan(ttft):
                    ttft = time.perf_counter() - t0
                parts.append(content)
            usage = chunk.get("usage")
            if usage:
                prompt_tokens = int(usage.get("prompt_tokens", 0))
    return ttft, prompt_tokens, "".join(parts)


@dataclass
class Session:
    index: int
    messages: list[dict[str, str]]
    followups: list[str]


def make_sessions(scenario: str, tag: str, n: int, turns: int, context: int) -> list[Session]:
    """The conversations of one run; `tag` starts every distinct text, so runs share no blocks.
    `context`: words of each session's first message (multiturn) or of the shared system prompt."""
    sessions = []
    shared = words(random.Random(f"{tag}/system"), context)
    for s in range(n):
        rng = random.Random(f"{tag}/{s}")
        if scenario == "shared":
            system = f"Run {tag}. {shared}"
            first = f"Session {s}, run {tag}: {words(rng, 60)}"
        else:
            system = f"Run {tag}. You are a helpful assistant."
            first = f"Session {s}: {words(rng, context)}"
        followups = [f"Turn {k}: {words(rng, 16)}" for k in range(2, turns + 1)]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": first}]
        sessions.append(Session(s, messages, followups))
    return sessions


async def run_turns(
    http: aiohttp.ClientSession,
    url: Callable[[Session], str],
    sessions: Sequence[Session],
    turns: Iterable[int],
    concurrency: int,
    max_tokens: int,
    out: list[Turn],
    think: float = 0.0,
    done: list[float] | None = None,
) -> None:
    """Every session's `turns` in order, `concurrency` sessions at a time; before each turn >= 2 a
    pause drawn uniformly from [0, think] s (the session's own seeded draw)."""
    queue: asyncio.Queue[Session] = asyncio.Queue()
    for s in sessions:
        queue.put_nowait(s)
    wanted = list(turns)

    async def worker() -> None:
        while True:
            try:
                s = queue.get_nowait()
            except asyncio.QueueEmpty:
                if done is not None:
                    done.append(time.monotonic())
                return
            for k in wanted:
                if k >= 2:
                    s.messages.append({"role": "user", "content": s.followups[k - 2]})
                    if think > 0:
                        await asyncio.sleep(random.Random(f"{s.index}/{k}").uniform(0, think))
                start = time.monotonic()
                try:
                    ttft, prompt, text = await stream_turn(http, url(s), s.messages, max_tokens)
                except (TimeoutError, aiohttp.ClientError, RuntimeError) as e:
                    error = str(e) or type(e).__name__
                    out.append(Turn(s.index, k, math.nan, 0, "", error=error, start=start))
                    break  # the rest of this conversation would not be the same trace
                out.append(Turn(s.index, k, ttft, prompt, text, start=start))
                s.messages.append({"role": "assistant", "content": text})

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def sample_inflight(
    http: aiohttp.ClientSession, router: str, out: list[tuple[float, str, list[int]]], phase: list[str]
) -> None:
    """Every SAMPLE_SECONDS: the router's podInFlight map, as (monotonic time, phase, counts per replica).
    Every SAMPLES_PER_SECOND-th sample is a 1 s sample."""
    t0 = time.monotonic()
    tick = 0
    while True:
        tick += 1
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, KeyError):
            async with http.get(f"{router}/router/demand") as resp:
                demand = await resp.json()
            pods = demand["models"][MODEL]["podInFlight"]
            out.append((time.monotonic(), phase[0], [int(pods[k]) for k in sorted(pods)]))
        await asyncio.sleep(max(0.0, t0 + tick * SAMPLE_SECONDS - time.monotonic()))


def server_counters(servers: Sequence[RealServer]) -> tuple[list[dict[str, float]], set[str]]:
    """Each replica's prefix-cache counters (hits, queries) and the metric names seen."""
    out: list[dict[str, float]] = []
    names: set[str] = set()
    for s in servers:
        text = httpx.get(f"{s.url}/metrics", timeout=10).text
        got = {"hits": 0.0, "queries": 0.0}
        for name, value in _COUNTER.findall(text):
            names.add(name)
            got["hits" if "hits" in name else "queries"] += float(value)
        out.append(got)
    return out, names


def pod_requests(router: str) -> dict[str, float]:
    text = httpx.get(f"{router}/metrics", timeout=10).text
    return {pod: float(v) for pod, v in _POD_REQUESTS.findall(text)}


# ---------------------------------------------------------------------------------------------
# Figures.


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile; nan when empty."""
    v = sorted(x for x in values if not math.isnan(x))
    if not v:
        return math.nan
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def ratio(counts: Sequence[float]) -> float:
    mean = sum(counts) / len(counts)
    return max(counts) / mean if mean else math.nan


@dataclass
class RunResult:
    scenario: str
    strategy: str
    rounds: int
    seconds: float
    hit_rate: float
    hit_rate_rounds: list[float]
    hit_rate_turn1: float
    per_server_hit_rate: list[float]
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_p50_rounds_ms: list[float]
    ttft1_p50_ms: float
    ttft1_p99_ms: float
    prompt_tokens_by_turn: dict[int, float]
    errors: int
    first_error: str
    samples: int
    loaded_samples: int
    worst_loaded: float
    worst_loaded_at: list[int]
    worst_any: float
    worst_any_at: list[int]
    loaded_over_bar: int
    mean_loaded_ratio: float
    steady_samples: int
    """1 s samples in phase B's steady state (every session still going): the balance bars'."""
    worst_steady: float
    worst_steady_at: list[int]
    steady_over_bar: int
    mean_steady_ratio: float
    steady_seconds: float
    fine_loaded_samples: int
    """The same over every 0.1 s sample with in flight >= replicas."""
    fine_worst: float
    fine_over_bar: int
    fine_mean: float
    requests_per_replica: list[list[int]]
    """Per round."""
    requests_ratio: float
    """The worst round's max/mean."""
    majfaults: float
    allocstalls: float
    metric_names: list[str] = field(default_factory=list)
    raw: list[tuple[int, int, int, float, float]] = field(default_factory=list)
    """(round, session, turn, seconds since the round's start when sent, TTFT ms) of every request."""


@dataclass
class Round:
    """One run of one scenario with one strategy (a fresh router, its own texts)."""

    turns: list[Turn]
    samples: list[tuple[float, str, list[int]]]
    snaps: list[list[dict[str, float]]]
    """Each replica's counters before phase A, after phase A, after phase B."""
    requests: list[float]
    """Requests the router sent to each replica."""
    seconds: float
    vmstat: dict[str, float]
    steady: tuple[float, float]
    """Monotonic start and end of phase B's steady state: from its start until the first session
    is done (from then on fewer sessions are left than the concurrency, and no router can keep
    replicas even while the rest drain)."""
    """Deltas of the machine's /proc/vmstat major faults and direct-reclaim stalls over the round."""


def vmstat() -> dict[str, float]:
    """Memory-stall counters of the whole machine: major page faults, direct-reclaim stalls."""
    out = {"pgmajfault": 0.0, "allocstall": 0.0}
    with contextlib.suppress(OSError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "pgmajfault":
                out["pgmajfault"] += float(value)
            elif key.startswith("allocstall"):
                out["allocstall"] += float(value)
    return out


async def drive(
    args: argparse.Namespace, router: str | None, sessions: Sequence[Session], servers: Sequence[RealServer]
) -> tuple[Round, set[str]]:
    """One run through `router`; without one (the Direct reference), session s goes straight to
    replica s mod n."""

    def url(s: Session) -> str:
        base = router or servers[s.index % len(servers)].url
        return f"{base}/v1/chat/completions"

    turns: list[Turn] = []
    samples: list[tuple[float, str, list[int]]] = []
    phase = ["A"]
    snaps: list[list[dict[str, float]]] = []
    names: set[str] = set()
    conn = aiohttp.TCPConnector(limit=args.concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=600)
    mem0 = vmstat()
    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        sampler = asyncio.create_task(
            sample_inflight(http, router, samples, phase) if router else asyncio.sleep(0)
        )
        try:
            snap, seen = await asyncio.to_thread(server_counters, servers)
            snaps.append(snap)
            names |= seen
            await run_turns(http, url, sessions, [1], args.concurrency, args.max_tokens, turns)
            snap, seen = await asyncio.to_thread(server_counters, servers)
            snaps.append(snap)
            names |= seen
            phase[0] = "B"
            later = range(2, args.turns + 1)
            done: list[float] = []
            steady_from = time.monotonic()
            await run_turns(
                http,
                url,
                sessions,
                later,
                args.concurrency,
                args.max_tokens,
                turns,
                args.think_ms / 1000,
                done,
            )
            snap, seen = await asyncio.to_thread(server_counters, servers)
            snaps.append(snap)
            names |= seen
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    seconds = time.monotonic() - t0
    mem1 = vmstat()
    if router:
        sent = await asyncio.to_thread(pod_requests, router)
        requests = [sent.get(f"127.0.0.1:{s.port}", 0.0) for s in servers]
    else:
        requests = [
            float(sum(1 for t in turns if t.session % len(servers) == i)) for i in range(len(servers))
        ]
    memory = {k: mem1[k] - mem0[k] for k in mem0}
    steady = (steady_from, min(done, default=steady_from))
    return Round(turns, samples, snaps, requests, seconds, memory, steady), names


def summarize(
    scenario: str, strategy: str, rounds: Sequence[Round], names: set[str], replicas: int
) -> RunResult:
    """Figures of one strategy in one scenario, over its rounds: counters summed, the requests'
    TTFTs and the in-flight samples pooled; the requests per replica per round."""

    def delta(i: int, j: int, key: str, server: int | None = None) -> float:
        idx = range(replicas) if server is None else [server]
        return sum(r.snaps[j][k][key] - r.snaps[i][k][key] for r in rounds for k in idx)

    def rate(i: int, j: int, server: int | None = None) -> float:
        q = delta(i, j, "queries", server)
        return delta(i, j, "hits", server) / q if q else math.nan

    def round_rate(r: Round) -> float:
        q = sum(r.snaps[2][k]["queries"] - r.snaps[1][k]["queries"] for k in range(replicas))
        h = sum(r.snaps[2][k]["hits"] - r.snaps[1][k]["hits"] for k in range(replicas))
        return h / q if q else math.nan

    turns = [t for r in rounds for t in r.turns]
    samples = [s for r in rounds for s in r.samples]
    later = [t for t in turns if t.turn >= 2 and not t.error]
    first = [t for t in turns if t.turn == 1 and not t.error]
    errors = [t for t in turns if t.error]
    by_turn: dict[int, list[int]] = {}
    for t in turns:
        if not t.error:
            by_turn.setdefault(t.turn, []).append(t.prompt_tokens)
    one_s = [s for r in rounds for s in r.samples[::SAMPLES_PER_SECOND]]
    nonempty = [(c, ratio(c)) for _, _, c in one_s if sum(c) > 0]
    loaded = [(c, x) for c, x in nonempty if sum(c) >= replicas]
    worst_loaded = max(loaded, key=lambda x: x[1], default=([], math.nan))
    worst_any = max(nonempty, key=lambda x: x[1], default=([], math.nan))
    fine = [ratio(c) for _, _, c in samples if sum(c) >= replicas]
    steady = [
        (c, ratio(c))
        for r in rounds
        for t, _, c in r.samples[::SAMPLES_PER_SECOND]
        if r.steady[0] <= t < r.steady[1] and sum(c) > 0
    ]
    worst_steady = max(steady, key=lambda x: x[1], default=([], math.nan))
    requests = [[int(c) for c in r.requests] for r in rounds]
    return RunResult(
        scenario=scenario,
        strategy=strategy,
        rounds=len(rounds),
        seconds=sum(r.seconds for r in rounds),
        hit_rate=rate(1, 2),
        hit_rate_rounds=[round_rate(r) for r in rounds],
        hit_rate_turn1=rate(0, 1),
        per_server_hit_rate=[rate(1, 2, k) for k in range(replicas)],
        ttft_p50_ms=1000 * pct([t.ttft for t in later], 50),
        ttft_p99_ms=1000 * pct([t.ttft for t in later], 99),
        ttft_p50_rounds_ms=[
            1000 * pct([t.ttft for t in r.turns if t.turn >= 2 and not t.error], 50) for r in rounds
        ],
        ttft1_p50_ms=1000 * pct([t.ttft for t in first], 50),
        ttft1_p99_ms=1000 * pct([t.ttft for t in first], 99),
        prompt_tokens_by_turn={k: statistics.fmean(v) for k, v in sorted(by_turn.items())},
        errors=len(errors),
        first_error=errors[0].error if errors else "",
        samples=len(nonempty),
        loaded_samples=len(loaded),
        worst_loaded=worst_loaded[1],
        worst_loaded_at=list(worst_loaded[0]),
        worst_any=worst_any[1],
        worst_any_at=list(worst_any[0]),
        loaded_over_bar=sum(1 for _, x in loaded if x > BARS["inflight"] + 1e-9),
        mean_loaded_ratio=statistics.fmean(x for _, x in loaded) if loaded else math.nan,
        steady_samples=len(steady),
        worst_steady=worst_steady[1],
        worst_steady_at=list(worst_steady[0]),
        steady_over_bar=sum(1 for _, x in steady if x > BARS["inflight"] + 1e-9),
        mean_steady_ratio=statistics.fmean(x for _, x in steady) if steady else math.nan,
        steady_seconds=sum(r.steady[1] - r.steady[0] for r in rounds),
        fine_loaded_samples=len(fine),
        fine_worst=max(fine, default=math.nan),
        fine_over_bar=sum(1 for x in fine if x > BARS["inflight"] + 1e-9),
        fine_mean=statistics.fmean(fine) if fine else math.nan,
        requests_per_replica=requests,
        requests_ratio=max((ratio(c) for c in requests), default=math.nan),
        majfaults=sum(r.vmstat["pgmajfault"] for r in rounds),
        allocstalls=sum(r.vmstat["allocstall"] for r in rounds),
        metric_names=sorted(names),
        raw=[
            (i, t.session, t.turn, t.start - min(x.start for x in r.turns), 1000 * t.ttft)
            for i, r in enumerate(rounds)
            for t in r.turns
        ],
    )


async def probe_prefill(
    server: RealServer, max_tokens: int, context: int, rounds: int = 5
) -> tuple[float, float]:
    """Idle TTFT on one replica: a cold prompt of `context` words (a session's first turn), then
    the same plus a few new tokens
    (cached). Medians in ms."""
    cold: list[float] = []
    warm: list[float] = []
    url = f"{server.url}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        for i in range(rounds):
            rng = random.Random(f"probe/{time.time_ns()}/{i}")
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Probe {time.time_ns()}: {words(rng, context)}"},
            ]
            ttft, _, text = await stream_turn(http, url, messages, max_tokens)
            cold.append(ttft)
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
            ttft, _, _ = await stream_turn(http, url, messages, max_tokens)
            warm.append(ttft)
    return 1000 * statistics.median(cold), 1000 * statistics.median(warm)


# ---------------------------------------------------------------------------------------------
# Report.


def fmt(x: float, spec: str = ".3f") -> str:
    return "n/a" if math.isnan(x) else format(x, spec)


def report(
    results: list[RunResult], args: argparse.Namespace, probe: tuple[float, float] | None
) -> list[str]:
    lines: list[str] = []
    by = {(r.scenario, r.strategy): r for r in results}
    for scenario in ("multiturn", "shared"):
        runs = [by[(scenario, s)] for s in (*STRATEGIES, DIRECT) if (scenario, s) in by]
        if not runs:
            continue
        title = {
            "multiturn": f"multi-turn, a distinct {args.context_words}-word first message per session",
            "shared": f"one shared {args.context_words}-word system prompt, sessions differ after it",
        }[scenario]
        lines.append("")
        lines.append(
            f"== {scenario}: {title}; {args.sessions} sessions x {args.turns} turns, "
            f"{args.concurrency} at a time, max_tokens {args.max_tokens}"
            + (f", think time 0-{args.think_ms:g} ms" if args.think_ms else "")
        )
        lines.append(f"{'':44s}" + "".join(f"{r.strategy:>24s}" for r in runs))

        def row(label: str, values: Iterable[str]) -> None:
            lines.append(f"  {label:42s}" + "".join(f"{v:>24s}" for v in values))

        row("rounds, run time s (sum)", (f"{r.rounds}, {fmt(r.seconds, '.0f')}" for r in runs))
        row("prefix-cache hit rate, turns >= 2", (fmt(r.hit_rate) for r in runs))
        row("  per round", ("/".join(fmt(h, ".3f") for h in r.hit_rate_rounds) for r in runs))
        row("  (turn 1 phase)", (fmt(r.hit_rate_turn1) for r in runs))
        row(
            "  per replica, turns >= 2",
            ("/".join(fmt(h, ".2f") for h in r.per_server_hit_rate) for r in runs),
        )
        row("TTFT p50 ms, turns >= 2", (fmt(r.ttft_p50_ms, ".1f") for r in runs))
        row("  p50 per round", ("/".join(fmt(x, ".0f") for x in r.ttft_p50_rounds_ms) for r in runs))
        row("TTFT p99 ms, turns >= 2", (fmt(r.ttft_p99_ms, ".1f") for r in runs))
        row(
            "TTFT p50 / p99 ms, turn 1",
            (f"{fmt(r.ttft1_p50_ms, '.1f')}/{fmt(r.ttft1_p99_ms, '.1f')}" for r in runs),
        )
        row(
            "1 s samples: non-empty / loaded (>= replicas)", (f"{r.samples}/{r.loaded_samples}" for r in runs)
        )
        row(
            "in-flight max/mean, worst loaded sample",
            (f"{fmt(r.worst_loaded, '.2f')} {r.worst_loaded_at}" for r in runs),
        )
        row(
            f"  loaded samples above {BARS['inflight']}",
            (f"{r.loaded_over_bar}/{r.loaded_samples}" for r in runs),
        )
        row("  mean over loaded samples", (fmt(r.mean_loaded_ratio, ".2f") for r in runs))
        row("  worst of any non-empty sample", (f"{fmt(r.worst_any, '.2f')} {r.worst_any_at}" for r in runs))
        row(
            "  0.1 s samples, loaded: worst / mean / above",
            (
                f"{fmt(r.fine_worst, '.2f')}/{fmt(r.fine_mean, '.2f')}/"
                f"{r.fine_over_bar}of{r.fine_loaded_samples}"
                for r in runs
            ),
        )
        row("requests per replica, worst round max/mean", (fmt(r.requests_ratio, ".2f") for r in runs))
        for i in range(max(r.rounds for r in runs)):
            row(
                f"  round {i + 1}",
                ("/".join(str(c) for c in r.requests_per_replica[i]) if i < r.rounds else "" for r in runs),
            )
        row("errors", (str(r.errors) for r in runs))
        row(
            "machine: major page faults / reclaim stalls",
            (f"{r.majfaults:.0f}/{r.allocstalls:.0f}" for r in runs),
        )
        if any(r.strategy == DIRECT for r in runs):
            lines.append(f"  {DIRECT}: no router, session s sent straight to replica s mod {args.servers}")
        tokens = runs[0].prompt_tokens_by_turn
        lines.append(
            "  prompt tokens by turn (mean): " + ", ".join(f"{k}: {v:.0f}" for k, v in tokens.items())
        )
        for r in runs:
            if r.first_error:
                lines.append(f"  {r.strategy} first error: {r.first_error}")
    names = sorted({n for r in results for n in r.metric_names})
    lines.append("")
    lines.append(
        f"counters read: {', '.join(names) or 'none found'}; in-flight: router /router/demand podInFlight"
    )
    if probe is not None:
        lines.append(
            f"idle probe on one replica, a {args.context_words}-word first turn: "
            f"TTFT cold {probe[0]:.1f} ms, "
            f"cached {probe[1]:.1f} ms (what prefix caching can save per request here: "
            f"{probe[0] - probe[1]:.1f} ms)"
        )

    lines.append("")
    lines.append("== bars")
    pa = by.get(("multiturn", "PrefixAffinity"))
    ll = next((by[("multiturn", b)] for b in BASELINES if ("multiturn", b) in by), None)
    sh = by.get(("shared", "PrefixAffinity"))

    def bar(ok: bool | None, text: str) -> None:
        lines.append(f"  {'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")

    if pa is not None:
        bar(
            pa.hit_rate >= BARS["hit_rate"],
            f"hit rate on turns >= 2 with PrefixAffinity >= {BARS['hit_rate']}: {fmt(pa.hit_rate)}"
            + (f" ({ll.strategy} {fmt(ll.hit_rate)})" if ll else ""),
        )
    if pa is not None and ll is not None:
        ttft_ratio = pa.ttft_p50_ms / ll.ttft_p50_ms if ll.ttft_p50_ms else math.nan
        bar(
            ttft_ratio <= BARS["ttft_ratio"],
            f"TTFT p50 PrefixAffinity <= 1/3 of {ll.strategy}'s (turns >= 2): "
            f"{fmt(pa.ttft_p50_ms, '.1f')} ms vs "
            f"{fmt(ll.ttft_p50_ms, '.1f')} ms, ratio {fmt(ttft_ratio, '.2f')}",
        )
    for run, limit in ((pa, BARS["inflight"]), (sh, BARS["shared_load"])):
        if run is None:
            continue
        bar(
            run.worst_steady <= limit + 1e-9 if run.steady_samples else None,
            f"in-flight max/mean <= {limit} at every steady 1 s sample, PrefixAffinity, {run.scenario}: "
            f"worst {fmt(run.worst_steady, '.2f')} {run.worst_steady_at} over {run.steady_samples} "
            f"samples ({fmt(run.steady_seconds, '.0f')} s of turns >= 2 until the first session ended); "
            "any sample with in flight >= replicas (sessions finishing included): "
            f"{fmt(run.worst_loaded, '.2f')} {run.worst_loaded_at}",
        )
    if sh is not None:
        bar(
            sh.requests_ratio <= BARS["shared_load"],
            f"shared system prompt, PrefixAffinity: requests per replica max/mean <= {BARS['shared_load']}: "
            f"{fmt(sh.requests_ratio, '.2f')} (worst round; rounds {sh.requests_per_replica})",
        )
    direct = by.get(("multiturn", DIRECT))
    if pa is not None and ll is not None and direct is not None and ll.ttft_p50_ms:
        lines.append("")
        lines.append(
            f"note: {DIRECT} (perfect affinity, no router) has TTFT p50 {direct.ttft_p50_ms:.1f} ms, "
            f"{direct.ttft_p50_ms / ll.ttft_p50_ms:.2f}x {ll.strategy}'s: about the most any routing "
            f"gains on this trace here (with --max-tokens 8 it was 0.64x: a TTFT is then mostly the "
            f"decode steps of the requests already running on {args.servers} engines on cores "
            f"{args.engine_cores}, which prefix caching does not shorten)."
        )
    return lines


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 sessions x 3 turns, 1 round")
    p.add_argument("--servers", type=int, default=4, help="replicas (default 4)")
    p.add_argument("--sessions", type=int, help="conversations per run (default 32; --quick 8)")
    p.add_argument("--turns", type=int, help="turns per conversation (default 6; --quick 3)")
    p.add_argument("--concurrency", type=int, help="sessions at a time (default: all of them)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=1,
        help="tokens per answer (default 1: TTFT is the figure, and on these CPU engines every decode "
        "step of the requests already running adds to each TTFT; 8 shows that)",
    )
    p.add_argument(
        "--context-words",
        type=int,
        default=1200,
        help="words of each session's first message (multiturn) or of the shared system prompt "
        "(about 1.35 tokens each; default 1200)",
    )
    p.add_argument(
        "--hidden-size",
        type=int,
        default=512,
        help="the random model's hidden size (tests use 128; default 512, so that a long prompt's "
        "prefill weighs like a real model's next to the engine's per-step overhead)",
    )
    p.add_argument("--layers", type=int, default=4, help="the random model's layers (tests use 2; default 4)")
    p.add_argument(
        "--kv-sessions",
        type=int,
        default=12,
        help="KV cache of each replica, in whole conversations (their longest turn); 0: the "
        "engine's default (1 GiB, every conversation of the run fits)",
    )
    p.add_argument(
        "--strategies",
        type=lambda v: [x for x in v.split(",") if x],
        default=list(STRATEGIES[:2]),
        help=f"comma-separated, of {', '.join(STRATEGIES)} (default RoundRobin,PrefixAffinity)",
    )
    p.add_argument(
        "--think-ms",
        type=float,
        default=0.0,
        help="a pause before each turn >= 2, uniform in [0, THINK_MS] (default 0: none); breaks the "
        "lockstep in which LeastLoad's rotation keeps sending a session to the same replica",
    )
    p.add_argument("--block-size", type=int, default=32, help="KV block size (vLLM CPU default 128)")
    p.add_argument(
        "--layout",
        choices=["split", "shared"],
        default="split",
        help="split: replicas on all cores but the last, router and client on the last (default); "
        "shared: everything on every core",
    )
    p.add_argument("--niceness", type=int, default=5, help="niceness of the replicas (default 5)")
    p.add_argument("--rounds", type=int, help="runs per strategy and scenario (default 3; --quick 1)")
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the Direct reference (sessions sent straight to replica s mod n, no router)",
    )
    p.add_argument("--scenario", choices=["multiturn", "shared", "both"], default="both")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    a.sessions = a.sessions or (8 if a.quick else 32)
    a.turns = a.turns or (3 if a.quick else 6)
    a.concurrency = a.concurrency or a.sessions
    a.rounds = a.rounds or (1 if a.quick else 3)
    if a.turns < 2 or a.servers < 1:
        p.error("need --turns >= 2 and --servers >= 1")
    if unknown := set(a.strategies) - set(STRATEGIES):
        p.error(f"unknown strategy {', '.join(sorted(unknown))}: choose from {', '.join(STRATEGIES)}")
    return a


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if not ROUTER_BIN.exists():
        print(f"no {ROUTER_BIN}; install the project (make venv)", file=sys.stderr)
        return 2
    exit_on_signals()
    work = Path(tempfile.mkdtemp(prefix="router-affinity-"))
    procs = Procs(work)
    results: list[RunResult] = []
    probe: tuple[float, float] | None = None
    t_start = time.monotonic()
    flags = ["--enable-prefix-caching", "--block-size", str(args.block_size)]
    scenarios = ["multiturn", "shared"] if args.scenario == "both" else [args.scenario]
    salt = f"{random.Random().getrandbits(28):07x}"
    cores = sorted(os.sched_getaffinity(0))
    if args.layout == "split" and len(cores) > 1:
        # The replicas on all cores but the last; the router and this client on the last.
        engine_cores, front_cores = cores[:-1], cores[-1:]
        os.sched_setaffinity(0, front_cores)
    else:
        engine_cores = front_cores = cores
    args.engine_cores, args.front_cores = engine_cores, front_cores
    print(
        f"{args.servers} replicas of a random Llama (hidden {args.hidden_size}, {args.layers} layers; "
        f"{' '.join(flags)}, niceness {args.niceness}) on "
        f"cores {engine_cores}, router and client on cores {front_cores}; "
        f"scenarios {', '.join(scenarios)}; strategies {', '.join(args.strategies)}"
        f"{f' and {DIRECT} (no router)' if args.reference else ''}; {args.rounds} round(s); logs in {work}",
        flush=True,
    )
    try:
        model = build_tiny_model(
            work / "model", max_positions=MAX_POSITIONS, hidden_size=args.hidden_size, layers=args.layers
        )
        if args.kv_sessions:
            per_session = session_blocks(model, args)
            # The engine refuses a cache smaller than one request of max-model-len: cap that at
            # the longest turn (rounded up to blocks).
            flags += ["--num-gpu-blocks-override", str(args.kv_sessions * per_session)]
            flags += ["--max-model-len", str(min(MAX_POSITIONS, per_session * args.block_size))]
            print(
                f"  KV cache: {args.kv_sessions} conversations of {per_session} blocks "
                f"({args.kv_sessions * per_session} blocks of {args.block_size} tokens) per replica",
                flush=True,
            )
        t = time.monotonic()
        procs.start_servers(model, args.servers, flags, args.niceness, engine_cores)
        print(f"  replicas healthy in {time.monotonic() - t:.0f} s", flush=True)
        # Warm-up: every replica answers a few requests before anything is measured.
        warm = make_sessions("multiturn", f"w{salt}", 2 * args.servers, 2, 50)
        for i, s in enumerate(warm):
            srv = procs.servers[i % args.servers]
            asyncio.run(
                _one(f"{srv.url}/v1/chat/completions", s.messages, args.max_tokens),
            )
        probe = asyncio.run(probe_prefill(procs.servers[0], args.max_tokens, args.context_words))
        print(f"  idle probe: TTFT cold {probe[0]:.1f} ms, cached {probe[1]:.1f} ms", flush=True)
        runs = 0
        kinds = (*args.strategies, DIRECT) if args.reference else tuple(args.strategies)
        for scenario in scenarios:
            rounds: dict[str, list[Round]] = {s: [] for s in kinds}
            names: set[str] = set()
            for i in range(args.rounds):
                # Alternate the order, so that a drift of the machine hits every strategy alike.
                for strategy in kinds if i % 2 == 0 else kinds[::-1]:
                    router = None
                    if strategy != DIRECT:
                        port = free_port()
                        router = f"http://127.0.0.1:{port}"
                        procs.start_router(strategy, port, front_cores)
                    sessions = make_sessions(
                        scenario, f"{runs:x}{salt}", args.sessions, args.turns, args.context_words
                    )
                    runs += 1
                    one, seen = asyncio.run(drive(args, router, sessions, procs.servers))
                    procs.stop_router()
                    rounds[strategy].append(one)
                    names |= seen
                    res = summarize(scenario, strategy, [one], seen, args.servers)
                    print(
                        f"  {scenario:9s} round {i + 1} {strategy:14s} {one.seconds:4.0f} s  hit rate "
                        f"{fmt(res.hit_rate)}  TTFT p50 {fmt(res.ttft_p50_ms, '.1f')} ms  worst loaded "
                        f"max/mean {fmt(res.worst_loaded, '.2f')}  requests {res.requests_per_replica[0]}  "
                        f"errors {res.errors}  major faults {one.vmstat['pgmajfault']:.0f}",
                        flush=True,
                    )
            for strategy in kinds:
                results.append(summarize(scenario, strategy, rounds[strategy], names, args.servers))
    except KeyboardInterrupt:
        print("\ninterrupted; stopping what was started", file=sys.stderr)
        return 130
    except SystemExit as e:
        print(f"\nstopped by a signal; stopping what was started (exit {e.code})", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    total = time.monotonic() - t_start
    lines = report(results, args, probe)
    lines.append("")
    lines.append(f"total run time {total:.0f} s (replica start-up included); logs in {work}")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "probe_ms": probe,
                    "results": [r.__dict__ for r in results],
                    "seconds": total,
                },
                indent=2,
            )
        )
    shutil.rmtree(work / "model", ignore_errors=True)
    return 0


def session_blocks(model: Path, args: argparse.Namespace) -> int:
    """KV blocks of one conversation's longest turn: its prompt with every earlier answer
    (max_tokens each), plus the answer, counted with the model's own tokenizer and chat template
    over a few sample conversations of each scenario, with 64 tokens to spare (random words
    tokenize to different lengths; a run's prompts were seen up to ~15 tokens longer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    longest = 0
    for scenario in ("multiturn", "shared"):
        for session in make_sessions(scenario, "size", 8, args.turns, args.context_words):
            messages = list(session.messages)
            for followup in session.followups:
                answer = {"role": "assistant", "content": "x " * args.max_tokens}
                messages += [answer, {"role": "user", "content": followup}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            longest = max(longest, len(tok(text, add_special_tokens=False)["input_ids"]) + args.max_tokens)
    block: int = args.block_size
    return -(-(longest + 64) // block)


async def _one(url: str, messages: list[dict[str, str]], max_tokens: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        await stream_turn(http, url, messages, max_tokens)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
