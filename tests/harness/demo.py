"""`make demo`: local cluster, CRD, operator, examples/model.yaml, wait for Ready, show it."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.e2e.operator_process import OperatorProcess, install_crd
from tests.harness.cluster import DEFAULT_ROOT, LocalCluster, explain_failure
from tests.paths import REPO_ROOT

PID_FILE = DEFAULT_ROOT / "operator.pid"


def running_cluster() -> LocalCluster:
    """The cluster from `make cluster-up` if it answers, else a new one."""
    cluster = LocalCluster.load()
    if cluster.status().get("readyz", "").endswith(" ok"):
        print(f"== reusing the running cluster at {cluster.server}")
        return cluster
    print("== starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)")
    cluster = LocalCluster()
    cluster.start()
    print(f"   up in {cluster.started_seconds:.1f}s")
    return cluster


def stop_operator() -> None:
    """Stop an operator left running by an earlier demo."""
    if PID_FILE.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(PID_FILE.read_text()), signal.SIGTERM)
        PID_FILE.unlink()


def up(example: Path, timeout: int) -> int:
    cluster = running_cluster()
    print("== installing the CRD")
    install_crd(cluster)
    stop_operator()
    print("== starting the operator (log: .local/operator.log)")
    operator = OperatorProcess(cluster)
    operator.start()
    PID_FILE.write_text(str(operator.pid))
    print(f"== kubectl apply -f {example.relative_to(REPO_ROOT)}")
    print(cluster.kubectl("apply", "-f", str(example), check=True).stdout.strip())
    name = cluster.kubectl("get", "-f", str(example), "-o", "name", check=True).stdout.strip()
    print(f"== kubectl wait --for=condition=Ready {name}")
    waited = cluster.kubectl(
        "wait", "--for=condition=Ready", name, f"--timeout={timeout}s", timeout=timeout + 10
    )
    print((waited.stdout + waited.stderr).strip())
    print("== kubectl get vllmmodels,deployments,services,pods")
    print(cluster.kubectl("get", "vllmmodels,deployments,services,pods", "-o", "wide").stdout)
    print(f"export KUBECONFIG={cluster.kubeconfig}   # to look around; `make demo-down` stops everything")
    return waited.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["up", "down"], nargs="?", default="up")
    parser.add_argument("--example", type=Path, default=REPO_ROOT / "examples" / "model.yaml")
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args(argv)
    if args.command == "down":
        stop_operator()
        LocalCluster.load().stop()
        print("demo down: operator and cluster stopped")
        return 0
    try:
        return up(args.example.resolve(), args.timeout)
    except Exception as error:
        print(f"demo FAILED: {explain_failure(LocalCluster.load(), error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
