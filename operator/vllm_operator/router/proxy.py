"""The router's HTTP/1.1 front end and its keep-alive connections to the pods.

Written on asyncio protocols with httptools (llhttp) rather than a web framework: a request costs
one parse, one JSON decode of the body to read `model`, and one write to a pooled connection; the
response's bytes go back as they arrive, each upstream body piece written once, with no
middleware and no re-encoding of SSE events. A request may go to another pod only until the
first byte of a response has been sent to the client; a stream cut later ends with an
OpenAI-shaped error event.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import http
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httptools

from vllm_operator.router import errors
from vllm_operator.router.balance import Balancer, prefix_key
from vllm_operator.router.stats import ModelStats, Stats, prometheus_text, usage_of
from vllm_operator.router.table import Endpoint, Table, Target
from vllm_operator.router.wake import Holds, Scaler
from vllm_operator_client.errors import message_of

log = logging.getLogger(__name__)

# Headers that describe one hop, not the message: never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
        b"host",
        b"expect",
    }
)


def end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers to forward: without hop-by-hop ones, neither the standard ones nor those a
    `Connection` header names (RFC 9110 7.6.1, e.g. `Connection: x-hop` makes `x-hop` one)."""
    named = {
        token.strip().lower()
        for key, value in headers
        if key.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


RETRY_STATUSES = frozenset({502, 503, 504})
"""A pod's answer that another pod may do better with (draining, overloaded, not yet serving)."""
MAX_ATTEMPTS = 3
MAX_HEADER_BYTES = 64 * 1024
IDLE_SECONDS = 4.0
"""An idle pooled connection is dropped after this: below uvicorn's 5 s keep-alive, so the router
does not send on a connection the pod is closing."""
MAX_IDLE_PER_POD = 512
JSON = b"application/json"
LINGER_SECONDS = 2.0
# A pod's error message relayed in our own error event: bounded, whatever the pod sent.
MAX_MESSAGE = 512
"""How long a refused upload may keep sending (into the void) before its connection closes."""
KEEPALIVE_SECONDS = 5.0
"""A streaming request held this long gets its response head and an SSE comment, repeated as
often: proxies and clients with read timeouts see a live stream while the model wakes."""


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


@dataclass
class Request:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    keep_alive: bool
    http10: bool
    started: float

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class Downstream(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time, writes the responses."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[Request] = collections.deque()
        self.busy = False
        self.closed = False
        self.exchange: Exchange | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._refused = False
        # Response framing of the message being written.
        self.chunked = False
        self.keep_alive = True
        self.http10 = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.exchange is not None:
            self.exchange.client_gone()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as error:
            self._fail(400, f"malformed HTTP request: {error}")

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._url, self._headers, self._header_bytes = b"", [], 0
        self._body, self._body_bytes = [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refused:
            return
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._fail(431, f"request headers over {MAX_HEADER_BYTES} bytes")
            return
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        length = next((v for k, v in self._headers if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.router.max_body:
            self._fail(413, f"request body over {self.router.max_body} bytes (router --max-body-bytes)")
            return
        expect = next((v for k, v in self._headers if k.lower() == b"expect"), None)
        if expect is not None and expect.lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.router.max_body:
            self._fail(413, f"request body over {self.router.max_body} bytes (router --max-body-bytes)")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        request = Request(
            method=self.parser.get_method(),
            url=self._url,
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self.parser.should_keep_alive(),
            http10=self.parser.get_http_version() == "1.0",
            started=time.perf_counter(),
        )
        self.pending.append(request)
        if self.transport is not None and len(self.pending) > 1:
            self.transport.pause_reading()  # pipelined requests wait; the client's socket holds the rest
        self._next()

    # -- running requests
    def _next(self) -> None:
        if self.busy or not self.pending or self.closed:
            return
        self.busy = True
        request = self.pending.popleft()
        task = asyncio.ensure_future(self.router.handle(self, request))
        task.add_done_callback(functools.partial(self._done, request))

    def _done(self, request: Request, task: asyncio.Future[None]) -> None:
        self.busy = False
        self.exchange = None
        if not task.cancelled() and task.exception() is not None:
            log.error("request %s %s failed", request.method, request.url, exc_info=task.exception())
            if not self.closed and self.transport is not None:
                self.transport.abort()
            return
        if self.closed or self.transport is None:
            return
        if not self.keep_alive:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._next()

    def _fail(self, status: int, message: str) -> None:
        """A request the router refuses before reading it whole: answer once and close (the
        rest of a chunk already read still reaches the parser's callbacks)."""
        if self._refused:
            return
        self._refused = True
        if self.transport is None or self.closed:
            return
        self.keep_alive = False
        if not self.busy:
            self.respond(status, errors.body(status, message))
            self._linger()

    def _linger(self) -> None:
        """Close after a refusal without losing the answer: a close with the client's upload
        still arriving makes the kernel send a RST, which can destroy the answer in the
        client's buffer before it is read. So: send FIN, discard what still comes (the parser
        ignores a refused request), and close after LINGER_SECONDS (nginx's lingering close)."""
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
            return
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)

    # -- writing a response
    def write_head(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], content_length: int | None
    ) -> None:
        assert self.transport is not None
        request_close = not self.keep_alive
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status))]
        lines.extend(b"%s: %s\r\n" % (k, v) for k, v in headers)
        if content_length is not None:
            self.chunked = False
            lines.append(b"content-length: %d\r\n" % content_length)
        elif self.http10:
            self.chunked = False
            request_close = True
        else:
            self.chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        if request_close:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))

    def write_piece(self, data: bytes) -> None:
        assert self.transport is not None
        if self.chunked:
            self.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def end(self) -> None:
        if self.chunked and self.transport is not None and not self.closed:
            self.transport.write(b"0\r\n\r\n")

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = JSON,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        if self.transport is None or self.closed:
            return
        self.write_head(status, [(b"content-type", content_type), *headers], len(body))
        self.transport.write(body)


class Exchange:
    """One request's trip to one pod, driven by the upstream connection's callbacks."""

    def __init__(
        self,
        downstream: Downstream,
        stats: ModelStats,
        started: float,
        may_retry: bool,
        stream: bool,
        on_head: Callable[[float], None],
        preamble: bool = False,
    ) -> None:
        """`preamble`: the client already has a 200 event-stream head (sent while the request
        was held), so the pod's head is not forwarded and an error answer becomes an error event."""
        self.downstream = downstream
        self.preamble = preamble
        self.error_body: list[bytes] | None = None
        self.stats = stats
        self.on_head = on_head
        self.started = started
        self.may_retry = may_retry
        self.stream = stream
        self.upstream: Upstream | None = None
        self.future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.head_sent = False
        self.swallow = False
        self.seen_body = False
        self.tail = b"\n\n"
        # The last two pieces of the body, by reference (no copy per chunk): where `usage` is.
        self.piece = self.last_piece = b""
        self.event_stream = False

    def _settle(self, outcome: str) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        elapsed = time.perf_counter() - self.started
        self.stats.first_byte.observe(elapsed)
        self.on_head(elapsed)
        if status in RETRY_STATUSES and self.may_retry:
            self.swallow = True
            return
        if self.preamble:
            self.head_sent = True
            self.event_stream = True
            if status != 200:
                self.error_body = []
            return
        length: int | None = None
        for name, value in headers:
            if name.lower() == b"content-length" and value.isdigit():
                length = int(value)
        forwarded = end_to_end(headers)
        self.event_stream = any(
            k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in forwarded
        )
        self.head_sent = True
        self.downstream.write_head(status, forwarded, length)

    def body(self, data: bytes) -> None:
        if self.swallow or self.downstream.closed:
            return
        if self.error_body is not None:
            self.error_body.append(data)
            return
        if not self.seen_body:
            self.seen_body = True
            if self.stream:
                self.stats.first_chunk.observe(time.perf_counter() - self.started)
        self.downstream.write_piece(data)
        self.tail = data[-2:]
        self.last_piece, self.piece = self.piece, data

    def complete(self) -> None:
        if self.swallow:
            self._settle("retry")
            return
        if self.error_body is not None:
            message = (
                message_of(b"".join(self.error_body), MAX_MESSAGE)
                or f"the model server answered {self.status}"
            )
            self.downstream.write_piece(errors.sse_event(self.status, message))
        elif self.status == 200:
            usage = usage_of(self.last_piece + self.piece)
            if usage is not None:
                self.stats.prompt_tokens += usage[0]
                self.stats.completion_tokens += usage[1]
        self.downstream.end()
        self._settle("done")

    def upstream_lost(self) -> None:
        """The pod's connection closed before the response was whole."""
        if self.future.done():
            return
        if not self.head_sent:
            self._settle("retry")
            return
        self.stats.broken_streams += 1
        if self.downstream.chunked and self.event_stream:
            # End on an event boundary, then an error event the client's SSE parser can read.
            self.downstream.write_piece(
                (b"" if self.tail.endswith(b"\n\n") else b"\n\n")
                + errors.sse_event(502, "the model server closed the stream before it finished")
            )
            self.downstream.end()
        else:
            self.downstream.keep_alive = False  # a cut body cannot be mended: the client sees the cut
            if self.downstream.transport is not None:
                self.downstream.transport.close()
        self._settle("broken")

    def client_gone(self) -> None:
        if self.upstream is not None:
            self.upstream.abandon()  # the pod stops generating for nobody (vLLM aborts on disconnect)
        self._settle("gone")

    def pause(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()


class Upstream(asyncio.Protocol):
    """One keep-alive connection to a pod."""

    def __init__(self, pool: Pool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.closed = False
        self.idle_since = 0.0
        self.used = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            log.warning("malformed response from %s", self.address)
            self.abandon()

    def send(self, exchange: Exchange, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.exchange = exchange
        exchange.upstream = self
        self.used = True
        self.transport.writelines((head, body))

    def abandon(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.head(self.parser.get_status_code(), self.headers)

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.body(body)

    def on_message_complete(self) -> None:
        exchange, self.exchange = self.exchange, None
        keep = self.parser.should_keep_alive()
        if exchange is not None:
            exchange.upstream = None
            exchange.complete()
        if keep and not self.closed:
            self.pool.put(self)
        else:
            self.abandon()


class Pool:
    """Idle keep-alive connections per pod address."""

    def __init__(self, connect_timeout: float) -> None:
        self.idle: dict[str, list[Upstream]] = {}
        self.connect_timeout = connect_timeout

    async def get(self, address: str) -> Upstream:
        now = time.monotonic()
        conns = self.idle.get(address)
        while conns:
            conn = conns.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.abandon()
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: Upstream(self, address), host.strip("[]"), int(port)),
            self.connect_timeout,
        )
        return protocol

    def put(self, conn: Upstream) -> None:
        conns = self.idle.setdefault(conn.address, [])
        if len(conns) >= MAX_IDLE_PER_POD:
            conn.abandon()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.abandon()
        self.idle.clear()


class Router:
    """The request logic: local routes, routing by `model`, retries before the first byte."""

    def __init__(
        self,
        table: Table,
        *,
        max_body: int = 32 * 1024 * 1024,
        connect_timeout: float = 3.0,
        scaler: Scaler | None = None,
        token: str = "",
    ) -> None:
        """`scaler` writes a model's replicas (waking it from zero); `token` guards /router/park."""
        self.table = table
        self.ready = False
        self.holds = Holds(scaler)
        self.token = token
        self.max_body = max_body
        self.balancer = Balancer()
        self.pool = Pool(connect_timeout)
        self.stats = Stats()
        self.draining = False

    def protocol(self) -> Downstream:
        return Downstream(self)

    def set_table(self, table: Table, ready: bool = True) -> None:
        self.table = table
        self.ready = ready
        self.holds.update(table)

    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.stats.models.values())

    async def handle(self, conn: Downstream, request: Request) -> None:
        conn.keep_alive = request.keep_alive and not self.draining
        conn.http10 = request.http10
        path = request.url.split(b"?", 1)[0]
        if request.method == b"GET":
            self._local(conn, path)
            return
        if request.method != b"POST":
            conn.respond(405, errors.body(405, f"{request.method.decode()} is not routed; use GET or POST"))
            return
        if path == b"/router/park":
            self._park(conn, request)
            return
        await self._route(conn, request)

    def _park(self, conn: Downstream, request: Request) -> None:
        """The autoscaler asks to hold a model's requests before it writes replicas 0."""
        scheme, _, given = (request.header(b"authorization") or b"").partition(b" ")
        if not self.token:
            conn.respond(403, errors.body(403, "parking needs a router token (VLLM_OPERATOR_ROUTER_TOKEN)"))
            return
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token.encode()):
            conn.respond(401, errors.body(401, "a valid bearer token is required"))
            return
        try:
            payload = json.loads(request.body)
            key = f"{payload['namespace']}/{payload['resource']}"
            idle = float(payload["idleSeconds"])
            if not math.isfinite(idle) or idle < 0:
                raise ValueError(idle)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            conn.respond(400, errors.body(400, "send {namespace, resource, idleSeconds}"))
            return
        route = self.table.route(key)
        if route is None:
            conn.respond(404, errors.body(404, f"no model {key}"))
            return
        refused = self.holds.park(route, idle, self.stats.route_in_flight(route))
        if refused is not None:
            conn.respond(409, errors.body(409, refused))
            return
        log.info("parked %s: requests wait until it is at zero (and then wake it)", key)
        conn.respond(200, json.dumps({"parked": key}).encode())

    def _local(self, conn: Downstream, path: bytes) -> None:
        if path == b"/v1/models":
            conn.respond(200, json.dumps({"object": "list", "data": self.table.listing()}).encode())
        elif path == b"/healthz":
            conn.respond(200, b"ok", b"text/plain")
        elif path == b"/readyz":
            ok = self.ready and not self.draining
            conn.respond(200 if ok else 503, b"ready" if ok else b"not ready", b"text/plain")
        elif path == b"/metrics":
            conn.respond(
                200,
                prometheus_text(self.stats, self.balancer.in_flight),
                b"text/plain; version=0.0.4; charset=utf-8",
            )
        elif path == b"/router/demand":
            demand = self.stats.demand(
                self.table, self.balancer.in_flight, self.holds.held, self.holds.parked
            )
            conn.respond(200, json.dumps(demand).encode())
        else:
            conn.respond(
                404, errors.body(404, f"no route {path.decode(errors='replace')}; the router serves /v1/*")
            )

    async def _route(self, conn: Downstream, request: Request) -> None:
        try:
            payload: Any = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            conn.respond(*errors.no_model("the body is not JSON"))
            return
        name = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(name, str):
            conn.respond(*errors.no_model("no model named"))
            return
        target = self.table.resolve(name)
        if target is None:
            if not self.ready:  # a model at zero is never a 404: not until the list is in
                code, error = errors.loading()
                conn.respond(code, error, headers=[(b"retry-after", b"1")])
            else:
                conn.respond(*errors.model_not_found(name))
            return
        stats = self.stats.model(name)
        stats.in_flight += 1
        key = target.route.key
        self.holds.touch(key)
        try:
            status = await self._forward(conn, request, payload, target, stats)
        finally:
            stats.in_flight -= 1
            self.holds.touch(key)
        stats.answered(status)

    async def _hold(
        self, conn: Downstream, name: str, target: Target, stream: bool
    ) -> tuple[Target | None, bool, int]:
        """Wait until an autoscaled model has a pod for this request: the current target, or None
        once answered (timed out, model gone, client gone); whether an SSE head was sent; and
        the status answered (0 when none)."""
        policy = target.route.autoscaling
        assert policy is not None
        started = time.monotonic()
        deadline = started + policy.hold_timeout_seconds
        preamble = False
        next_beat = started + KEEPALIVE_SECONDS
        current: Target | None = target
        while current is not None and (self.holds.gated(current.route) or not current.eligible()):
            now = time.monotonic()
            if conn.closed:
                return None, preamble, 499
            if now >= deadline:
                code, error = errors.woke_too_late(name, policy.hold_timeout_seconds)
                self._answer(conn, preamble, code, error)
                return None, preamble, code
            if stream and now >= next_beat:
                if not preamble:
                    preamble = True
                    conn.write_head(
                        200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")], None
                    )
                conn.write_piece(b": waiting for a replica of %s\n\n" % name.encode())
                next_beat = now + KEEPALIVE_SECONDS
            future = self.holds.waiter(current.route)
            try:
                # A short bound, so that a client that left is noticed and keep-alives go out.
                await asyncio.wait_for(
                    asyncio.shield(future), min(1.0, deadline - now, max(0.01, next_beat - now))
                )
            except TimeoutError:
                pass
            finally:
                self.holds.drop(current.route.key, future)
            current = self.table.resolve(name)
        if current is None:
            code, error = errors.model_not_found(name)
            self._answer(conn, preamble, code, error)
            return None, preamble, code
        return current, preamble, 0

    def _answer(self, conn: Downstream, preamble: bool, code: int, error: bytes) -> None:
        if preamble:
            conn.write_piece(errors.sse_event(code, message_of(error, MAX_MESSAGE)))
            conn.end()
        else:
            conn.respond(code, error, headers=[(b"retry-after", b"1")] if code == 503 else [])

    async def _forward(
        self, conn: Downstream, request: Request, payload: dict[str, Any], target: Target, stats: ModelStats
    ) -> int:
        body = request.body
        if target.rewrite is not None:
            payload["model"] = target.rewrite
            body = json.dumps(payload).encode()
        routing = target.route.routing
        key: str | None = None
        if routing.session_header:
            value = request.header(routing.session_header.encode())
            key = value.decode(errors="replace") if value else None
        if key is None and routing.strategy == "PrefixAffinity":
            key = prefix_key(payload, routing.prefix_length)
        stream = payload.get("stream") is True
        preamble = False
        if target.route.autoscaling is not None:
            name = str(payload.get("model"))
            held, preamble, code = await self._hold(conn, name, target, stream)
            if held is None:
                return code
            target = held
        headers = end_to_end(request.headers)
        tried: set[str] = set()
        stale_retry = True
        attempt = 0
        while attempt < MAX_ATTEMPTS:
            eligible = target.eligible()
            endpoint = self.balancer.pick(
                eligible,
                key=key,
                load_factor=routing.load_factor,
                exclude=tried,
                rotate=routing.strategy == "RoundRobin",
            )
            if endpoint is None:
                if attempt == 0:
                    code, error = errors.no_ready_pod(target.adapter or target.route.served_name)
                    self._answer(conn, preamble, code, error)
                    return code
                break
            attempt += 1
            may_retry = attempt < MAX_ATTEMPTS and len(eligible) > len(tried) + 1
            outcome, reused, status = await self._exchange(
                conn, endpoint, request, headers, body, stats, stream, may_retry, preamble
            )
            if outcome == "retry":
                stats.retries += 1
                if reused and stale_retry:
                    stale_retry = False  # a pooled connection the pod had just closed: once, uncounted
                    attempt -= 1
                    continue
                tried.add(endpoint.address)
                continue
            if outcome == "connect":
                stats.retries += 1
                self.balancer.mark_down(endpoint.address)
                tried.add(endpoint.address)
                continue
            # 499: the client left first (nginx's code); a stream cut after its head counts as 502.
            return {"gone": 499, "broken": 502}.get(outcome, status)
        code, error = errors.upstream_failed(target.route.served_name, attempt)
        self._answer(conn, preamble, code, error)
        return code

    async def _exchange(
        self,
        conn: Downstream,
        endpoint: Endpoint,
        request: Request,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        stats: ModelStats,
        stream: bool,
        may_retry: bool,
        preamble: bool = False,
    ) -> tuple[str, bool, int]:
        """One try on one pod: its outcome ("done", "broken", "gone", "retry" or "connect"), whether
        it went over a reused connection, and the pod's status code (0 if none)."""
        self.balancer.acquire(endpoint.address)
        try:
            try:
                upstream = await self.pool.get(endpoint.address)
            except (OSError, TimeoutError) as error:
                log.info(
                    "pod %s (%s) refused: %s", endpoint.pod, endpoint.address, error or type(error).__name__
                )
                return "connect", False, 0
            if conn.closed:
                self.pool.put(upstream)
                return "gone", False, 0
            reused = upstream.used
            on_head = functools.partial(self.stats.pod_head, endpoint.address)
            exchange = Exchange(conn, stats, request.started, may_retry, stream, on_head, preamble)
            conn.exchange = exchange
            self.stats.pod_requests[endpoint.address] = self.stats.pod_requests.get(endpoint.address, 0) + 1
            head = b"".join(
                [
                    b"%s %s HTTP/1.1\r\nhost: %s\r\n"
                    % (request.method, request.url, endpoint.address.encode()),
                    *(b"%s: %s\r\n" % kv for kv in headers),
                    b"content-length: %d\r\n\r\n" % len(body),
                ]
            )
            upstream.send(exchange, head, body)
            outcome = await exchange.future
            conn.exchange = None
            # A retry is either a cut before the head (a connection problem, maybe a pooled
            # connection the pod had just closed) or a swallowed 502/503/504 (an answer).
            return outcome, reused and not exchange.swallow, exchange.status
        finally:
            self.balancer.release(endpoint.address)


async def serve(router: Router, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(router.protocol, host, port, backlog=4096, reuse_address=True)
