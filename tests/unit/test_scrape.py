"""Scrape targets and adapters, from the objects and bodies the operator reads."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from vllm_operator.scrape import Scraper, Target, adapters_from_models, bearer, targets_of


def pod(name: str, ip: str = "", ready: bool = False, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": meta, "status": {"podIP": ip, "conditions": conditions}}


def test_targets_of() -> None:
    pods = [
        pod("a", "10.0.0.1", True),
        pod("b", "10.0.0.2"),
        pod("c"),
        pod("d", "10.0.0.4", True, deleting=True),
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
    assert adapters_from_models(body, "llama") == ("chat", "sql")
    assert adapters_from_models({"data": [{"id": "llama"}, {"id": "x"}]}, "llama") == ("x",)
    assert adapters_from_models("garbage", "llama") == ()


KEY = "sk-test-0123"


def keyed_server(request: httpx.Request) -> httpx.Response:
    """A server started with --api-key: /health and /metrics are open, /v1 wants the key."""
    if request.url.path == "/health":
        return httpx.Response(200)
    if request.url.path == "/metrics":
        return httpx.Response(200, text="vllm:num_requests_running 1\n")
    if request.headers.get("authorization") != f"Bearer {KEY}":
        return httpx.Response(401, json={"error": {"message": "Invalid or missing API key."}})
    return httpx.Response(200, json={"data": [{"id": "m"}, {"id": "sql", "parent": "m"}]})


@pytest.mark.parametrize(
    ("api_key", "adapters", "models_error"),
    [
        (KEY, ("sql",), ""),
        ("", (), "/v1/models answered 401: Invalid or missing API key."),
        ("wrong", (), "/v1/models answered 401: Invalid or missing API key."),
    ],
)
async def test_models_are_read_with_the_api_key(
    api_key: str, adapters: tuple[str, ...], models_error: str
) -> None:
    target = Target("a", "10.0.0.1", True, "m", lora=True, api_key=api_key)
    async with httpx.AsyncClient(transport=httpx.MockTransport(keyed_server)) as client:
        sample = await Scraper().scrape_pod(client, target)
    assert (sample.healthy, sample.adapters, sample.models_error) == (True, adapters, models_error)
    assert sample.running == 1.0


def test_the_api_key_never_shows_in_a_repr() -> None:
    assert KEY not in repr(Target("a", "10.0.0.1", True, "m", lora=True, api_key=KEY))
    assert bearer(KEY) == {"Authorization": f"Bearer {KEY}"} and bearer("") == {}


def test_targets_know_what_each_pod_downloaded() -> None:
    with_init = pod("a", "10.0.0.1", True)
    with_init["spec"] = {
        "initContainers": [{"name": "fetch-lora-x", "args": ["s3://b/x", "/cache/sources/lora-x"]}]
    }
    assert targets_of([with_init], "m", lora=True)[0].fetched == {"/cache/sources/lora-x"}
    assert targets_of([with_init], "m")[0].fetched == frozenset()
