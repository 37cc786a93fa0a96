"""Calls to servers that may be broken or hostile: what the operator sends to every server pod
(/health, /metrics, /v1/models, adapter loads) and to its router.

Unlike `AsyncClient` (a user's client: retries, failover, parsed results), a probe makes one
attempt and trusts nothing: bodies are asked plain and refused compressed or over a cap while
they arrive, and every failure, whatever the server did, is one `ProbeError` whose text is a
short reason. The caller sets the deadline (one for all of a pod's calls, with
`asyncio.timeout`): httpx's timeout is per network read, so a server sending a byte every
1.5 s would otherwise hold a call for as long as it kept dripping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from vllm_operator_client._core import AsyncClosing, auth_headers

# Plain bodies only: a compressed one would be inflated before its size could be checked.
IDENTITY = {"Accept-Encoding": "identity"}


class ProbeError(Exception):
    """A server answered, but not as a healthy one does, or did not answer; the text may quote
    the server (redact secrets before showing it)."""


class Probe(AsyncClosing):
    """One attempt per call, each body capped; for many servers at once, bounded."""

    def __init__(
        self,
        timeout: float,
        max_connections: int = 64,
        *,
        keepalive: bool = True,
        token: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`timeout` bounds each network read; `keepalive=False` keeps no idle connection (httpx
        scans its whole pool for every request: with hundreds of pods, that scan was a scrape
        round's cost); `token` goes as a bearer header on every call; `transport` replaces the
        network (httpx.MockTransport in tests)."""
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=None if keepalive else 0
        )
        self._http = httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            trust_env=False,
            headers=auth_headers(token or None),
            transport=transport,
        )

    async def request(
        self,
        method: str,
        url: str,
        cap: int,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one call; ProbeError for whatever else happened."""
        what = _path_of(url)
        try:
            async with self._http.stream(
                method, url, json=body, headers={**IDENTITY, **(headers or {})}
            ) as response:
                return response.status_code, await read_capped(response, cap, what)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ProbeError(describe(exc)) from None

    async def aclose(self) -> None:
        await self._http.aclose()


async def read_capped(response: httpx.Response, cap: int, what: str) -> bytes:
    """A response's body, refused (ProbeError) as soon as it is compressed or over `cap` bytes."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ProbeError(f"{what} came {encoding[:30]}-encoded, though asked for identity")
    declared = response.headers.get("content-length", "")
    # A length is digits; more than 12 of them is over any cap (and int() of a huge one is slow).
    if declared.isdecimal() and (len(declared) > 12 or int(declared) > cap):
        raise ProbeError(f"{what} is {declared[:13]} bytes, over the {cap}-byte cap")
    body = bytearray()
    # Decoded bytes are the raw ones here: any content encoding but identity was refused above.
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > cap:
            # Leaving the response unread closes its connection: the rest is never received.
            raise ProbeError(f"{what} is over the {cap}-byte cap")
    return bytes(body)


def parse_json(body: bytes, what: str) -> Any:
    """A JSON body; ProbeError when it is not JSON (or nests too deep for the decoder)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ProbeError(f"{what}: not a JSON body") from None


def describe(exc: Exception) -> str:
    """A short reason for a failed call."""
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    return str(exc) or exc.__class__.__name__


def _path_of(url: str) -> str:
    try:
        return httpx.URL(url).path or "/"
    except httpx.InvalidURL:
        return "the URL"
