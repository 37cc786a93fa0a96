"""Start `python -m vllm_server` (or any command) as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devtools.processes import free_port

__all__ = ["ENGINE_FLAGS", "RealServer", "free_port", "lora_flags", "spawn_server", "start_server"]

ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3"]


def lora_flags(preloaded: Path) -> list[str]:
    """LoRA on, rank 8 (the tiny adapter's), 2 adapters per batch, `preloaded` served from the start."""
    return [
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--lora-modules",
        f"preloaded={preloaded}",
    ]


@dataclass
class RealServer:
    """A running server process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    served_name: str
    api_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    host: str = "127.0.0.1"
    spawned_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        """Base URL (no /v1)."""
        return f"http://{self.host}:{self.port}"

    def headers(self) -> dict[str, str]:
        """Authorization header when the server has a key."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 60) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_healthy(self, startup_timeout: float = 600.0) -> RealServer:
        """Wait until /health answers 200, at most `startup_timeout` after the spawn; returns self.

        On a timeout or an early exit the server is stopped and the error carries its log tail.
        """
        deadline = self.spawned_at + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {startup_timeout}s:\n{self.log_tail()}")


def spawn_server(
    model: Path | str,
    extra_args: list[str],
    *,
    log_path: Path,
    served_name: str = "tiny",
    module: str = "vllm_server",
    port: int | None = None,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    niceness: int = 0,
) -> RealServer:
    """Start a server process without waiting for it (see RealServer.wait_healthy).

    `env` adds to this process's environment (e.g. VLLM_SERVER_ADMIN_TOKEN, which has no flag).
    `niceness` lowers its CPU priority, so that engines under load beside a local control plane
    cannot starve etcd and the API server of the machine's cores.
    """
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        module,
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        *ENGINE_FLAGS,
        *extra_args,
    ]
    child_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    api_key = None
    if "--api-key" in extra_args:
        api_key = extra_args[extra_args.index("--api-key") + 1]
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env,
        preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
    )
    return RealServer(proc, port, log_path, served_name, api_key, host=host)


def start_server(
    model: Path | str,
    extra_args: list[str],
    *,
    log_path: Path,
    served_name: str = "tiny",
    module: str = "vllm_server",
    startup_timeout: float = 600.0,
    port: int | None = None,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
) -> RealServer:
    """Start a server and wait until /health answers 200."""
    return spawn_server(
        model,
        extra_args,
        log_path=log_path,
        served_name=served_name,
        module=module,
        port=port,
        host=host,
        env=env,
    ).wait_healthy(startup_timeout)
