"""The Kubernetes layer against servers that misbehave at the socket level."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import kubernetes
import pytest

from vllm_operator import k8s


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections and never answers (a hung API server or proxy)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.timeout(60)  # the old code hung here forever
def test_a_server_that_never_answers_cannot_block_a_call_forever(silent_server: str) -> None:
    config = kubernetes.client.Configuration()
    config.host = silent_server
    cluster = k8s.KubeCluster(k8s.api_client(config), timeout=(1.0, 0.5))
    started = time.monotonic()
    with pytest.raises(k8s.TransientError, match="after 5 attempts"):
        cluster.get("Service", "default", "x")
    # 5 reads of 0.5 s plus the backoff between them (0.2 .. 1.6 s, +50 % jitter).
    assert time.monotonic() - started < 10


def test_the_default_timeout_is_bounded() -> None:
    connect, read = k8s.API_TIMEOUT
    assert 0 < connect <= 10 and 0 < read <= 60
