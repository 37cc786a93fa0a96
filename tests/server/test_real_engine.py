"""Real vLLM CPU engine behind `python -m vllm_server`, driven with the official openai client.

One server for this folder (see conftest.real_server): tiny random Llama, LoRA on, API key set.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from devtools.realserver import RealServer
from tests.server.conftest import ADMIN_TOKEN

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

MSGS: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, how are you today?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "Tell me about Kubernetes operators."},
]
EXACT = {"ignore_eos": True}  # vLLM extra: lengths are exact despite random weights


@pytest.fixture(scope="module")
def oai(real_server: RealServer) -> openai.OpenAI:
    """The official client on the real server."""
    return openai.OpenAI(
        base_url=f"{real_server.url}/v1", api_key=real_server.api_key, max_retries=0, timeout=120
    )


def metric(srv: RealServer, name: str) -> float:
    """Sum of a Prometheus series over its labels."""
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M):
        total += float(m.group(1))
    return total


def test_chat_multi_turn(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=8,
        extra_body=EXACT,
    )
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 20  # the chat template wrapped four messages
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_sampling_params_and_n(oai: openai.OpenAI) -> None:
    kw = dict(
        model="tiny",
        messages=MSGS[:2],
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        stop=["zzz"],
    )
    a = oai.chat.completions.create(**kw, n=2, extra_body={**EXACT, "top_k": 20})  # type: ignore[call-overload]
    b = oai.chat.completions.create(**kw, n=2, extra_body={**EXACT, "top_k": 20})  # type: ignore[call-overload]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens == 12
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    g1 = oai.chat.completions.create(
        model="tiny",
        messages=MSGS[:2],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=EXACT,
    )
    lp = g1.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 6
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp.content)


def test_completions(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=5, extra_body=EXACT)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5
    r = oai.completions.create(
        model="tiny", prompt=[10, 11, 12, 13], max_tokens=3, logprobs=2, extra_body=EXACT
    )
    assert r.usage is not None and r.usage.prompt_tokens == 4
    assert r.choices[0].logprobs is not None
    assert len(r.choices[0].logprobs.token_logprobs or []) == 3


def test_chat_streaming_is_token_by_token(oai: openai.OpenAI) -> None:
    t0 = time.perf_counter()
    stamps: list[float] = []
    text = []
    usage = None
    stream = oai.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=96,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter() - t0)
            text.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - t0
    assert usage is not None and usage.completion_tokens == 96
    # About one text event per token: the tiny tokenizer is ASCII-only, so no text is held
    # back for an unfinished UTF-8 character. On a busy machine vLLM's per-request output
    # collector merges deltas that the server has not picked up yet, hence the margin.
    assert len(stamps) >= 48
    assert stamps[0] < total / 4, (stamps[0], total)
    # Arrival is spread over the generation, not bunched at the end.
    assert stamps[len(stamps) // 2] < total * 0.8


def test_streaming_sends_every_engine_delta(oai: openai.OpenAI) -> None:
    # With logprobs each token's event carries its logprob even when its text is held back.
    events = 0
    tokens = 0
    for chunk in oai.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=64,
        stream=True,
        logprobs=True,
        extra_body=EXACT,
    ):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            events += 1
            tokens += len(chunk.choices[0].logprobs.content)
    assert tokens == 64
    assert events >= 32  # one per token when idle; merged by vLLM's collector under load


def test_completions_streaming(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.completions.create(model="tiny", prompt="Hello", max_tokens=10, stream=True, extra_body=EXACT)
    )
    assert len(chunks) >= 8
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models(oai: openai.OpenAI, real_server: RealServer) -> None:
    models = {m.id: m for m in oai.models.list()}
    assert "tiny" in models and "preloaded" in models
    assert (models["tiny"].model_extra or {}).get("max_model_len") == 1024
    info = httpx.get(f"{real_server.url}/v1/info", headers=real_server.headers()).json()
    assert info["max_model_len"] == 1024 and info["dtype"] == "float32"
    assert "preloaded" in info["lora_adapters"]


def test_errors(oai: openai.OpenAI, real_server: RealServer) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.chat.completions.create(model="nope", messages=MSGS, max_tokens=2)
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as br:
        oai.chat.completions.create(model="tiny", messages=MSGS, temperature=5)
    assert br.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as br:
        oai.completions.create(model="tiny", prompt=[5] * 1500, max_tokens=2)
    assert br.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as br:
        oai.completions.create(model="tiny", prompt="hi", max_tokens=5000)
    assert br.value.body["param"] == "max_tokens"  # type: ignore[index]
    r = httpx.post(
        f"{real_server.url}/v1/chat/completions",
        content=b"{not json",
        headers={**real_server.headers(), "content-type": "application/json"},
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_key(real_server: RealServer) -> None:
    bad = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{real_server.url}/v1/chat/completions", json={"messages": MSGS})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{real_server.url}/health").status_code == 200
    assert httpx.get(f"{real_server.url}/metrics").status_code == 200


def test_lora_load_use_unload(oai: openai.OpenAI, real_server: RealServer) -> None:
    url, h = real_server.url, real_server.headers()
    path = real_server.extra["lora_path"]
    r = httpx.post(
        f"{url}/v1/load_lora_adapter", headers=h, json={"lora_name": "second", "lora_path": path}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert "second" in {m.id for m in oai.models.list()}
    names = [a["name"] for a in httpx.get(f"{url}/v1/lora_adapters", headers=h).json()]
    assert sorted(names) == ["preloaded", "second"]

    def greedy(model: str) -> str:
        r = oai.completions.create(
            model=model, prompt="The quick brown fox", max_tokens=12, temperature=0, extra_body=EXACT
        )
        assert r.model == model
        return r.choices[0].text

    base = greedy("tiny")
    assert greedy("second") != base  # random B matrices change the output
    assert greedy("preloaded") == greedy("second")  # same weights, other name
    r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=h, json={"lora_name": "second"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        greedy("second")
    assert "second" not in {m.id for m in oai.models.list()}
    r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=h, json={"lora_name": "second"})
    assert r.status_code == 404
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        headers=h,
        json={"lora_name": "broken", "lora_path": "/does/not/exist"},
        timeout=60,
    )
    assert r.status_code in (400, 404) and "error" in r.json()


def test_metrics_and_stats_move(oai: openai.OpenAI, real_server: RealServer) -> None:
    h = real_server.headers()
    gen0 = metric(real_server, "vllm:generation_tokens_total")
    http0 = metric(real_server, "vllm_server_http_requests_total")
    stats0 = httpx.get(f"{real_server.url}/v1/stats", headers=h).json()
    oai.chat.completions.create(
        model="tiny",
        messages=MSGS,
        max_tokens=10,
        extra_body=EXACT,
    )
    stats1 = httpx.get(f"{real_server.url}/v1/stats", headers=h).json()
    assert metric(real_server, "vllm:generation_tokens_total") >= gen0 + 10
    assert metric(real_server, "vllm_server_http_requests_total") > http0
    assert stats1["requests_processed"] == stats0["requests_processed"] + 1
    assert stats1["tokens_generated"] == stats0["tokens_generated"] + 10
    assert stats1["max_tokens_per_request"] >= 10
    assert stats1["avg_generation_time_seconds"] > 0
    assert stats1["uptime_seconds"] > stats0["uptime_seconds"]


def test_disconnect_aborts_engine_request(real_server: RealServer) -> None:
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 900, "ignore_eos": True, "stream": True}
    gen0 = metric(real_server, "vllm:generation_tokens_total")
    with httpx.stream(
        "POST", f"{real_server.url}/v1/chat/completions", json=body, headers=real_server.headers(), timeout=60
    ) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                break
    # Connection closed: the engine must abort, so the token counter stops growing.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(real_server, "vllm:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(real_server, "vllm:num_requests_running") == 0
    a = metric(real_server, "vllm:generation_tokens_total")
    time.sleep(1.0)
    b = metric(real_server, "vllm:generation_tokens_total")
    assert a == b, "tokens still being generated after the client left"
    assert b - gen0 < 600, "the request ran (nearly) to its end instead of being aborted"


def test_queue_full_returns_503(real_server: RealServer) -> None:
    # The session server runs --max-num-seqs 8 --max-queued-requests 4: 12 may be in flight.
    body = {"model": "tiny", "messages": MSGS[:2], "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def go() -> list[tuple[int, str | None]]:
        async with httpx.AsyncClient(
            base_url=real_server.url, headers=real_server.headers(), timeout=120
        ) as c:

            async def one() -> tuple[int, str | None]:
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    await r.aread()
                    return r.status_code, r.headers.get("retry-after")

            return await asyncio.gather(*(one() for _ in range(20)))

    results = asyncio.run(go())
    codes = [c for c, _ in results]
    assert codes.count(200) >= 12 and codes.count(503) >= 1, codes
    assert all(ra == "1" for c, ra in results if c == 503)
    assert set(codes) <= {200, 503}


# vLLM's own validation (SamplingParams, its input processing): each was a 500 with a traceback.
# The parameter comes from vLLM (n) or from the protocol models' bounds (the others).
BAD_SAMPLING = [
    ('"temperature": 0, "n": 2', "n"),  # greedy sampling has one answer
    ('"repetition_penalty": Infinity', "repetition_penalty"),
    ('"stop": ""', "stop"),
    (f'"seed": {2**70}', "seed"),  # beyond vLLM's 64-bit transport
]


def post_raw_chat(server: RealServer, body: str | bytes) -> httpx.Response:
    """POST `body` as it is (not necessarily valid JSON) to the chat endpoint, with the key."""
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        timeout=60,
        headers={**server.headers(), "content-type": "application/json"},
    )


@pytest.mark.parametrize(("extra", "param"), BAD_SAMPLING)
@pytest.mark.parametrize("stream", ["false", "true"])
def test_bad_sampling_input_is_400_naming_the_field(
    real_server: RealServer, extra: str, param: str, stream: str
) -> None:
    body = (
        '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
        f'"max_tokens": 2, "stream": {stream}, {extra}}}'
    )
    log_start = real_server.log_path.stat().st_size
    r = post_raw_chat(real_server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    with real_server.log_path.open("rb") as log:
        log.seek(log_start)
        assert b"Traceback" not in log.read()
    assert httpx.get(f"{real_server.url}/health", timeout=10).status_code == 200


def test_admin_token_reads_models_and_changes_adapters(real_server: RealServer) -> None:
    # What the operator does on a keyed server with the admin token it holds.
    url, admin = real_server.url, {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    path = real_server.extra["lora_path"]
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        headers=admin,
        timeout=60,
        json={"lora_name": "by-admin", "lora_path": path},
    )
    assert r.status_code == 200, r.text
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models", headers=admin).json()["data"]}
    assert cards["by-admin"]["root"] == path and cards["by-admin"]["parent"] == "tiny"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=headers, json={"lora_name": "by-admin"})
        assert r.status_code == 401, r.text
    r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=admin, json={"lora_name": "by-admin"})
    assert r.status_code == 200, r.text


def test_concurrent_loads_of_one_name_leave_one_copy(real_server: RealServer) -> None:
    url, h = real_server.url, real_server.headers()
    body = {"lora_name": "twice", "lora_path": real_server.extra["lora_path"]}

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=h, timeout=60) as c:
            return list(await asyncio.gather(*(c.post("/v1/load_lora_adapter", json=body) for _ in range(2))))

    results = asyncio.run(go())
    assert sorted(r.status_code for r in results) == [200, 400], [r.text for r in results]
    assert "already been loaded" in next(r.text for r in results if r.status_code == 400)
    names = [a["name"] for a in httpx.get(f"{url}/v1/lora_adapters", headers=h).json()]
    assert names.count("twice") == 1
    r = httpx.post(f"{url}/v1/unload_lora_adapter", headers=h, json={"lora_name": "twice"})
    assert r.status_code == 200, r.text


def test_oversized_body_is_413(real_server: RealServer) -> None:
    # Default limit for the tiny model: 1 MiB + 32 bytes x 1024 tokens.
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 2_000_000 + b'"}]}'
    r = post_raw_chat(real_server, body)
    assert r.status_code == 413, r.text
    assert "--max-request-body-bytes" in r.json()["error"]["message"]
