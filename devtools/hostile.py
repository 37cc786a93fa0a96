"""HTTP servers that answer like healthy, broken or hostile vLLM pods, at any loopback address.

A `Behaviour` answers a request path by writing raw HTTP/1.1 (so that a test controls every
byte and every pause); `PodServers` runs them all on one asyncio loop in a daemon thread, so
that both the unit tests (async) and the end-to-end tests (sync, the operator in another
process) can put a pod at an address. Every response closes its connection, as the operator
keeps none open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

Behaviour = Callable[[str, asyncio.StreamWriter], Awaitable[None]]
CHUNK = 64 * 1024


def metrics_page(running: str = "1", generated: str = "100", kv: str = "0.25") -> str:
    """The lines of a vLLM 0.32 page the operator reads (one engine), plus a histogram it skips."""
    labels = 'engine="0",model_name="tiny"'
    return (
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running{{{labels}}} {running}\n"
        "# TYPE vllm:num_requests_waiting gauge\n"
        f"vllm:num_requests_waiting{{{labels}}} 0.0\n"
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f"vllm:kv_cache_usage_perc{{{labels}}} {kv}\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f"vllm:generation_tokens_total{{{labels}}} {generated}\n"
        "# TYPE vllm:prompt_tokens_total counter\n"
        f"vllm:prompt_tokens_total{{{labels}}} 50.0\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="tiny"}} 3.0\n'
        "# TYPE vllm:e2e_request_latency_seconds histogram\n"
        f'vllm:e2e_request_latency_seconds_bucket{{{labels},le="+Inf"}} 3.0\n'
    )


def models_body(*ids: Any, served: str = "tiny") -> bytes:
    """A /v1/models listing: the base model, then each of `ids` as an adapter of it."""
    data: list[Any] = [{"id": served, "object": "model", "root": f"/models/{served}", "parent": None}]
    data += [{"id": i, "object": "model", "root": f"/lora/{i}", "parent": served} for i in ids]
    return json.dumps({"object": "list", "data": data}).encode()


async def send(writer: asyncio.StreamWriter, body: bytes, status: int = 200) -> None:
    """One whole response with its Content-Length."""
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()


def pod(
    metrics: str | Callable[[], str] = metrics_page,
    models: bytes = b"",
    slow: Behaviour | None = None,
    slow_path: str = "/metrics",
) -> Behaviour:
    """A pod answering /health, /metrics (a page or a function giving one) and /v1/models;
    `slow` answers `slow_path` instead, to misbehave there."""

    async def respond(path: str, writer: asyncio.StreamWriter) -> None:
        if slow is not None and path == slow_path:
            await slow(path, writer)
        elif path == "/health":
            await send(writer, b"")
        elif path == "/metrics":
            await send(writer, (metrics if isinstance(metrics, str) else metrics()).encode())
        elif path == "/v1/models" and models:
            await send(writer, models)
        else:
            await send(writer, b'{"error": {"message": "not found"}}', 404)

    return respond


def alternating_page() -> Callable[[], str]:
    """Pages whose running count alternates 1, 2, 1 ...: every scrape moves the status."""
    count = 0

    def page() -> str:
        nonlocal count
        count += 1
        return metrics_page(running=str(1 + count % 2), generated=str(100 * count))

    return page


def drip(every: float = 1.5, length: int = 100_000, limit: float = 600.0) -> Behaviour:
    """Headers at once, then one byte of the body every `every` seconds (for at most `limit`)."""

    async def respond(path: str, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode())
        await writer.drain()
        for _ in range(min(length, int(limit / every))):
            await asyncio.sleep(every)
            writer.write(b"#")
            await writer.drain()

    return respond


def huge(size: int, declare_length: bool = False) -> Behaviour:
    """A body of `size` bytes of comment lines, streamed chunk by chunk: chunked transfer
    encoding, or a Content-Length that says the size up front."""
    line = b"# padding " + b"x" * 53 + b"\n"
    block = line * (CHUNK // len(line))

    async def respond(path: str, writer: asyncio.StreamWriter) -> None:
        framing = f"Content-Length: {size}" if declare_length else "Transfer-Encoding: chunked"
        writer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())
        left = size
        while left > 0:
            part = block[:left]
            writer.write(part if declare_length else b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()  # waits while the reader does not read: memory stays small
            left -= len(part)
        if not declare_length:
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return respond


class PodServers:
    """Servers at (host, port) addresses, each with its behaviour, on a loop of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pod-servers", daemon=True)
        self.servers: list[asyncio.Server] = []
        self.thread.start()

    def serve(self, host: str, port: int, behaviour: Behaviour) -> int:
        """Serve `behaviour` at host:port (port 0: any free one); returns the port."""

        async def start() -> asyncio.Server:
            return await asyncio.start_server(lambda r, w: self._handle(r, w, behaviour), host, port)

        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, behaviour: Behaviour
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await behaviour(head.split(b" ", 2)[1].decode(), writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the operator gave up on this pod and closed the connection: as intended
        except asyncio.CancelledError:
            # close() ended a connection still open (a drip): the end of this task, not an
            # error; asyncio's own callback would log a cancelled connection task as one.
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                server.close()
            # Connections still open (a drip the operator has not dropped yet) end here.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> PodServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
