"""SIGTERM on the real server: stop accepting, finish in-flight streams, exit 0.

The SIGTERM test stops the package's shared server, so it is marked `stops_real_server` and
runs after every other test (tests/server/conftest.py), whatever the file order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from devtools.realserver import ENGINE_FLAGS, RealServer, free_port

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]


@pytest.mark.stops_real_server
def test_sigterm_drains_streams_then_exits_zero(real_server: RealServer) -> None:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events: list[str] = []
    refused: list[bool] = []
    with httpx.stream(
        "POST",
        f"{real_server.url}/v1/chat/completions",
        json=body,
        headers=real_server.headers(),
        timeout=120,
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) >= 3:
                break
        real_server.proc.send_signal(signal.SIGTERM)

        def probe() -> None:
            time.sleep(0.5)
            try:
                httpx.get(f"{real_server.url}/health", timeout=2)
                refused.append(False)
            except httpx.HTTPError:
                refused.append(True)

        t = threading.Thread(target=probe)
        t.start()
        events += [line for line in lines if line.startswith("data: ")]
        t.join()
    assert events[-1] == "data: [DONE]", "the in-flight stream was cut"
    assert '"completion_tokens":400' in events[-2]
    assert refused == [True], "new connections were still accepted after SIGTERM"
    assert real_server.proc.wait(60) == 0


def test_engine_that_cannot_start_exits_nonzero(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: object
) -> None:
    """A model folder without a config: the server must exit 1 (so Kubernetes restarts it)."""
    empty = tmp_path_factory.mktemp("empty-model")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_server",
            "--model",
            str(empty),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            *ENGINE_FLAGS,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "engine failed to start" in proc.stderr


def test_bad_engine_flag_exits_2_before_serving(tiny_model: object) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_server", "--model", "/m", "--no-such-engine-flag"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
