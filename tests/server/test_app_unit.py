"""Unit tests of the HTTP app on a fake engine (no vLLM needed)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.asgi import post_scope
from tests.server.conftest import RUNTIME_LORA, fake_settings
from tests.server.fake_engine import FakeEngine
from vllm_server.app import create_app
from vllm_server.protocol import ChatCompletionChunk, CompletionChunk

CHAT = "/v1/chat/completions"
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


async def chat(client: httpx.AsyncClient, params: dict[str, object]) -> httpx.Response:
    """POST a chat of MSGS to the model "tiny" with `params` in the body."""
    return await client.post(CHAT, json={"model": "tiny", "messages": MSGS, **params})


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body."""
    return [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]


async def test_chat_non_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await chat(client, {"max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 w2 "}
    assert body["choices"][0]["finish_reason"] == "length"
    # Fake template: "<system> be brief <user> hi there <assistant>" -> 7 words.
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


async def test_chat_sampling_params_reach_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await chat(
        client,
        {
            "max_tokens": 5,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "seed": 3,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "n": 2,
            "stop": ["w3"],
            "min_tokens": 1,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    p = engine.last_params
    assert p is not None
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.n) == (0.5, 0.9, 7, 3, 2)
    assert (p.presence_penalty, p.frequency_penalty, p.stop) == (0.1, 0.2, ("w3",))
    assert p.min_tokens == 1 and p.ignore_eos
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["content"] == "w0 w1 w2 " for c in choices)
    assert all(c["finish_reason"] == "stop" for c in choices)


async def test_max_tokens_defaults_to_remaining_context(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post(CHAT, json={"messages": MSGS})
    assert r.status_code == 200
    assert engine.last_params is not None and engine.last_params.max_tokens == 128 - 7


async def test_chat_streaming_chunks(client: httpx.AsyncClient) -> None:
    r = await chat(client, {"max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    content = [c for c in chunks if c.choices]
    assert len(content) == 4  # one event per token
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == "w0 w1 w2 w3 "
    assert content[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 4
    # Every event is valid JSON on its own (the hot path builds it by hand).
    for e in events[:-1]:
        json.loads(e)


async def test_streaming_escapes_text(engine: FakeEngine) -> None:
    from vllm_server.serving import Serving

    s = Serving(fake_settings())
    s.attach(engine)
    orig = engine.generate

    async def weird(*a, **k):  # type: ignore[no-untyped-def]
        async for out in orig(*a, **k):
            for d in out.deltas:
                d.text = 'quote " backslash \\ newline \n unicode é ✓'
            yield out

    engine.generate = weird  # type: ignore[method-assign]
    from vllm_server.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(messages=MSGS, max_tokens=2, stream=True)
    events = [e async for e in await s.chat_stream(request)]
    chunk = ChatCompletionChunk.model_validate_json(events[0][6:])
    assert chunk.choices[0].delta.content == 'quote " backslash \\ newline \n unicode é ✓'


async def test_completions(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "w0 w1 "
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    r = await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == 3


async def test_completions_streaming(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [CompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert "".join(c.choices[0].text for c in chunks) == "w0 w1 w2 "
    assert all(c.usage is None for c in chunks)  # no include_usage


async def test_logprobs(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json={"messages": MSGS, "max_tokens": 2, "logprobs": True, "top_logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]["content"]
    assert len(lp) == 2 and lp[0]["logprob"] == -0.5 and len(lp[0]["top_logprobs"]) == 2
    r = await client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.5, -0.5] and lp["text_offset"] == [0, 3]


async def test_models_and_info(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.loras["sql"] = "/a/sql"
    r = await client.get("/v1/models")
    ids = [(m["id"], m.get("parent"), m["max_model_len"]) for m in r.json()["data"]]
    assert ids == [("tiny", None, 128), ("sql", "tiny", 128)]
    info = (await client.get("/v1/info")).json()
    assert info["model"] == "/models/tiny" and info["max_model_len"] == 128
    assert info["gpus"] == 1 and info["dtype"] == "float32" and info["lora_adapters"] == ["sql"]


async def test_health_503_until_engine() -> None:
    import asyncio

    engine = FakeEngine()
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def factory(_settings):  # type: ignore[no-untyped-def]
        # Runs in a thread: wait until the test lets the "load" finish.
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(10)
        return engine

    app = create_app(fake_settings(), engine_factory=factory)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as c,
    ):
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        r = await c.post(CHAT, json={"messages": MSGS})
        assert r.status_code == 503
        gate.set()
        for _ in range(100):
            if (await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await c.get("/health")).status_code == 200
        engine.healthy = False
        assert (await c.get("/health")).status_code == 503
    assert engine.shut_down  # the app built it, so the app shuts it down


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MSGS, "temperature": 5}, "temperature"),
        ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
        ({"messages": MSGS, "n": 0}, "n"),
        ({"messages": MSGS, "top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({}, "messages"),
        ({"messages": MSGS, "max_tokens": 1000}, "max_tokens"),
        ({"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MSGS, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_invalid_params_are_400_naming_param(
    client: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    r = await client.post(CHAT, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert set(err) == {"message", "type", "param", "code"}


async def test_prompt_too_long_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x " * 200, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_engine_refusal_is_400(client: httpx.AsyncClient) -> None:
    # The fake engine refuses temperature > 1.5 like vLLM refuses bad SamplingParams.
    for stream in (False, True):
        r = await client.post(CHAT, json={"messages": MSGS, "temperature": 1.8, "stream": stream})
        assert r.status_code == 400, r.text
        assert "temperature" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "temperature"


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, json={"model": "nope", "messages": MSGS})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model `nope` does not exist.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


async def test_unknown_route_has_openai_shape(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


async def test_lora_lifecycle(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a/sql"})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a/sql"})
    assert r.status_code == 400
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/bad"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert [a["name"] for a in (await client.get("/v1/lora_adapters")).json()] == ["sql"]
    r = await client.post(CHAT, json={"model": "sql", "messages": MSGS, "max_tokens": 2})
    assert r.json()["choices"][0]["message"]["content"] == "sql0 sql1 "
    assert r.json()["model"] == "sql" and engine.last_lora == "sql"
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert r.status_code == 200
    r = await client.post(CHAT, json={"model": "sql", "messages": MSGS})
    assert r.status_code == 404
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert r.status_code == 404


async def test_lora_disabled() -> None:
    from vllm_server.settings import parse_settings

    app = create_app(parse_settings(["--model", "m"], env=RUNTIME_LORA), engine=FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/p"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "lora_disabled"


async def test_api_key() -> None:
    app = create_app(fake_settings("--api-key", "sekret"), engine=FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = await c.post(CHAT, json={"messages": MSGS}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (await c.get("/v1/models")).status_code == 401
        ok = {"Authorization": "Bearer sekret"}
        assert (await c.post(CHAT, json={"messages": MSGS}, headers=ok)).status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_queue_full_is_503_with_retry_after() -> None:
    from vllm_server.protocol import ChatCompletionRequest

    engine = FakeEngine(max_num_seqs=2, delay=0.01)
    app = create_app(fake_settings("--max-queued-requests", "1"), engine=engine)
    serving = app.state.serving
    request = ChatCompletionRequest(messages=MSGS, max_tokens=50, stream=True)
    streams = [await serving.chat_stream(request) for _ in range(3)]
    assert serving.inflight == 3
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post(CHAT, json={"messages": MSGS, "max_tokens": 1})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        for s in streams:
            await s.aclose()
        assert serving.inflight == 0
        assert (await c.post(CHAT, json={"messages": MSGS, "max_tokens": 1})).status_code == 200


async def test_closing_a_stream_aborts_the_engine_request(engine: FakeEngine) -> None:
    from vllm_server.protocol import CompletionRequest
    from vllm_server.serving import Serving

    s = Serving(fake_settings())
    s.attach(engine)
    events = await s.completion_stream(CompletionRequest(prompt="a", max_tokens=100, stream=True))
    got = [await anext(events) for _ in range(3)]
    assert len(got) == 3
    await events.aclose()
    (rid,) = engine.produced
    assert rid in engine.aborted and rid in engine.closed
    assert engine.produced[rid] < 10
    assert s.inflight == 0 and s.stats.in_flight == 0


async def test_stats_and_metrics_move(client: httpx.AsyncClient) -> None:
    before = (await client.get("/v1/stats")).json()
    assert before["requests_processed"] == 0
    await client.post(CHAT, json={"messages": MSGS, "max_tokens": 3})
    await client.post(CHAT, json={"messages": MSGS, "max_tokens": 5, "stream": True})
    await client.post(CHAT, json={"model": "nope", "messages": MSGS})
    after = (await client.get("/v1/stats")).json()
    assert after["requests_processed"] == 2
    assert after["tokens_generated"] == 8
    assert after["max_tokens_per_request"] == 5
    assert after["avg_tokens_per_request"] == 4.0
    assert after["errors"] == 1
    assert after["uptime_seconds"] > 0 and after["throughput_tokens_per_second"] > 0
    text = (await client.get("/metrics")).text
    assert 'vllm_server_http_requests_total{method="POST",path="/v1/chat/completions",status="200"}' in text
    assert 'status="404"' in text
    assert "vllm_server_http_request_duration_seconds_bucket" in text


async def _call_then_disconnect(app: object, body: bytes, after: float) -> list[dict[str, object]]:
    """Drive the ASGI app directly; the client disconnects `after` seconds in."""
    import asyncio

    sent: list[dict[str, object]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        if messages:
            return messages.pop()
        await asyncio.sleep(after)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = post_scope(CHAT)
    await app(scope, receive, send)  # type: ignore[operator]
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_engine_request(stream: bool) -> None:
    engine = FakeEngine(delay=0.01)
    app = create_app(fake_settings(), engine=engine)
    body = json.dumps({"messages": MSGS, "max_tokens": 100, "stream": stream}).encode()
    await _call_then_disconnect(app, body, after=0.1)
    (rid,) = engine.produced
    assert rid in engine.aborted and rid in engine.closed
    assert engine.produced[rid] < 50  # stopped long before max_tokens
    assert app.state.serving.inflight == 0
    # A client that leaves (499) is not an error.
    assert app.state.serving.stats.errors == 0 and app.state.serving.stats.in_flight == 0


async def _errors(c: httpx.AsyncClient) -> int:
    """The `errors` counter of /v1/stats."""
    n: int = (await c.get("/v1/stats")).json()["errors"]
    return n


@pytest.mark.parametrize("stream", [False, True])
async def test_engine_refusal_counts_one_error(client: httpx.AsyncClient, stream: bool) -> None:
    before = await _errors(client)
    r = await client.post(CHAT, json={"messages": MSGS, "temperature": 1.8, "stream": stream})
    assert r.status_code == 400
    assert await _errors(client) == before + 1


async def test_queue_full_counts_one_error() -> None:
    from vllm_server.protocol import ChatCompletionRequest

    engine = FakeEngine(max_num_seqs=1, delay=0.01)
    app = create_app(fake_settings("--max-queued-requests", "0"), engine=engine)
    serving = app.state.serving
    stream = await serving.chat_stream(ChatCompletionRequest(messages=MSGS, max_tokens=50, stream=True))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        before = await _errors(c)
        r = await c.post(CHAT, json={"messages": MSGS, "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert await _errors(c) == before + 1
        await stream.aclose()
        assert (await c.get("/v1/stats")).json()["requests_in_flight"] == 0


async def test_in_band_stream_error_counts_one_error(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    orig = engine.generate

    async def fails_midway(*a, **k):  # type: ignore[no-untyped-def]
        async for out in orig(*a, **k):
            yield out
            raise RuntimeError("boom")

    engine.generate = fails_midway  # type: ignore[method-assign]
    r = await client.post(CHAT, json={"messages": MSGS, "max_tokens": 5, "stream": True})
    events = sse_events(r.text)
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    stats = (await client.get("/v1/stats")).json()
    assert stats["errors"] == 1 and stats["requests_in_flight"] == 0


async def test_lora_ids_stay_distinct(client: httpx.AsyncClient) -> None:
    for name in ("a", "b"):
        r = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"/p/{name}"})
        assert r.status_code == 200, r.text
    r = await client.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "/p/c"})
    assert r.status_code == 200, r.text
    ids = {a["name"]: a["id"] for a in (await client.get("/v1/lora_adapters")).json()}
    assert set(ids) == {"b", "c"}
    assert ids["b"] != ids["c"] and 0 not in ids.values()


async def test_startup_lora_adapters_report_their_engine_id() -> None:
    import asyncio

    engine = FakeEngine()
    app = create_app(fake_settings("--lora-modules", "pre=/p/pre"), engine_factory=lambda _s: engine)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        for _ in range(100):
            if (await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        (pre,) = (await c.get("/v1/lora_adapters")).json()
        assert pre["name"] == "pre" and pre["id"] != 0
