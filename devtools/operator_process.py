"""The operator as a real process against the local cluster, the way a user runs it."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request

from devtools.cluster import LocalCluster, wait_until
from devtools.paths import CRD_FILE, CRD_NAME, REPO_ROOT
from devtools.processes import free_ports
from vllm_operator import render
from vllm_operator.settings import OperatorSettings


def install_crd(cluster: LocalCluster) -> None:
    """Apply the generated CRD and wait until the API server serves it."""
    # Forced: an earlier test may have installed it through the Helm chart.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE), check=True)
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        f"crd/{CRD_NAME}",
        "--timeout=60s",
        check=True,
    )


ADMIN_KEY = "e2e-admin-key"


def admin_token(namespace: str, name: str, uid: str) -> str:
    """The adapter admin token the test operator gives a LoRA model's pods (render.admin_token)."""
    settings = OperatorSettings(admin_key=ADMIN_KEY)
    return render.admin_token(render.ModelRef(name, namespace, uid), settings)


class OperatorProcess:
    """`python -m vllm_operator run --all-namespaces` with its log under .local/."""

    def __init__(
        self,
        cluster: LocalCluster,
        log_name: str = "operator.log",
        env: dict[str, str] | None = None,
        namespaces: tuple[str, ...] = (),
    ) -> None:
        self.cluster = cluster
        self.extra_env = env or {}
        self.namespaces = namespaces
        self.log = cluster.root / log_name
        self.port, self.metrics_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def liveness(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    def start(self) -> None:
        # kwok's pods run no server: unless a test starts real ones, scraping would only
        # report every pod unhealthy.
        env = {
            **self.cluster.env(),
            "PYTHONUNBUFFERED": "1",
            "VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS": "0",
            # Fixed, so that tests can give the servers they start each model's admin token.
            "VLLM_OPERATOR_ADMIN_KEY": ADMIN_KEY,
            **self.extra_env,
        }
        scope = [f"--namespace={ns}" for ns in self.namespaces] or ["--all-namespaces"]
        with self.log.open("ab") as log:
            argv = [sys.executable, "-m", "vllm_operator", "run", *scope, "--liveness", self.liveness]
            argv += ["--metrics-port", str(self.metrics_port)]
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        wait_until(self.healthy, "operator liveness endpoint", timeout=60)

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"operator exited; log:\n{self.tail()}")
        try:
            with urllib.request.urlopen(self.liveness, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """Stop at once, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
