"""Scrape targets and adapters, and the isolation of every pod's scrape.

The isolation tests put real servers (devtools/hostile.py) at loopback addresses: one pod
misbehaves beside a healthy one in the same round, and the round must still come back on time
with the healthy pod read and the bad one unhealthy for a short reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from devtools.hostile import PodServers, drip, huge, metrics_page, models_body, pod, send
from vllm_operator import scrape
from vllm_operator.lora import AdapterCall
from vllm_operator.scrape import (
    MAX_PAGE_BYTES,
    MAX_REASON,
    Scraper,
    Target,
    clip,
    listed_adapters,
    pod_url,
    redact,
    targets_of,
)
from vllm_operator.throughput import MAX_SERIES, MetricsError, PodSample, parse_metrics
from vllm_operator_client._core import auth_headers
from vllm_operator_client.probe import Probe, ProbeError

MB = 1_000_000
MiB = 1 << 20


def pod_object(name: str, ip: str = "", ready: bool = False, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": meta, "status": {"podIP": ip, "conditions": conditions}}


def test_targets_of() -> None:
    pods = [
        pod_object("a", "10.0.0.1", True),
        pod_object("b", "10.0.0.2"),
        pod_object("c"),
        pod_object("d", "10.0.0.4", True, deleting=True),
    ]
    assert targets_of(pods, "m") == [
        Target("a", "10.0.0.1", True, "m"),
        Target("b", "10.0.0.2", False, "m"),
        Target("c", "", False, "m"),
    ]


def test_adapters_from_vllm_models() -> None:
    body = {
        "data": [
            {"id": "llama", "root": "/models/llama", "parent": None},
            {"id": "sql", "root": "/lora/sql", "parent": "llama"},
            {"id": "chat", "root": "/lora/chat", "parent": "llama"},
        ]
    }
    assert tuple(sorted(listed_adapters(body, "llama"))) == ("chat", "sql")
    assert tuple(sorted(listed_adapters({"data": [{"id": "llama"}, {"id": "x"}]}, "llama"))) == ("x",)


KEY = "sk-test-0123"


def keyed_server(request: httpx.Request) -> httpx.Response:
    """A server started with --api-key: /health and /metrics are open, /v1 wants the key."""
    if request.url.path == "/health":
        return httpx.Response(200)
    if request.url.path == "/metrics":
        return httpx.Response(200, text="vllm:num_requests_running 1\n")
    if request.headers.get("authorization") != f"Bearer {KEY}":
        # Some servers echo what they refused: the key must not reach a condition from here.
        wrong = request.headers.get("authorization", "")
        return httpx.Response(401, json={"error": {"message": f"Invalid or missing API key. {wrong}"}})
    data = [
        {"id": "m"},
        {"id": "sql", "parent": "m", "root": "/lora/sql"},
        {"id": "x", "parent": "m", "root": 7},
    ]
    return httpx.Response(200, json={"data": data})


@pytest.mark.parametrize(
    ("token", "adapters", "models_error"),
    [
        (KEY, ("sql", "x"), ""),
        ("", (), "/v1/models answered 401: Invalid or missing API key."),
        ("wrong", (), "/v1/models answered 401: Invalid or missing API key. Bearer ***"),
    ],
)
async def test_models_are_read_with_the_token(
    token: str, adapters: tuple[str, ...], models_error: str
) -> None:
    target = Target("a", "10.0.0.1", True, "m", lora=True, token=token)
    async with Probe(2.0, transport=httpx.MockTransport(keyed_server)) as probe:
        sample = await Scraper().scrape_pod(probe, target)
    assert (sample.healthy, sample.adapters, sample.models_error) == (True, adapters, models_error)
    assert sample.running == 1.0
    # Only string roots are kept: the "adapter replaced behind our back" check compares them.
    assert sample.adapter_roots == ({"sql": "/lora/sql"} if token == KEY else {})


def test_the_token_never_shows_in_a_repr() -> None:
    assert KEY not in repr(Target("a", "10.0.0.1", True, "m", lora=True, token=KEY))
    assert auth_headers(KEY) == {"Authorization": f"Bearer {KEY}"} and auth_headers("") == {}


def test_targets_know_what_each_pod_downloaded() -> None:
    with_init = pod_object("a", "10.0.0.1", True)
    with_init["spec"] = {
        "initContainers": [{"name": "fetch-lora-x", "args": ["s3://b/x", "/cache/sources/lora-x"]}]
    }
    assert targets_of([with_init], "m", lora=True)[0].fetched == {"/cache/sources/lora-x"}
    assert targets_of([with_init], "m")[0].fetched == frozenset()


# ---- one round, one bad pod beside a healthy one ---------------------------------------------


@pytest.fixture
def servers() -> Iterator[PodServers]:
    with PodServers() as running:
        yield running


def place(
    servers: PodServers, behaviours: Mapping[str, Any], refused: tuple[str, ...] = ()
) -> tuple[int, dict[str, Target]]:
    """Pods named like the keys, each at its own 127.9.0.x address on one shared port.

    Pods in `refused` get an address where nothing listens. Every pod lists adapters.
    """
    port = servers.serve("127.9.0.1", 0, pod(models=models_body("sql")))
    targets = {"healthy": Target("healthy", "127.9.0.1", True, "tiny", lora=True)}
    for index, name in enumerate([*behaviours, *refused], start=2):
        ip = f"127.9.0.{index}"
        if name in behaviours:
            servers.serve(ip, port, behaviours[name])
        targets[name] = Target(name, ip, True, "tiny", lora=True)
    return port, targets


async def one_round(
    scraper: Scraper, targets: Mapping[str, Target], limit: float = 15
) -> tuple[dict[str, PodSample], float]:
    """Each pod as its own model in one scrape_all round; the samples by pod, and the round's time.

    `limit` stops a round that would hang (the old code did, with a dripping pod).
    """
    started = time.monotonic()
    async with asyncio.timeout(limit):
        round_ = await scraper.scrape_all({name: [t] for name, t in targets.items()})
    return {name: samples[0] for name, samples in round_.items()}, time.monotonic() - started


def failures() -> float:
    return REGISTRY.get_sample_value("vllm_operator_scrape_failures_total") or 0.0


def assert_isolated(samples: Mapping[str, PodSample], bad: str, reason: str) -> None:
    """The healthy pod read in full, the bad one unhealthy with `reason` in a short message."""
    healthy = samples["healthy"]
    assert (healthy.healthy, healthy.running, healthy.adapters, healthy.error) == (True, 1.0, ("sql",), "")
    assert healthy.adapter_roots == {"sql": "/lora/sql"}
    sample = samples[bad]
    assert sample.ready and not sample.healthy, sample
    assert reason in sample.error, sample.error
    assert len(sample.error) <= MAX_REASON and sample.error.isprintable()


@pytest.mark.parametrize(
    ("page", "reason"),
    [
        (metrics_page(running="NaN"), "vllm:num_requests_running is nan"),
        (metrics_page(running="+Inf"), "vllm:num_requests_running is inf"),
        (metrics_page(running="-1"), "vllm:num_requests_running is -1"),
        (metrics_page(generated="-Inf"), "vllm:generation_tokens_total is -inf"),
        (metrics_page(generated="1e300"), "vllm:generation_tokens_total is 1e+300"),
        (metrics_page(kv="1.5"), "vllm:kv_cache_usage_perc is 1.5, outside [0, 1]"),
        (metrics_page(running='1 "' + "x" * 5000), "/metrics:"),  # unparsable: clipped
        ('vllm:num_requests_running{a="1"} 1\n' * (MAX_SERIES + 1), f"over the {MAX_SERIES} allowed"),
    ],
    ids=["NaN", "+Inf", "-1", "-Inf counter", "1e300 counter", "kv 1.5", "garbage", "too many series"],
)
async def test_a_page_with_values_out_of_range_fails_its_pod_only(
    servers: PodServers, page: str, reason: str
) -> None:
    port, targets = place(servers, {"bad": pod(page, models_body("sql"))})
    before = failures()
    samples, seconds = await one_round(Scraper(port=port), targets)
    assert_isolated(samples, "bad", reason)
    assert failures() == before + 1
    assert seconds < 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"data": [{"id": "tiny"}, {"id": 7, "parent": "tiny"}]}', "/v1/models: entry 1 has no string id"),
        (b'{"data": [1, "x"]}', "/v1/models: entry 0 has no string id"),
        (b'{"data": [{"id": null}]}', "/v1/models: entry 0 has no string id"),
        (b'{"data": [{"object": "model"}]}', "/v1/models: entry 0 has no string id"),
        (b'{"data": "tiny"}', "/v1/models: no list under 'data'"),
        (b"[1, 2]", "/v1/models: no list under 'data'"),
        (b"<html>not json", "/v1/models: not a JSON body"),
        (b"[" * 100_000, "/v1/models: not a JSON body"),  # deeper than the decoder's recursion
    ],
    ids=[
        "int id",
        "entries not objects",
        "null id",
        "no id",
        "data not a list",
        "not an object",
        "html",
        "deep",
    ],
)
async def test_a_models_listing_of_the_wrong_shape_fails_its_pod_only(
    servers: PodServers, body: bytes, reason: str
) -> None:
    port, targets = place(servers, {"bad": pod(models=body)})
    samples, seconds = await one_round(Scraper(port=port), targets)
    assert_isolated(samples, "bad", reason)
    assert seconds < 2


async def test_a_dripping_pod_is_cut_at_the_deadline_and_the_round_ends_on_time(
    servers: PodServers,
) -> None:
    # One byte every 1.5 s: each read comes within httpx's 2 s timeout, forever.
    port, targets = place(servers, {"drip": pod(slow=drip(every=1.5, limit=60))})
    samples, seconds = await one_round(Scraper(port=port, timeout=2.0), targets)
    print(f"round with a pod dripping one byte per 1.5 s: {seconds:.2f}s (deadline 2 s per pod)")
    assert_isolated(samples, "drip", "/metrics not read within the 2s deadline")
    assert 2.0 <= seconds < 3.5


async def test_a_dripping_health_check_is_named(servers: PodServers) -> None:
    port, targets = place(servers, {"drip": pod(slow=drip(every=0.3, limit=10), slow_path="/health")})
    samples, _ = await one_round(Scraper(port=port, timeout=1.0), targets)
    assert_isolated(samples, "drip", "/health not read within the 1s deadline")


async def test_a_huge_page_is_refused_at_the_cap_without_holding_it(servers: PodServers) -> None:
    port, targets = place(
        servers,
        {"huge": pod(slow=huge(50 * MB)), "declared": pod(slow=huge(50 * MB, declare_length=True))},
    )
    tracemalloc.start()
    try:
        samples, seconds = await one_round(Scraper(port=port), targets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"two 50 MB pages: round {seconds:.2f}s, peak traced memory {peak / MiB:.1f} MiB")
    assert_isolated(samples, "huge", f"/metrics is over the {MAX_PAGE_BYTES}-byte cap")
    assert_isolated(samples, "declared", f"/metrics is 50000000 bytes, over the {MAX_PAGE_BYTES}-byte cap")
    # The old code held each page whole, decoded and split: hundreds of MiB.
    assert peak < 4 * MAX_PAGE_BYTES


async def test_a_compressed_page_is_refused_before_it_is_inflated() -> None:
    def gzipped(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept-encoding"] == "identity"
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"\x1f\x8b")

    async with Probe(2.0, transport=httpx.MockTransport(gzipped)) as probe:
        sample = await Scraper().scrape_pod(probe, Target("a", "10.0.0.1", True, "m"))
    assert sample.error == "/metrics came gzip-encoded, though asked for identity"


async def test_one_round_with_every_kind_of_bad_pod_reads_the_healthy_one_on_time(
    servers: PodServers,
) -> None:
    bad = {
        "nan": pod(metrics_page(running="NaN")),
        "inf": pod(metrics_page(running="+Inf")),
        "ids": pod(models=b'{"data": [1, "x"]}'),
        "drip": pod(slow=drip(every=0.6, limit=60)),  # within the 1 s per read, forever
        "huge": pod(slow=huge(50 * MB)),
    }
    port, targets = place(servers, bad, refused=("refused",))
    samples, seconds = await one_round(Scraper(port=port, timeout=1.0), targets)
    reasons = {name: s.error for name, s in samples.items() if not s.healthy}
    assert reasons == {
        "nan": "/metrics: vllm:num_requests_running is nan, outside [0, 2147483648]",
        "inf": "/metrics: vllm:num_requests_running is inf, outside [0, 2147483648]",
        "ids": "/v1/models: entry 0 has no string id",
        "drip": "/metrics not read within the 1s deadline",
        "huge": f"/metrics is over the {MAX_PAGE_BYTES}-byte cap",
        "refused": "connection refused",
    }
    assert_isolated(samples, "refused", "connection refused")
    assert 1.0 <= seconds < 2.5


async def test_an_error_of_ours_is_logged_with_the_pod_and_fails_that_pod_only(
    servers: PodServers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    real = parse_metrics

    def flaky(text: str) -> tuple[dict[str, float], float, float, float]:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first pod read: whichever it is, it alone fails
            raise KeyError("a bug")
        return real(text)

    monkeypatch.setattr(scrape, "parse_metrics", flaky)
    port = servers.serve("127.9.0.1", 0, pod())
    servers.serve("127.9.0.2", port, pod())
    targets = {name: Target(name, f"127.9.0.{i}", True, "tiny") for i, name in enumerate(("a", "b"), 1)}
    before = failures()
    with caplog.at_level(logging.ERROR, logger="vllm_operator.scrape"):
        samples, _ = await one_round(Scraper(port=port), targets)
    bad = [s for s in samples.values() if not s.healthy]
    assert len(bad) == 1 and [s.healthy for s in samples.values()].count(True) == 1
    assert bad[0].error == "operator error while reading /metrics (KeyError, see its log)"
    assert f"scraping pod {bad[0].name} failed" in caplog.text and "a bug" in caplog.text
    assert failures() == before + 1


# ---- addresses ------------------------------------------------------------------------------


def test_pod_urls_put_ipv6_addresses_in_brackets() -> None:
    assert pod_url("fd00::1", 8000) == "http://[fd00::1]:8000"
    assert pod_url("10.0.0.1", 8000) == "http://10.0.0.1:8000"
    with pytest.raises(ProbeError, match="pod IP 'fd00::1:8000:x' is not an IP address"):
        pod_url("fd00::1:8000:x", 8000)


async def test_an_ipv6_pod_is_scraped_at_its_bracketed_address() -> None:
    seen: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text=metrics_page() if request.url.path == "/metrics" else "")

    async with Probe(2.0, transport=httpx.MockTransport(server)) as probe:
        sample = await Scraper().scrape_pod(probe, Target("a", "fd00::1", True, "m"))
    assert sample.healthy, sample.error
    assert seen == ["http://[fd00::1]:8000/health", "http://[fd00::1]:8000/metrics"]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_a_real_scrape_over_ipv6_loopback(servers: PodServers) -> None:
    port = servers.serve("::1", 0, pod(models=models_body("sql")))
    samples, _ = await one_round(Scraper(port=port), {"six": Target("six", "::1", True, "tiny", lora=True)})
    assert (samples["six"].healthy, samples["six"].running, samples["six"].adapters) == (True, 1.0, ("sql",))


# ---- reasons --------------------------------------------------------------------------------


def test_reasons_are_short_printable_and_never_hold_the_key() -> None:
    assert clip("a\nb\x1b[31m  c") == "a b [31m c"
    long = clip("x" * 10_000)
    assert len(long) == MAX_REASON and long.endswith("...")
    # Redacted before clipped: clipping first would leave the first half of a key at the cut.
    key = "sk-" + "k" * 40
    text = redact("y" * (MAX_REASON - 20) + key, key)
    assert "sk-" not in text and len(text) <= MAX_REASON


def test_parse_metrics_checks_every_value() -> None:
    assert parse_metrics(metrics_page()) == (
        {
            "vllm:generation_tokens_total": 100.0,
            "vllm:prompt_tokens_total": 50.0,
            "vllm:request_success_total": 3.0,
        },
        1.0,
        0.0,
        0.25,
    )
    with pytest.raises(MetricsError, match="vllm:num_requests_waiting is nan"):
        parse_metrics('vllm:num_requests_waiting{engine="1"} NaN\n')
    with pytest.raises(MetricsError, match=r"vllm:gpu_cache_usage_perc is -0\.5"):
        parse_metrics("vllm:gpu_cache_usage_perc -0.5\n")


async def test_adapter_calls_get_the_same_isolation(servers: PodServers) -> None:
    async def echo_key(path: str, writer: Any) -> None:
        await send(writer, f'{{"error": {{"message": "bad adapter; your key was {KEY}"}}}}'.encode(), 400)

    port = servers.serve("127.9.0.1", 0, echo_key)
    servers.serve("127.9.0.2", port, huge(50 * MB))
    calls = [AdapterCall(p, "load", "sql", "/lora/sql") for p in ("echo", "huge", "refused", "no-ip")]
    ips = {"echo": "127.9.0.1", "huge": "127.9.0.2", "refused": "127.9.0.3"}
    errors = await Scraper(port=port).call_adapters(calls, ips, KEY)
    assert errors == [
        "load answered 400: bad adapter; your key was ***",
        f"/v1/load_lora_adapter is over the {MAX_PAGE_BYTES}-byte cap",
        "connection refused",
        "pod IP '' is not an IP address",
    ]
