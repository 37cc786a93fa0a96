"""Scrape targets and adapters, from the objects and bodies the operator reads."""

from __future__ import annotations

from typing import Any

from vllm_operator.scrape import Target, adapters_from_models, targets_of


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
