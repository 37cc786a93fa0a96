"""Who may call what (`vllm_server.auth`): API key, admin token, upstream's adapter switch."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.server.conftest import RUNTIME_LORA, fake_settings
from tests.server.fake_engine import FakeEngine
from vllm_server.app import create_app
from vllm_server.auth import Access, bearer_token
from vllm_server.settings import parse_settings

KEY = "api-key-1"
ADMIN = "admin-token-1"
OTHER = "someone-else"
ADMIN_ENV = {"VLLM_SERVER_ADMIN_TOKEN": ADMIN}
MSGS = [{"role": "user", "content": "hi"}]

# (server environment and flags, the credential sent, route, expected status). Unloading an
# adapter that is not loaded answers 404 once past the credential check, so the table needs no
# adapter state; loading one answers 200.
NONE: dict[str, str] = {}
CASES = [
    # No credentials configured (a server started by hand): /v1 open, adapter changes off.
    (NONE, [], None, "models", 200),
    (NONE, [], None, "unload", 403),
    (NONE, [], None, "load", 403),
    # ... unless upstream's switch is on: then open, as upstream.
    (RUNTIME_LORA, [], None, "unload", 404),
    (RUNTIME_LORA, [], None, "load", 200),
    # An API key, no admin token: the key guards /v1; adapter changes stay off without the switch.
    (NONE, ["--api-key", KEY], None, "models", 401),
    (NONE, ["--api-key", KEY], KEY, "models", 200),
    (NONE, ["--api-key", KEY], None, "unload", 401),  # the key first: no hint about the switch
    (NONE, ["--api-key", KEY], KEY, "unload", 403),
    (RUNTIME_LORA, ["--api-key", KEY], KEY, "unload", 404),
    (RUNTIME_LORA, ["--api-key", KEY], OTHER, "unload", 401),
    (RUNTIME_LORA, ["--api-key", KEY], None, "load", 401),
    # An admin token, no API key: /v1 open; adapter changes need the token, switch or not.
    (ADMIN_ENV, [], None, "models", 200),
    (ADMIN_ENV, [], ADMIN, "unload", 404),
    (ADMIN_ENV, [], ADMIN, "load", 200),
    (ADMIN_ENV, [], None, "unload", 401),
    (ADMIN_ENV, [], OTHER, "load", 401),
    ({**ADMIN_ENV, **RUNTIME_LORA}, [], None, "unload", 401),
    # Both (what the operator deploys): either credential for /v1 and for adapter changes.
    (ADMIN_ENV, ["--api-key", KEY], ADMIN, "models", 200),
    (ADMIN_ENV, ["--api-key", KEY], KEY, "models", 200),
    (ADMIN_ENV, ["--api-key", KEY], OTHER, "models", 401),
    (ADMIN_ENV, ["--api-key", KEY], None, "chat", 401),
    (ADMIN_ENV, ["--api-key", KEY], ADMIN, "chat", 200),
    (ADMIN_ENV, ["--api-key", KEY], ADMIN, "unload", 404),
    (ADMIN_ENV, ["--api-key", KEY], KEY, "load", 200),
    (ADMIN_ENV, ["--api-key", KEY], OTHER, "unload", 401),
    (ADMIN_ENV, ["--api-key", KEY], None, "load", 401),
]


async def _call(c: httpx.AsyncClient, route: str, headers: dict[str, str]) -> httpx.Response:
    if route == "models":
        return await c.get("/v1/models", headers=headers)
    if route == "chat":
        return await c.post("/v1/chat/completions", headers=headers, json={"messages": MSGS, "max_tokens": 1})
    if route == "load":
        return await c.post(
            "/v1/load_lora_adapter", headers=headers, json={"lora_name": "sql", "lora_path": "/a/sql"}
        )
    return await c.post("/v1/unload_lora_adapter", headers=headers, json={"lora_name": "sql"})


@pytest.mark.parametrize(("env", "flags", "token", "route", "status"), CASES)
async def test_access_contract(
    env: dict[str, str], flags: list[str], token: str | None, route: str, status: int
) -> None:
    app = create_app(fake_settings(*flags, env=env), engine=FakeEngine())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await _call(c, route, headers)
        assert r.status_code == status, r.text
        if status >= 400 and status != 404:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        if status == 403:
            assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == "runtime_lora_updating_disabled"
        # Probes and scraping never need a credential.
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_models_lists_adapters_with_their_path_as_root() -> None:
    # The operator compares `root` with the path it asked for (an adapter replaced behind its
    # back shows another path).
    app = create_app(fake_settings("--api-key", KEY, env=ADMIN_ENV), engine=FakeEngine())
    h = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post(
            "/v1/load_lora_adapter", headers=h, json={"lora_name": "sql", "lora_path": "/adapters/sql"}
        )
        assert r.status_code == 200, r.text
        cards = {m["id"]: m for m in (await c.get("/v1/models", headers=h)).json()["data"]}
    assert cards["sql"]["root"] == "/adapters/sql" and cards["sql"]["parent"] == "tiny"


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer   abc  ", b"abc"),
        (b"BEARER abc\t", b"abc"),
        (b"Basic abc", None),
        (b"abc", None),
        (None, None),
        ("Bearer clé".encode(), "clé".encode()),
    ],
)
def test_bearer_token(header: bytes | None, token: bytes | None) -> None:
    assert bearer_token(header) == token


async def test_non_ascii_key_matches_its_utf8_bytes() -> None:
    # Header values are bytes; a client that sends the key as UTF-8 must get in.
    key = "schlüssel-🔑"
    app = create_app(fake_settings("--api-key", key), engine=FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        ok = await c.get("/v1/models", headers={b"Authorization": b"Bearer " + key.encode()})
        assert ok.status_code == 200, ok.text
        latin1 = await c.get(
            "/v1/models", headers={b"Authorization": b"Bearer " + key.encode("latin-1", "replace")}
        )
        assert latin1.status_code == 401


async def test_key_from_a_secret_file_with_a_final_newline() -> None:
    # `kubectl create secret --from-file` keeps the file's newline in the value.
    settings = fake_settings(env={"VLLM_API_KEY": "from-file\n"})
    app = create_app(settings, engine=FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/v1/models", headers={"Authorization": "Bearer from-file"})
        assert r.status_code == 200, r.text
        assert (await c.get("/v1/models")).status_code == 401


async def test_secrets_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = parse_settings(["--model", "m", "--enable-lora"], env={"VLLM_API_KEY": KEY, **ADMIN_ENV})
    access = Access.from_settings(settings)
    shown = [repr(settings), str(settings), repr(access)]
    app = create_app(settings, engine=FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for token in (None, OTHER, KEY, ADMIN):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            for route in ("models", "chat", "load", "unload"):
                shown.append((await _call(c, route, headers)).text)
    shown.append(caplog.text)
    for text in shown:
        assert KEY not in text and ADMIN not in text
    assert "api_key=set" in repr(access) and "admin_token=set" in repr(access)


def test_access_refuses_empty_secrets() -> None:
    # Settings refuse them at start (test_settings_unit); an empty one here would mean "open".
    with pytest.raises(ValueError, match="empty"):
        Access("", None, False)
    with pytest.raises(ValueError, match="empty"):
        Access(None, "", False)
