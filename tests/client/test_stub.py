"""Retries, backoff, failover and error mapping against a misbehaving stub server."""

from __future__ import annotations

import itertools
import socket

import pytest

from devtools.stub_server import Reply, Stub, chat_events, error_body
from vllm_operator_client import (
    APIConnectionError,
    APIStreamError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    InternalServerError,
    RateLimitError,
    Result,
    RetryPolicy,
    StreamInterruptedError,
)
from vllm_operator_client.async_client import Backend

OVERLOADED = error_body("The server is overloaded; retry later.", "service_unavailable_error", "queue_full")


def gaps(stub: Stub) -> list[float]:
    """Seconds between consecutive requests the stub saw."""
    t = [s.at for s in stub.seen]
    return [b - a for a, b in itertools.pairwise(t)]


def closed_port() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_429_retry_after_is_honoured(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(429, error_body("slow down", "rate_limit_error"), {"Retry-After": "0.4"}))
    with Client(stub.url, retry=fast_retry) as c:
        r = c.chat("hi")
    assert r.text == "hello there"
    assert r.metrics.retries == 1
    assert len(stub.seen) == 2
    assert gaps(stub)[0] >= 0.38  # the server's 0.4 s, not the 0.05 s backoff


def test_retry_after_ms_and_http_date_forms(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(429, headers={"retry-after-ms": "250"}))
    with Client(stub.url, retry=fast_retry) as c:
        c.chat("hi")
    assert gaps(stub)[0] >= 0.23


def test_503_backoff_grows_then_succeeds(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(503, OVERLOADED), Reply(503, OVERLOADED))
    with Client(stub.url, retry=fast_retry) as c:
        r = c.chat("hi")
    assert r.metrics.retries == 2 and len(stub.seen) == 3
    first, second = gaps(stub)
    assert 0.045 <= first < 0.5  # initial_delay 0.05 (upper bounds leave room for a busy CI)
    assert 0.095 <= second < 0.5 and second > first * 1.3  # doubled


def test_gives_up_after_max_retries_with_the_error_body(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(*[Reply(503, OVERLOADED)] * 5)
    with Client(stub.url, retry=fast_retry) as c, pytest.raises(InternalServerError) as info:
        c.chat("hi")
    err = info.value
    assert len(stub.seen) == 3  # 1 + max_retries
    assert (err.status, err.type, err.code) == (503, "service_unavailable_error", "queue_full")
    assert err.message == "The server is overloaded; retry later."
    assert err.body == OVERLOADED


def test_400_is_never_retried(stub: Stub, fast_retry: RetryPolicy) -> None:
    body = error_body("max_tokens: too big", "invalid_request_error", "invalid_value", "max_tokens")
    stub.then(Reply(400, body))
    with Client(stub.url, retry=fast_retry) as c, pytest.raises(BadRequestError) as info:
        c.chat("hi", max_tokens=10**9)
    assert len(stub.seen) == 1
    assert (info.value.param, info.value.code) == ("max_tokens", "invalid_value")


def test_401_not_retried_and_bearer_sent(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(
        Reply(401, error_body("Invalid or missing API key.", "authentication_error", "invalid_api_key"))
    )
    with Client(stub.url, api_key="sekret", retry=fast_retry) as c, pytest.raises(AuthenticationError):
        c.chat("hi")
    assert len(stub.seen) == 1
    assert stub.seen[0].headers["authorization"] == "Bearer sekret"


def test_non_json_error_body(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(
        Reply(502, "<html>bad gateway</html>"),
        Reply(502, "<html>bad gateway</html>"),
        Reply(502, "<html>bad gateway</html>"),
    )
    with Client(stub.url, retry=fast_retry) as c, pytest.raises(InternalServerError) as info:
        c.chat("hi")
    assert info.value.status == 502 and "bad gateway" in info.value.message


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_completion_that_failed_after_the_work_is_not_sent_again(
    stub: Stub, fast_retry: RetryPolicy, status: int
) -> None:
    stub.then(Reply(status, error_body("engine died", "server_error")))
    with Client(stub.url, retry=fast_retry) as c, pytest.raises(InternalServerError):
        c.chat("hi")
    assert len(stub.seen) == 1  # the server may have generated it all: not tripled


def test_a_completion_that_timed_out_is_not_sent_again(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(delay=1.0), Reply(delay=1.0), Reply(delay=1.0))
    with Client(stub.url, timeout=0.2, retry=fast_retry) as c, pytest.raises(APITimeoutError):
        c.chat("hi")
    assert len(stub.seen) == 1


async def test_the_async_client_does_not_repeat_work_either(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(500, error_body("engine died", "server_error")))
    async with AsyncClient(stub.url, retry=fast_retry) as c:
        with pytest.raises(InternalServerError):
            await c.chat("hi")
    assert len(stub.seen) == 1


def test_reads_are_still_retried_after_a_5xx(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(502, "<html>bad gateway</html>"), Reply(200, {"object": "list", "data": []}))
    with Client(stub.url, retry=fast_retry) as c:
        assert c.models() == []
    assert len(stub.seen) == 2


def test_connection_drop_before_answer_is_retried(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(drop=True))
    with Client(stub.url, retry=fast_retry) as c:
        assert c.chat("hi").metrics.retries == 1
    assert len(stub.seen) == 2


def test_stream_drop_before_first_chunk_is_retried(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(events=chat_events(["a", "b"]), drop_after=0))
    with Client(stub.url, retry=fast_retry) as c:
        r = c.chat_stream("hi").collect()
    assert r.text == "hello!"  # the stub's default stream answered the retry
    assert r.metrics.retries == 1 and len(stub.seen) == 2


def test_stream_drop_mid_stream_raises_with_partial_text(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(events=chat_events(["one ", "two ", "three ", "four"]), drop_after=2))
    got: list[str] = []
    with Client(stub.url, retry=fast_retry) as c, pytest.raises(StreamInterruptedError) as info:
        for chunk in c.chat_stream("hi"):
            got.append(chunk.text)
    assert got == ["one ", "two "]
    assert (info.value.chunks, info.value.text) == (2, "one two ")
    assert len(stub.seen) == 1  # never re-sent: the caller already has part of the output


def test_in_band_error_event(stub: Stub) -> None:
    events = [
        *chat_events(["x"])[:1],
        '{"error": {"message": "Generation failed", "type": "server_error", "param": null, "code": 500}}',
        "[DONE]",
    ]
    stub.then(Reply(events=events))
    with Client(stub.url) as c, pytest.raises(APIStreamError) as info:
        c.chat_stream("hi").collect()
    assert (info.value.message, info.value.code) == ("Generation failed", 500)


def test_timeout(stub: Stub) -> None:
    stub.then(Reply(delay=1.0))
    with Client(stub.url, timeout=0.2, max_retries=0) as c, pytest.raises(APITimeoutError):
        c.chat("hi")


def test_failover_to_the_second_endpoint_at_once(stub: Stub, fast_retry: RetryPolicy) -> None:
    down = closed_port()
    with Client([down, stub.url], strategy="failover", retry=fast_retry) as c:
        r = c.chat("hi")
        assert r.metrics.endpoint == stub.url and r.metrics.retries == 1
        assert r.metrics.total_s < 0.04  # no backoff before switching
        # The dead endpoint cools down: the next request goes straight to the live one.
        assert c.chat("hi").metrics.retries == 0


def test_failover_on_503(stub: Stub, stub2: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(503, OVERLOADED))
    with Client([stub.url, stub2.url], strategy="failover", retry=fast_retry) as c:
        assert c.chat("hi").metrics.endpoint == stub2.url
    assert (len(stub.seen), len(stub2.seen)) == (1, 1)


def test_round_robin_spreads(stub: Stub, stub2: Stub) -> None:
    with Client([stub.url, stub2.url + "/v1"]) as c:
        for _ in range(4):
            c.chat("hi")
    assert (len(stub.seen), len(stub2.seen)) == (2, 2)
    assert stub.seen[0].path == "/v1/chat/completions"


def test_every_endpoint_down(fast_retry: RetryPolicy) -> None:
    with Client([closed_port(), closed_port()], retry=fast_retry) as c, pytest.raises(APIConnectionError):
        c.chat("hi")


async def test_async_429_then_stream(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(429, headers={"Retry-After": "0.2"}))
    async with AsyncClient(stub.url, retry=fast_retry, model="stub") as c:
        stream = c.chat_stream("hi", max_tokens=3)
        texts = [chunk.text async for chunk in stream]
    r = stream.result
    assert texts == ["hel", "lo", "!"] and r.text == "hello!"
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert r.metrics.retries == 1 and r.metrics.chunks == 3 and r.metrics.ttft_s is not None
    assert gaps(stub)[0] >= 0.19
    assert stub.seen[1].body["stream_options"] == {"include_usage": True}
    assert stub.seen[1].body["model"] == "stub"


async def test_async_no_retry_on_400_and_rate_limit_gives_up(stub: Stub, fast_retry: RetryPolicy) -> None:
    stub.then(
        Reply(400, error_body("bad", "invalid_request_error")),
        *[Reply(429, error_body("slow", "rate_limit_error"))] * 3,
    )
    async with AsyncClient(stub.url, retry=fast_retry) as c:
        with pytest.raises(BadRequestError):
            await c.chat("hi")
        assert len(stub.seen) == 1
        with pytest.raises(RateLimitError):
            await c.chat("hi")
    assert len(stub.seen) == 4


async def test_async_batch_keeps_errors_and_aggregates(stub: Stub) -> None:
    stub.then(Reply(400, error_body("bad", "invalid_request_error")))
    async with AsyncClient(stub.url, max_retries=0) as c:
        batch = await c.batch_chat([f"q{i}" for i in range(6)], concurrency=3)
    assert sum(isinstance(r, BadRequestError) for r in batch.results) == 1
    m = batch.metrics
    assert (m.items, m.errors, m.completion_tokens) == (6, 1, 10)
    assert m.items_per_s > 0 and m.avg_item_s > 0


def test_sync_batch_streams(stub: Stub) -> None:
    with Client(stub.url) as c:
        batch = c.batch_chat(["a", "b", "c"], concurrency=2, stream=True)
    assert all(isinstance(r, Result) and r.text == "hello!" for r in batch.results)
    assert batch.metrics.completion_tokens == 9 and batch.metrics.ttft_p50_s is not None


# ---- the async client on both HTTP backends --------------------------------------------------


@pytest.fixture(params=["httpx", "aiohttp"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """httpx's own transport, or aiohttp's through httpx-aiohttp."""
    value: Backend = request.param
    return value


async def test_backend_retries_drops_and_503(stub: Stub, backend: Backend, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(drop=True), Reply(503, OVERLOADED, {"Retry-After": "0.1"}))
    async with AsyncClient(stub.url, retry=fast_retry, backend=backend) as c:
        r = await c.chat("hi")
    assert r.metrics.retries == 2 and len(stub.seen) == 3 and gaps(stub)[1] >= 0.09


async def test_backend_mid_stream_break(stub: Stub, backend: Backend, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(events=chat_events(["a", "b", "c"]), drop_after=1))
    async with AsyncClient(stub.url, retry=fast_retry, backend=backend) as c:
        with pytest.raises(StreamInterruptedError) as info:
            await c.chat_stream("hi").collect()
    assert info.value.text == "a" and len(stub.seen) == 1


async def test_backend_timeout_and_400(stub: Stub, backend: Backend, fast_retry: RetryPolicy) -> None:
    stub.then(Reply(delay=1.0), Reply(400, error_body("bad", "invalid_request_error")))
    async with AsyncClient(stub.url, retry=fast_retry, timeout=0.2, max_retries=0, backend=backend) as c:
        with pytest.raises(APITimeoutError):
            await c.chat("hi")
        with pytest.raises(BadRequestError):
            await c.chat("hi")


async def test_backend_failover(stub: Stub, backend: Backend, fast_retry: RetryPolicy) -> None:
    async with AsyncClient(
        [closed_port(), stub.url], strategy="failover", retry=fast_retry, backend=backend
    ) as c:
        r = await c.chat("hi")
    assert r.metrics.endpoint == stub.url and r.metrics.retries == 1
