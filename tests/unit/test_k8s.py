"""The Kubernetes layer against servers that misbehave at the socket level."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import kubernetes
import pytest

from vllm_operator import k8s


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections and never answers (a hung API server or proxy)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.timeout(60)  # the old code hung here forever
async def test_a_server_that_never_answers_cannot_block_a_call_forever(silent_server: str) -> None:
    config = kubernetes.client.Configuration()
    config.host = silent_server
    started = time.monotonic()
    async with k8s.KubeCluster(config, timeout=(1.0, 0.5)) as cluster:
        with pytest.raises(k8s.TransientError, match="after 5 attempts"):
            await cluster.get("Service", "default", "x")
    # 5 reads of 0.5 s plus the backoff between them (0.2 .. 1.6 s, +50 % jitter).
    assert time.monotonic() - started < 10


def test_the_default_timeout_is_bounded() -> None:
    connect, read = k8s.API_TIMEOUT
    assert 0 < connect <= 10 and 0 < read <= 60


SECRET = "c2VjcmV0LXZhbHVlLXRoYXQtbXVzdC1uZXZlci1sZWFr"


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next (status, headers, body) of the server's script."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.authorization.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        status, headers, body = self.server.script.pop(0)  # type: ignore[attr-defined]
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[http.server.HTTPServer, k8s.KubeCluster]]:
    server = http.server.HTTPServer(("127.0.0.1", 0), Scripted)
    server.script = []  # type: ignore[attr-defined]
    server.authorization = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{server.server_address[1]}"
    async with k8s.KubeCluster(config, timeout=(1.0, 2.0)) as cluster:
        yield server, cluster
    server.shutdown()
    thread.join()
    server.server_close()


def status_body(code: int, reason: str, message: str) -> bytes:
    return json.dumps({"kind": "Status", "code": code, "reason": reason, "message": message}).encode()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, k8s.APIInvalidError),
        (401, k8s.APIClientError),
        (403, k8s.APIForbiddenError),
        (404, k8s.APINotFoundError),
        (410, k8s.APIGoneError),
        (422, k8s.APIInvalidError),
        (501, k8s.APIServerError),
    ],
)
async def test_an_error_answer_is_our_class_by_status_with_the_status_message(
    scripted: tuple[http.server.HTTPServer, k8s.KubeCluster], status: int, error: type[k8s.APIError]
) -> None:
    server, cluster = scripted
    server.script.append((status, {}, status_body(status, "Nope", 'secrets "x" is refused')))  # type: ignore[attr-defined]
    with pytest.raises(error) as caught:
        await cluster.request("POST", "/api/v1/namespaces/default/secrets", body={"data": {"k": SECRET}})
    assert type(caught.value) is error
    assert (caught.value.status, caught.value.message) == (status, 'secrets "x" is refused')


async def test_an_error_never_carries_the_body_that_echoes_the_payload(
    scripted: tuple[http.server.HTTPServer, k8s.KubeCluster],
) -> None:
    """The client library's ApiException put the whole body in its text; an API server (or a
    webhook) echoing a Secret's data would have sent it to a log."""
    server, cluster = scripted
    echo = json.dumps({"kind": "Status", "code": 422, "message": "invalid: " + "x" * 2000, "details": SECRET})
    server.script.append((422, {}, echo.encode()))  # type: ignore[attr-defined]
    with pytest.raises(k8s.APIInvalidError) as caught:
        await cluster.request("POST", "/api/v1/namespaces/default/secrets", body={"data": {"k": SECRET}})
    text = f"{caught.value} {caught.value!r} {vars(caught.value)}"
    assert SECRET not in text
    assert len(caught.value.message) == k8s.MAX_MESSAGE


async def test_throttling_is_retried_after_the_servers_pause_then_succeeds(
    scripted: tuple[http.server.HTTPServer, k8s.KubeCluster],
) -> None:
    server, cluster = scripted
    server.script += [  # type: ignore[attr-defined]
        (429, {"Retry-After": "0.3"}, status_body(429, "TooManyRequests", "slow down")),
        (200, {"Content-Type": "application/json"}, b'{"kind": "Service"}'),
    ]
    started = time.monotonic()
    assert await cluster.request("GET", "/api/v1/namespaces/default/services/x") == {"kind": "Service"}
    assert 0.3 <= time.monotonic() - started < 2


async def test_a_watch_error_event_is_our_class_by_its_code(
    scripted: tuple[http.server.HTTPServer, k8s.KubeCluster],
) -> None:
    server, cluster = scripted
    expired = {"type": "ERROR", "object": json.loads(status_body(410, "Expired", "too old resource version"))}
    server.script.append((200, {}, json.dumps(expired).encode() + b"\n"))  # type: ignore[attr-defined]
    with pytest.raises(k8s.APIGoneError, match="too old resource version"):
        [event async for event in cluster.watch("Pod", "default", "", "1", seconds=1)]


async def test_a_watch_event_longer_than_aiohttps_line_limit_arrives_whole(
    scripted: tuple[http.server.HTTPServer, k8s.KubeCluster],
) -> None:
    """aiohttp's line reader refuses lines over 128 KiB; a Pod with big annotations is one."""
    server, cluster = scripted
    big = {"metadata": {"name": "p", "resourceVersion": "2", "annotations": {"a": "x" * 300_000}}}
    events = [{"type": "ADDED", "object": big}, {"type": "DELETED", "object": {"metadata": {"name": "q"}}}]
    server.script.append((200, {}, b"\n".join(json.dumps(e).encode() for e in events) + b"\n"))  # type: ignore[attr-defined]
    seen = [event async for event in cluster.watch("Pod", "default", "", "1", seconds=1)]
    assert seen == [("ADDED", big), ("DELETED", {"metadata": {"name": "q"}})]


async def test_the_bearer_token_is_read_for_each_request(
    scripted: tuple[http.server.HTTPServer, k8s.KubeCluster],
) -> None:
    """The in-cluster config renews an expiring service-account token through its refresh hook:
    a token kept from the first request would be refused after an hour."""
    server, cluster = scripted
    renewals = iter(["Bearer first", "Bearer second"])

    def refresh(configuration: kubernetes.client.Configuration) -> None:
        configuration.api_key["authorization"] = next(renewals)

    cluster.configuration.api_key["authorization"] = "Bearer stale"
    cluster.configuration.refresh_api_key_hook = refresh
    server.script += [(200, {}, b"{}"), (200, {}, b"{}")]  # type: ignore[attr-defined]
    await cluster.request("GET", "/api/v1/namespaces/default/services/x")
    await cluster.request("GET", "/api/v1/namespaces/default/services/x")
    assert server.authorization == ["Bearer first", "Bearer second"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (0, '{"code": "x", "message": "m"}', {}, (k8s.APIServerError, 500, "m", None)),
        (0, '{"code": true}', {}, (k8s.APIServerError, 500, "", None)),
        (0, '{"code": 410, "message": "gone"}', {}, (k8s.APIGoneError, 410, "gone", None)),
        (503, "[" * 100_000, {}, (k8s.APIServerError, 503, "[" * k8s.MAX_MESSAGE, None)),
        (502, "\n\n", {}, (k8s.APIServerError, 502, "", None)),
        (429, "", {"Retry-After": "nan"}, (k8s.APIClientError, 429, "", None)),
        (429, "", {"Retry-After": "inf"}, (k8s.APIClientError, 429, "", None)),
        (429, "", {"Retry-After": "-1"}, (k8s.APIClientError, 429, "", None)),
        (429, "", {"Retry-After": "2"}, (k8s.APIClientError, 429, "", 2.0)),
    ],
)
def test_a_hostile_error_answer_still_makes_an_error(
    status: int,
    body: str,
    headers: dict[str, str],
    expected: tuple[type[k8s.APIError], int, str, float | None],
) -> None:
    """A proxy in front of the API server may answer anything: never a crash, never a NaN sleep."""
    error = k8s.api_error(status, "", body, headers)
    assert (type(error), error.status, error.message, error.retry_after) == expected
