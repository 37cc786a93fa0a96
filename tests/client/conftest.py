"""Fixtures of the client tests: scripted stub servers and one real server for the folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.realserver import RealServer, lora_flags, start_server
from devtools.stub_server import Stub
from vllm_operator_client import RetryPolicy

API_KEY = "client-key"


def _running_stub() -> Iterator[Stub]:
    """A stub server on a free loopback port, stopped after the test."""
    s = Stub().start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def stub() -> Iterator[Stub]:
    """A stub server on a free loopback port."""
    yield from _running_stub()


@pytest.fixture
def stub2() -> Iterator[Stub]:
    """A second stub, for failover and round-robin."""
    yield from _running_stub()


@pytest.fixture
def fast_retry() -> RetryPolicy:
    """Short backoff so retry tests take milliseconds (no jitter: exact expectations)."""
    return RetryPolicy(max_retries=2, initial_delay=0.05, max_delay=0.2, jitter=0.0)


@pytest.fixture(scope="package")
def client_server(
    tiny_model: Path, tiny_lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealServer]:
    """One real server on the tiny model for this folder (LoRA, API key), stopped after its last test."""
    model, lora = tiny_model, tiny_lora
    second = tmp_path_factory.mktemp("client-lora2") / "adapter"
    shutil.copytree(lora, second)
    srv = start_server(
        model,
        [
            *lora_flags(lora),
            "--api-key",
            API_KEY,
        ],
        log_path=tmp_path_factory.mktemp("client-logs") / "server.log",
        # A server started by hand, as a user would for the client's adapter calls: upstream's
        # switch turns runtime adapter changes on (they then need the API key).
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    srv.extra["lora_path"] = str(second)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="package")
def lora_path(client_server: RealServer) -> Path:
    """A LoRA adapter directory the tests may load under any name."""
    return Path(client_server.extra["lora_path"])
