"""Fixtures for the server tests: fake-engine apps (unit) and a real server (engine)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from devtools.realserver import RealServer, lora_flags, start_server
from tests.server.fake_engine import FakeEngine
from vllm_server.app import create_app
from vllm_server.settings import Settings, parse_settings

ADMIN_TOKEN = "test-admin-token"
# Lets the adapter routes work without an admin token (upstream's switch).
RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def fake_settings(*extra: str, env: dict[str, str] | None = None) -> Settings:
    """Settings as the operator would pass them, for a fake engine; `env` is the environment."""
    return parse_settings(
        ["--model", "/models/tiny", "--served-model-name", "tiny", "--enable-lora", *extra], env=env or {}
    )


@pytest.fixture
def engine() -> FakeEngine:
    """A fresh fake engine."""
    return FakeEngine()


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on an app serving the fake engine (no credentials, adapter routes on)."""
    app = create_app(fake_settings(env=RUNTIME_LORA), engine=engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


# ---- real engine ------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def real_server(
    tiny_model: Path, tiny_lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealServer]:
    """One real server for this folder, stopped after its last test: LoRA, small queue, and the
    operator's credentials (an API key, and an admin token for adapter changes)."""
    # A copy of the adapter so that tests can load a second one under another name.
    second = tmp_path_factory.mktemp("lora2") / "adapter"
    shutil.copytree(tiny_lora, second)
    srv = start_server(
        tiny_model,
        [
            *lora_flags(tiny_lora),
            "--api-key",
            "test-key",
            "--max-num-seqs",
            "8",
            "--max-queued-requests",
            "4",
        ],
        log_path=tmp_path_factory.mktemp("logs") / "server.log",
        env={"VLLM_SERVER_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    srv.extra["lora_path"] = str(second)
    try:
        yield srv
    finally:
        srv.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop the shared real server run after this folder's other tests (and before the
    next folder's, so that the server's package-scoped fixture ends with the folder)."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if here in Path(str(item.fspath)).parents]
    ours = [items[i] for i in slots]
    ours.sort(key=lambda item: item.get_closest_marker("stops_real_server") is not None)
    for slot, item in zip(slots, ours, strict=True):
        items[slot] = item
