"""Pure pieces: retry delays, Retry-After parsing, SSE decoding, percentiles, endpoint order."""

from __future__ import annotations

import email.utils

import pytest

from vllm_operator.model_ref import parse_ref, target_of
from vllm_operator_client import EndpointPool, RetryPolicy
from vllm_operator_client._core import SSEDecoder
from vllm_operator_client.errors import BadRequestError, InternalServerError, status_error
from vllm_operator_client.metrics import percentile
from vllm_operator_client.retry import parse_retry_after, retryable_status


def test_backoff_is_exponential_capped_and_jittered_down() -> None:
    top = RetryPolicy(initial_delay=0.5, max_delay=8.0, jitter=0.25, rand=lambda: 0.0)
    low = RetryPolicy(initial_delay=0.5, max_delay=8.0, jitter=0.25, rand=lambda: 1.0)
    assert [top.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert [low.delay(n) for n in range(3)] == [0.375, 0.75, 1.5]


def test_retry_after_wins_unless_absurd() -> None:
    p = RetryPolicy(max_retry_after=60.0, rand=lambda: 0.0)
    assert p.delay(0, 3.0) == 3.0
    assert p.delay(0, 3600.0) == 0.5


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert parse_retry_after(headers) == seconds


def test_parse_retry_after_http_date() -> None:
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=1_000_000) == pytest.approx(30.0)


def test_retryable_statuses() -> None:
    assert [s for s in (400, 401, 404, 408, 409, 422, 429, 500, 502, 503) if retryable_status(s)] == [
        408,
        409,
        429,
        500,
        502,
        503,
    ]


def test_status_error_classes_and_fields() -> None:
    e = status_error(400, {"error": {"message": "m", "type": "t", "param": "p", "code": "c"}})
    assert isinstance(e, BadRequestError) and (e.message, e.type, e.param, e.code) == ("m", "t", "p", "c")
    e2 = status_error(504, "gateway timeout")
    assert isinstance(e2, InternalServerError) and e2.message == "gateway timeout"


def test_sse_decoder() -> None:
    d = SSEDecoder()
    lines = [": comment", "event: x", 'data: {"a":', "data: 1}", "", "", "data:[DONE]", ""]
    assert [x for x in map(d.line, lines) if x is not None] == ['{"a":\n1}', "[DONE]"]


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)


def test_endpoint_order() -> None:
    now = [0.0]
    rr = EndpointPool(["http://a/v1/", "http://b"], "round_robin", cooldown=5, clock=lambda: now[0])
    assert rr.order() == ["http://a", "http://b"]
    assert rr.order() == ["http://b", "http://a"]
    fo = EndpointPool(["http://a", "http://b"], "failover", cooldown=5, clock=lambda: now[0])
    fo.failed("http://a")
    assert fo.order() == ["http://b", "http://a"]
    now[0] = 6.0
    assert fo.order() == ["http://a", "http://b"]


def test_model_ref() -> None:
    assert parse_ref("team/llama") == ("team", "llama")
    assert parse_ref("llama") == ("default", "llama")
    obj = {
        "metadata": {"name": "llama", "namespace": "team"},
        "spec": {},
        "status": {"endpoint": "http://llama.team.svc:8000/v1"},
    }
    assert target_of(obj) == ("http://llama.team.svc:8000/v1", "llama")
    obj["spec"] = {"servedModelName": "llama-8b"}
    assert target_of(obj)[1] == "llama-8b"
    with pytest.raises(ValueError, match=r"no status\.endpoint"):
        target_of({"metadata": {"name": "x"}, "status": {"phase": "Pending"}})
