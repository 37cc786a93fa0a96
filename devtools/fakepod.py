"""Fake vLLM pods for the router's tests: keep-alive HTTP/1.1 servers at any loopback address.

Each answers like a vLLM pod as far as the operator and the router look (/health, /metrics,
/v1/models with its adapters, adapter load and unload, chat and completions, streamed or not),
says in every completion which pod answered and which model name it was sent, and misbehaves
on demand: the next requests can be dropped before an answer, answered 503, or cut mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from devtools.hostile import PodServers, metrics_page, models_body
from devtools.stub_server import read_request

# Every fake answer's usage: this many prompt tokens, and one generated token per event.
PROMPT_TOKENS = 7


@dataclass(frozen=True)
class Call:
    """One request a fake pod received, its JSON body parsed."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakePod:
    """One pod's behaviour and what it saw."""

    name: str
    served: str = "tiny"
    adapters: set[str] = field(default_factory=set)
    refuse_loads: bool = False
    events: int = 3
    delay: float = 0.0
    """Seconds before answering a completion, and between stream events."""
    faults: deque[str] = field(default_factory=deque)
    """Next completions: "drop" (close without answering), "503", "cut" (stream cut after one event)."""
    seen: list[dict[str, Any]] = field(default_factory=list)
    """Completion requests: path, model, headers."""
    in_flight: int = 0
    most_in_flight: int = 0
    connections: int = 0
    misrouted: list[str] = field(default_factory=list)
    """Completions for a name this pod does not serve (answered 404, as vLLM does)."""
    spans: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of each completion, wall-clock (time.time()), to line up with other logs."""

    def completion(self, model: str, index: int = 0) -> dict[str, Any]:
        return {
            "id": f"cmpl-{self.name}",
            "object": "chat.completion",
            "model": model,
            "pod": self.name,
            "choices": [{"index": index, "message": {"role": "assistant", "content": self.name}}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1},
        }


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _json(status: int, body: Any) -> bytes:
    data = json.dumps(body).encode()
    return _head(status, {"content-type": "application/json", "content-length": str(len(data))}) + data


def _address(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"{host}:{port}"


class FakePods(PodServers):
    """Fake pods at (host, port) addresses, on one asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, set[asyncio.Task[None]]] = {}

    def add(self, pod: FakePod, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve `pod` at host:port (0: a free port); returns `host:port`."""

        address = ""

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks = self.tasks.setdefault(address, set())
            tasks.add(task)
            try:
                await self._connection(reader, writer, pod)
            finally:
                tasks.discard(task)

        async def start() -> asyncio.Server:
            return await asyncio.start_server(connection, host, port)

        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)
        self.servers.append(server)
        address = _address(server)
        return address

    def catch_all(self, port: int, pod_for: Callable[[str], Awaitable[FakePod]]) -> None:
        """Answer at `port` on every local address, each request by the fake pod `pod_for`
        gives for the address it came to. kwok gives a pod its IP as it marks it Ready, so a
        server started only then could lose the router's first connection (a real pod listens
        before it is Ready); one listener on all addresses is there first. `pod_for` is asked
        again for each request: kwok reuses a deleted pod's IP for a new pod, and a kept-alive
        connection must then answer as the new one."""

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            address = str(writer.get_extra_info("sockname")[0])
            await self._connection(reader, writer, await pod_for(address), lambda: pod_for(address))

        async def start() -> asyncio.Server:
            return await asyncio.start_server(connection, "0.0.0.0", port, reuse_address=True)

        self.servers.append(asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10))

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pod: FakePod,
        resolve: Callable[[], Awaitable[FakePod]] | None = None,
    ) -> None:
        pod.connections += 1
        try:
            while True:
                method, path, headers, raw = await read_request(reader)
                call = Call(method, path, headers, json.loads(raw) if raw else {})
                pod = await resolve() if resolve is not None else pod
                if not await self._answer(pod, call, writer):
                    return
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            writer.transport.abort()  # killed: connections reset, as a dead pod's are
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, pod: FakePod, call: Call, writer: asyncio.StreamWriter) -> bool:
        """Write one response; False when the connection must end."""
        method, path, body = call.method, call.path, call.body
        if method == "GET" and path == "/health":
            writer.write(_head(200, {"content-length": "0"}))
        elif method == "GET" and path == "/metrics":
            page = metrics_page(running=str(pod.in_flight)).encode()
            writer.write(_head(200, {"content-length": str(len(page))}) + page)
        elif method == "GET" and path == "/v1/models":
            data = models_body(*sorted(pod.adapters), served=pod.served)
            writer.write(
                _head(200, {"content-type": "application/json", "content-length": str(len(data))}) + data
            )
        elif method == "POST" and path == "/v1/load_lora_adapter":
            if pod.refuse_loads:
                writer.write(_json(400, {"error": {"message": "refused by the test"}}))
            else:
                pod.adapters.add(str(body.get("lora_name")))
                writer.write(_json(200, {"ok": True}))
        elif method == "POST" and path == "/v1/unload_lora_adapter":
            pod.adapters.discard(str(body.get("lora_name")))
            writer.write(_json(200, {"ok": True}))
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            return await self._complete(pod, call, writer)
        else:
            writer.write(_json(404, {"error": {"message": f"no route {path}"}}))
        await writer.drain()
        return True

    async def _complete(self, pod: FakePod, call: Call, writer: asyncio.StreamWriter) -> bool:
        body = call.body
        model = str(body.get("model"))
        pod.seen.append({"path": call.path, "model": model, "headers": call.headers})
        if model != pod.served and model not in pod.adapters:
            pod.misrouted.append(model)
            writer.write(
                _json(404, {"error": {"message": f"The model `{model}` does not exist.", "code": 404}})
            )
            await writer.drain()
            return True
        fault = pod.faults.popleft() if pod.faults else ""
        if fault == "drop":
            writer.transport.abort()
            return False
        if fault == "503":
            writer.write(_json(503, {"error": {"message": "draining"}}))
            await writer.drain()
            return True
        pod.in_flight += 1
        pod.most_in_flight = max(pod.most_in_flight, pod.in_flight)
        started = time.time()
        try:
            if pod.delay:
                await asyncio.sleep(pod.delay)
            if not body.get("stream"):
                writer.write(_json(200, pod.completion(model)))
                await writer.drain()
                return True
            writer.write(_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"}))
            for i in range(pod.events):
                event = json.dumps(
                    {"object": "chat.completion.chunk", "model": model, "pod": pod.name, "i": i}
                )
                data = f"data: {event}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                if fault == "cut":
                    writer.transport.abort()
                    return False
                if pod.delay:
                    await asyncio.sleep(pod.delay)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": pod.events}
                data = f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
            return True
        finally:
            pod.in_flight -= 1
            pod.spans.append((started, time.time()))

    def kill(self, address: str) -> None:
        """The pod at `address` dies: its port closes and its open connections are reset."""

        async def stop() -> None:
            for server in [s for s in self.servers if _address(s) == address]:
                server.close()
                self.servers.remove(server)
                for task in self.tasks.pop(address, set()):
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
