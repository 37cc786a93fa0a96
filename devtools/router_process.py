"""`vllm-operator router` as a real process, the way the chart runs it (here against KUBECONFIG)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from devtools.cluster import wait_until
from devtools.paths import REPO_ROOT
from devtools.processes import free_ports, terminate


class RouterProcess:
    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "vllm_operator", "router", *args]
        self.argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> RouterProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        wait_until(self.ready, "router /readyz", timeout=timeout, interval=0.2)
        return self

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"router exited; log:\n{self.tail()}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, grace=40)  # above the router's own 30 s drain

    def tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
