"""Hostile and faulty input on the fake engine: sampling bounds, body size, a busy event loop,
concurrent adapter changes (issue 13)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.server.asgi import post_scope
from tests.server.conftest import RUNTIME_LORA, fake_settings
from tests.server.fake_engine import FakeEngine
from vllm_server.app import create_app
from vllm_server.serving import BODY_BYTES_BASE, BODY_BYTES_PER_TOKEN

CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://t",
    )


# ---- sampling parameters: bounds on the protocol models ------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"stop": ""', "stop"),
        ('"stop": ["a", ""]', "stop"),
        ('"repetition_penalty": Infinity', "repetition_penalty"),
        ('"temperature": NaN', "temperature"),
        ('"top_p": -Infinity', "top_p"),
        (f'"seed": {2**70}', "seed"),
        (f'"seed": {-(2**63) - 1}', "seed"),
        (f'"top_k": {2**64}', "top_k"),
        (f'"stop_token_ids": [{2**64}]', "stop_token_ids.0"),
    ],
)
async def test_out_of_range_sampling_input_is_400_naming_it(
    client: httpx.AsyncClient, engine: FakeEngine, extra: str, param: str
) -> None:
    # Raw JSON: Infinity and NaN are not JSON, but Python's encoder (and so many clients)
    # write them, and the parser accepts them.
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + extra + "}"
    for stream in ("false", "true"):
        r = await client.post(
            CHAT, content=body[:-1] + f', "stream": {stream}}}', headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert engine.last_params is None  # refused before reaching the engine


async def test_int64_seed_still_reaches_the_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(CHAT, json={"messages": MSGS, "max_tokens": 1, "seed": 2**63 - 1})
    assert r.status_code == 200, r.text
    assert engine.last_params is not None and engine.last_params.seed == 2**63 - 1


# ---- request body size -------------------------------------------------------------------------


async def _drive(
    app: object,
    chunks: list[bytes],
    headers: list[tuple[bytes, bytes]],
) -> tuple[int, Any, int]:
    """Send a POST body in `chunks` straight to the ASGI app: (status, body, chunks read)."""
    sent: list[dict[str, object]] = []
    pending = list(chunks)
    read = 0

    async def receive() -> dict[str, object]:
        nonlocal read
        if not pending:
            await asyncio.sleep(3600)  # the client is still there; nothing more to send
        read += 1
        body = pending.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = post_scope(CHAT, headers)
    await asyncio.wait_for(app(scope, receive, send), 10)  # type: ignore[operator]
    status: int = sent[0]["status"]  # type: ignore[assignment]
    body = json.loads(b"".join(m["body"] for m in sent[1:]))  # type: ignore[misc]
    return status, body, read


def _chunks(total: int, size: int = 64 * 1024) -> list[bytes]:
    """A chat body of `total` bytes in `size`-byte chunks."""
    head = b'{"messages": [{"role": "user", "content": "'
    tail = b'"}], "max_tokens": 1}'
    body = head + b"x" * (total - len(head) - len(tail)) + tail
    return [body[i : i + size] for i in range(0, len(body), size)]


async def test_declared_oversized_body_is_413_before_reading_it() -> None:
    app = create_app(fake_settings("--max-request-body-bytes", "100000"), engine=FakeEngine())
    chunks = _chunks(40_000_000)
    status, body, read = await _drive(app, chunks, [(b"content-length", b"40000000")])
    assert status == 413
    assert read == 0  # not one byte of the 40 MB was taken in
    err = body["error"]
    assert err["code"] == "request_too_large"
    assert "--max-request-body-bytes" in err["message"]
    assert "VLLM_SERVER_MAX_REQUEST_BODY_BYTES" in err["message"]


async def test_chunked_oversized_body_is_413_as_soon_as_it_is_too_large() -> None:
    app = create_app(fake_settings("--max-request-body-bytes", "100000"), engine=FakeEngine())
    chunks = _chunks(40_000_000)  # 611 chunks of 64 KiB, no Content-Length
    status, _, read = await _drive(app, chunks, [])
    assert status == 413
    assert read == 2  # 128 KiB read, then refused: the other 609 chunks never came in


async def test_default_body_limit_follows_max_model_len() -> None:
    engine = FakeEngine(max_model_len=128)
    app = create_app(fake_settings(), engine=engine)
    limit = BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * 128
    assert app.state.serving.body_limit() == limit
    status, _, _ = await _drive(app, _chunks(limit + 1), [])
    assert status == 413
    # At the limit the body is read and served (the fake tokenizer: one token per word).
    status, _, _ = await _drive(app, _chunks(limit), [])
    assert status == 200


# ---- templating off the event loop ---------------------------------------------------------------


async def test_templating_does_not_block_the_event_loop() -> None:
    # The fake's template blocks its thread for 0.5 s, as a large prompt's templating does.
    app = create_app(fake_settings(), engine=FakeEngine(template_seconds=0.5))
    async with _client(app) as c:
        gaps: list[float] = []
        done = asyncio.Event()

        async def tick() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        try:
            r = await c.post(CHAT, json={"messages": MSGS, "max_tokens": 1})
            health = await c.get("/health")
        finally:
            done.set()
            await ticker
    assert r.status_code == 200 and health.status_code == 200
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.2f} s"


# ---- adapter changes ---------------------------------------------------------------------------


async def test_concurrent_loads_of_one_name_leave_one_copy() -> None:
    engine = FakeEngine(lora_delay=0.05)  # both requests are in flight during the load
    app = create_app(fake_settings(env=RUNTIME_LORA), engine=engine)
    body = {"lora_name": "sql", "lora_path": "/a/sql"}
    async with _client(app) as c:
        a, b = await asyncio.gather(
            c.post("/v1/load_lora_adapter", json=body), c.post("/v1/load_lora_adapter", json=body)
        )
        assert sorted([a.status_code, b.status_code]) == [200, 400]
        refused = a if a.status_code == 400 else b
        assert refused.json()["error"]["code"] == "lora_already_loaded"
        assert engine.lora_loads == ["sql"]
        assert [a["name"] for a in (await c.get("/v1/lora_adapters")).json()] == ["sql"]


def test_openapi_describes_every_body_without_dangling_refs() -> None:
    # Fuzzers and client generators read these; pydantic's `#/$defs/...` refs pointed nowhere
    # in an OpenAPI document, so the nested models (messages, content parts) were opaque.
    doc = create_app(fake_settings(), engine=FakeEngine()).openapi()
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    ):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["type"] == "object", path
    text = json.dumps(doc)
    assert "#/$defs/" not in text and '"$defs"' not in text
    messages = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["properties"]["messages"]
    assert "role" in messages["items"]["properties"]
