"""The client and `vllm-operator bench` against the real server on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools.realserver import RealServer
from tests.client.conftest import API_KEY
from vllm_operator.cli import main
from vllm_operator_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    NotFoundError,
    Result,
)

pytestmark = pytest.mark.engine


@pytest.fixture
def client(client_server: RealServer) -> Client:
    """A sync client on the real server."""
    return Client(client_server.url + "/v1", api_key=API_KEY, model="tiny")


def test_chat_and_completion(client: Client) -> None:
    r = client.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
    )
    assert r.model == "tiny" and r.usage is not None
    assert r.usage.completion_tokens == r.metrics.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.metrics.total_s > 0 and r.metrics.tokens_per_s > 0
    c = client.completion("The quick brown fox", max_tokens=5, ignore_eos=True)
    assert c.usage is not None and c.usage.completion_tokens == 5 and c.text


def test_chat_stream_arrives_chunk_by_chunk(client: Client) -> None:
    stream = client.chat_stream("Count to ten.", max_tokens=24, ignore_eos=True)
    texts = [chunk.text for chunk in stream if chunk.text]
    r = stream.result
    m = r.metrics
    assert len(texts) == m.chunks == 24  # the tiny tokenizer is ASCII: one event per token
    assert r.usage is not None and r.usage.completion_tokens == 24
    assert m.ttft_s is not None and m.ttft_s < m.total_s / 2
    assert len(m.chunk_gaps_s) == 23 and m.inter_token_s is not None
    assert r.text == "".join(texts) and r.finish_reason == "length"


def test_stream_equals_non_stream_at_temperature_zero(client: Client) -> None:
    a = client.chat("Same answer twice?", max_tokens=16, temperature=0)
    b = client.completion_stream("ignored", max_tokens=4).collect()
    assert b.usage is not None and b.usage.completion_tokens <= 4
    s = client.chat_stream("Same answer twice?", max_tokens=16, temperature=0).collect()
    assert s.text == a.text and s.usage == a.usage


def test_server_endpoints_and_lora(client: Client, lora_path: Path) -> None:
    assert "tiny" in [m["id"] for m in client.models()]
    info = client.info()
    assert info["served_model_name"] == "tiny" and "preloaded" in info["lora_adapters"]
    assert {"requests_processed", "tokens_generated"} <= client.stats().keys()
    client.load_lora_adapter("extra", str(lora_path))
    assert "extra" in [a["name"] for a in client.lora_adapters()]
    assert client.chat("hi", model="extra", max_tokens=4).model == "extra"
    client.unload_lora_adapter("extra")
    assert "extra" not in [a["name"] for a in client.lora_adapters()]


def test_errors_carry_the_openai_body(client_server: RealServer, client: Client) -> None:
    with pytest.raises(NotFoundError) as nf:
        client.chat("hi", model="nope", max_tokens=2)
    assert (nf.value.status, nf.value.code, nf.value.param) == (404, "model_not_found", "model")
    with pytest.raises(BadRequestError) as bad:
        client.chat("hi", max_tokens=10**6)
    assert (bad.value.code, bad.value.param) == ("context_length_exceeded", "max_tokens")
    with Client(client_server.url, api_key="wrong") as c, pytest.raises(AuthenticationError) as au:
        c.models()
    assert au.value.status == 401 and au.value.type == "authentication_error"


async def test_async_stream_and_batch(client_server: RealServer) -> None:
    async with AsyncClient(client_server.url, api_key=API_KEY, model="tiny") as c:
        stream = c.chat_stream("Hello", max_tokens=8, ignore_eos=True)
        n = 0
        async for chunk in stream:
            n += bool(chunk.text)
        assert n == 8 and stream.result.metrics.completion_tokens == 8
        batch = await c.batch_chat(
            [f"Prompt {i}" for i in range(12)], concurrency=4, stream=True, max_tokens=16, ignore_eos=True
        )
    assert all(isinstance(r, Result) for r in batch.results)
    m = batch.metrics
    assert (m.items, m.errors, m.completion_tokens) == (12, 0, 12 * 16)
    assert m.output_tokens_per_s == pytest.approx(m.completion_tokens / m.total_s)
    assert 0 < m.avg_item_s < m.total_s and m.ttft_p50_s is not None


def test_sync_batch(client: Client) -> None:
    batch = client.batch_chat(["a", "b", "c", "d"], concurrency=2, max_tokens=4)
    assert batch.metrics.items == 4 and batch.metrics.errors == 0
    assert batch.metrics.items_per_s > 0


def test_bench_check_passes(client_server: RealServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "check", "--base-url", client_server.url, "--api-key", API_KEY])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "11 passed, 0 failed" in out and "FAIL" not in out


def test_bench_check_fails_on_impossible_limits(
    client_server: RealServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["bench", "check", "--base-url", client_server.url, "--api-key", API_KEY, "--max-ttft-ms", "0.001"]
    )
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  TTFT" in out


def bench_load(server: RealServer, *args: str) -> int:
    """`vllm-operator bench load` against the server with the key, JSON summary last, no progress."""
    return main(
        ["bench", "load", "--base-url", server.url, "--api-key", API_KEY, *args, "--json", "--no-progress"]
    )


def test_bench_load_matches_server_stats(
    client_server: RealServer, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    before = client.stats()
    code = bench_load(
        client_server,
        "--model",
        "tiny",
        "--requests",
        "96",
        "--concurrency",
        "32",
        "--max-tokens",
        "32",
        "--ignore-eos",
    )
    after = client.stats()
    out = capsys.readouterr().out
    assert code == 0, out
    s = json.loads(out.strip().splitlines()[-1])
    assert (s["requests"], s["completed"], s["errors"]) == (96, 96, 0)
    assert after["requests_processed"] - before["requests_processed"] == 96
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert generated == s["output_tokens"] == 96 * 32
    assert after["prompt_tokens"] - before["prompt_tokens"] == s["prompt_tokens"]
    # The server's own clock: its uptime advanced over the run plus the bench's setup and two
    # stats calls, so its rate is a lower bound of the true one; that overhead is a few percent
    # on a quiet machine and more on a loaded one, hence the loose upper bound.
    server_rate = generated / (after["uptime_seconds"] - before["uptime_seconds"])
    assert server_rate * 0.99 <= s["output_tokens_per_s"] <= server_rate * 1.25, (s, server_rate)
    assert s["ttft_p50_ms"] <= s["ttft_p90_ms"] <= s["ttft_p99_ms"]
    assert s["itl_p50_ms"] is not None and s["e2e_p50_ms"] > s["ttft_p50_ms"]


def test_bench_load_rate_mode_and_plot_needs_matplotlib(
    client_server: RealServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = bench_load(client_server, "--requests", "10", "--rate", "20", "--max-tokens", "8", "--no-stream")
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and s["completed"] == 10 and s["ttft_p50_ms"] is None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install matplotlib"):
            main(["bench", "load", "--base-url", client_server.url, "--plot", str(tmp_path / "x.png")])
