"""Shared pytest configuration: the local control plane and the tiny model, for every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.harness.fixtures"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama built once per session (no download)."""
    from devtools.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random rank-8 LoRA adapter for the tiny model (made with peft)."""
    from devtools.tinymodel import build_tiny_lora

    return build_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora") / "adapter")
