"""A scripted HTTP/1.1 server on loopback that misbehaves on demand (429, 503, drops)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    """What the stub answers to the next request."""

    status: int = 200
    body: Any = None  # JSON body; None means a default completion
    headers: dict[str, str] = field(default_factory=dict)
    events: list[str] | None = None  # SSE data payloads (a stream)
    drop: bool = False  # close the connection without answering
    drop_after: int | None = None  # stream: close after this many events, mid-body
    delay: float = 0.0  # seconds before answering (and between events)


@dataclass
class Seen:
    """A request the stub received."""

    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def chat_body(text: str = "hello there", model: str = "stub") -> dict[str, Any]:
    """A non-streaming chat completion."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def chat_events(pieces: list[str], model: str = "stub") -> list[str]:
    """SSE payloads of a streamed chat completion with usage and [DONE]."""
    out = []
    for i, p in enumerate(pieces):
        delta: dict[str, Any] = {"content": p} | ({"role": "assistant"} if i == 0 else {})
        fin = "stop" if i == len(pieces) - 1 else None
        out.append(
            json.dumps(
                {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": fin}],
                }
            )
        )
    out.append(
        json.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": len(pieces),
                    "total_tokens": 5 + len(pieces),
                },
            }
        )
    )
    out.append("[DONE]")
    return out


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    """One HTTP/1.1 request with a Content-Length body: method, path, lowercase headers, body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    return method, path, headers, await reader.readexactly(int(headers.get("content-length", "0")))


class Stub:
    """The server: runs its own event loop in a thread; `script` is consumed request by request."""

    def __init__(self) -> None:
        """Not started."""
        self.script: deque[Reply] = deque()
        self.seen: list[Seen] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Stub:
        """Listen on a free loopback port."""
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Close and stop the loop."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            # Cancel handlers still sleeping (e.g. a delayed reply nobody waited for).
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def then(self, *replies: Reply) -> Stub:
        """Queue replies."""
        self.script.extend(replies)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection (Connection: close keeps the stub simple)."""
        try:
            method, path, headers, raw = await read_request(reader)
            body = json.loads(raw) if raw else None
            self.seen.append(Seen(time.monotonic(), method, path, headers, body))
            reply = self.script.popleft() if self.script else Reply()
            await self._answer(writer, reply, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, w: asyncio.StreamWriter, r: Reply, req: Any) -> None:
        """Write the reply (or misbehave)."""
        if r.delay:
            await asyncio.sleep(r.delay)
        if r.drop:
            w.transport.abort()
            return
        streaming = r.events is not None or (
            r.status == 200 and r.body is None and isinstance(req, dict) and req.get("stream")
        )
        if streaming and r.status == 200:
            events = r.events if r.events is not None else chat_events(["hel", "lo", "!"])
            hdr = {
                "content-type": "text/event-stream",
                "transfer-encoding": "chunked",
                "connection": "close",
                **r.headers,
            }
            w.write(self._head(200, hdr))
            for i, data in enumerate(events):
                if r.drop_after is not None and i >= r.drop_after:
                    await w.drain()
                    w.transport.abort()  # mid-body: no terminating chunk
                    return
                payload = f"data: {data}\n\n".encode()
                w.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                await w.drain()
                if r.delay:
                    await asyncio.sleep(r.delay)
            w.write(b"0\r\n\r\n")
            await w.drain()
            return
        body = r.body if r.body is not None else chat_body()
        raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        hdr = {
            "content-type": "application/json",
            "content-length": str(len(raw)),
            "connection": "close",
            **r.headers,
        }
        w.write(self._head(r.status, hdr) + raw)
        await w.drain()

    @staticmethod
    def _head(status: int, headers: dict[str, str]) -> bytes:
        """Status line and headers."""
        lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()
