"""The container engine the kind tier builds and runs images with: rootful podman or Docker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from devtools import toolchain

# podman here cannot start a single container without these (measured): the hard limit of
# open files is 20000 and podman lowers its nproc to kernel.pid_max, so its default ulimits
# fail with "setrlimit RLIMIT_NOFILE: Operation not permitted"; crun refuses the hybrid
# cgroup v1 layout, runc works.
PODMAN_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""
# Debian packages of the podman path (installed when missing and we are root on Debian).
PODMAN_PACKAGES = (
    "podman", "runc", "netavark", "aardvark-dns", "conmon", "containernetworking-plugins",
    "mmdebstrap", "uidmap",
)  # fmt: skip


class EngineError(RuntimeError):
    """No usable container engine, or one of its commands failed."""


def state_dir() -> Path:
    """Where the kind tier keeps its cached files (beside the binary cache)."""
    path = toolchain.cache_root().parent / "kind"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    """One progress line on stderr, flushed so `make` shows it at once."""
    print(f"[kind] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Engine:
    """`podman` or `docker`, with the environment each needs here."""

    name: str

    @property
    def is_podman(self) -> bool:
        return self.name == "podman"

    def env(self) -> dict[str, str]:
        """The environment for the engine and for kind (which picks its provider from it)."""
        env = dict(os.environ)
        if self.is_podman:
            conf = state_dir() / "containers.conf"
            if not conf.exists() or conf.read_text() != PODMAN_CONF:
                conf.write_text(PODMAN_CONF)
            env["CONTAINERS_CONF"] = str(conf)
            # The machine has a docker *client* on PATH, which makes kind pick docker otherwise.
            env["KIND_EXPERIMENTAL_PROVIDER"] = "podman"
        return env

    def run(
        self,
        *args: str,
        check: bool = True,
        capture: bool = True,
        timeout: float | None = None,
        stdin: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run one engine command; EngineError with its output when it fails and check is set."""
        proc = subprocess.run(
            [self.name, *args],
            env=self.env(),
            text=True,
            capture_output=capture,
            timeout=timeout,
            check=False,
            stdin=stdin,
        )
        if check and proc.returncode != 0:
            output = ((proc.stdout or "") + (proc.stderr or "")).strip()[-3000:]
            raise EngineError(f"{self.name} {' '.join(args[:4])} ... failed ({proc.returncode}):\n{output}")
        return proc

    def stream(self, args: Sequence[str]) -> None:
        """Run a long engine command with its output shown as it comes (builds)."""
        proc = subprocess.run([self.name, *args], env=self.env(), check=False)
        if proc.returncode != 0:
            raise EngineError(f"{self.name} {' '.join(args[:6])} ... failed ({proc.returncode})")

    def image_label(self, image: str, label: str) -> str | None:
        """A label of a local image, None when the image (or the label) is absent."""
        proc = self.run(
            "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', image, check=False
        )
        if proc.returncode != 0:
            return None
        value = proc.stdout.strip()
        return value if value and value != "<no value>" else None

    def image_id(self, image: str) -> str | None:
        """The ID of a local image, None when absent."""
        proc = self.run("image", "inspect", "--format", "{{.Id}}", image, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def image_size(self, image: str) -> int:
        """Uncompressed size of a local image in bytes."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


def docker_works() -> bool:
    """True when a Docker daemon answers (a docker client alone is not enough)."""
    if shutil.which("docker") is None:
        return False
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def install_podman() -> None:
    """Install podman and its helpers from Debian's packages (root on Debian only)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise EngineError(
            "no container engine: install Docker, or podman (Debian: apt-get install "
            + " ".join(PODMAN_PACKAGES)
            + "), then run again"
        )
    log("installing podman from Debian's packages ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PODMAN_PACKAGES],
    ):
        proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise EngineError(f"{' '.join(args[:3])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def detect() -> Engine:
    """$VLLM_OPERATOR_CONTAINER_ENGINE if set, else Docker if its daemon answers, else podman."""
    chosen = os.environ.get("VLLM_OPERATOR_CONTAINER_ENGINE", "")
    if chosen not in ("", "podman", "docker"):
        raise EngineError(f"VLLM_OPERATOR_CONTAINER_ENGINE={chosen!r}: use podman or docker")
    if chosen == "docker" or (not chosen and docker_works()):
        return Engine("docker")
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        install_podman()
    return Engine("podman")
