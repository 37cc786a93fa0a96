"""Driving the server's ASGI app directly, for what an HTTP client cannot do (disconnect mid-way,
send a body in chosen chunks)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def post_scope(path: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    """The ASGI scope of a JSON POST to `path`, with extra `headers`."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
