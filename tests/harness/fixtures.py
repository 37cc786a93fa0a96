"""pytest fixtures for tests that need the local control plane.

Enable with `pytest_plugins = ["tests.harness.fixtures"]` in tests/conftest.py, and mark
such tests `@pytest.mark.cluster`. Set VLLM_OPERATOR_REUSE_CLUSTER=1 to use a cluster
already started with `make cluster-up` (it is then left running) when its spec matches.
Without it, the session cluster replaces any cluster running under `.local/`.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest

from devtools.cluster import (
    LOOPBACK_POD_CIDR,
    ClusterSpec,
    LocalCluster,
    explain_failure,
)


def reuse_requested() -> bool:
    """True when the developer asked to reuse a running cluster."""
    return os.environ.get("VLLM_OPERATOR_REUSE_CLUSTER", "") not in ("", "0", "false")


@pytest.fixture(scope="session")
def cluster_spec() -> ClusterSpec:
    """What the session cluster runs; override this fixture to change it.

    Pod IPs are loopback addresses (127.1.x.y) so tests can run real servers at pod IPs;
    VLLM_OPERATOR_POD_CIDR picks another range.
    """
    return ClusterSpec(pod_cidr=os.environ.get("VLLM_OPERATOR_POD_CIDR", LOOPBACK_POD_CIDR))


@pytest.fixture(scope="session")
def cluster(cluster_spec: ClusterSpec) -> Iterator[LocalCluster]:
    """A running control plane for the whole session, stopped (and wiped) at the end."""
    if reuse_requested():
        running = LocalCluster.load()
        healthy = running.status().get("readyz", "").endswith(" ok")
        if healthy and running.spec == cluster_spec:
            yield running
            return
    local = LocalCluster(spec=cluster_spec)
    try:
        local.start()
    except Exception as error:
        raise RuntimeError(explain_failure(local, error)) from error
    print(f"\n[harness] cluster up in {local.started_seconds:.1f}s", file=sys.stderr)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace per test (with its default ServiceAccount), deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")
