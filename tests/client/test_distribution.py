"""`pip install ./client` on its own: a clean venv gets no kopf and no Kubernetes client, and its
`vllm-bench` checks and loads the real server, as in a user's test suite."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.realserver import RealServer
from tests.client.conftest import API_KEY

pytestmark = pytest.mark.engine

REPO_ROOT = Path(__file__).resolve().parents[2]
OPERATOR_ONLY = {"kopf", "kubernetes", "vllm-operator", "pydantic", "fastapi", "vllm"}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only `pip install ./client` (from a copy: the build writes beside it)."""
    root = tmp_path_factory.mktemp("client-dist")
    source = root / "client"
    shutil.copytree(
        REPO_ROOT / "client", source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        check=True,
        timeout=600,
    )
    return venv


def test_the_client_installs_alone(client_venv: Path) -> None:
    listed = subprocess.run(
        [str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "vllm-operator-client" in installed and "httpx" in installed, installed
    assert installed & OPERATOR_ONLY == set(), installed


def test_its_bench_checks_and_loads_the_real_server(client_venv: Path, client_server: RealServer) -> None:
    bench = str(client_venv / "bin" / "vllm-bench")
    target = ["--base-url", client_server.url, "--api-key", API_KEY]
    check = subprocess.run([bench, "check", *target], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "11 passed, 0 failed" in check.stdout
    load = subprocess.run(
        [
            bench,
            "load",
            *target,
            "-n",
            "8",
            "-c",
            "4",
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert load.returncode == 0, load.stdout + load.stderr
    summary = json.loads(load.stdout.strip().splitlines()[-1])
    assert summary["completed"] == 8 and summary["errors"] == 0, summary
    assert summary["output_tokens"] == 64, summary
    # No operator here: --model-ref is the operator's (it reads the Kubernetes API).
    ref = subprocess.run([bench, "load", "--model-ref", "default/tiny"], capture_output=True, text=True)
    assert ref.returncode == 2 and "--model-ref" in ref.stderr
