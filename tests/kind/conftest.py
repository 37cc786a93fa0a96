"""The kind tier: pods that really run the project's images (marker `kind`).

One kind cluster for the whole folder, created by pytest-kind's `kind_cluster` fixture from
the node image assembled here (tests/harness/kind), with the operator installed in-cluster by
its Helm chart and the tiny model on a `pvc://model-store` volume. The cluster, the kind
network and the host settings it changed are removed at the end, and before the start when a
killed run left them behind.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools import toolchain
from devtools.cluster import DEFAULT_ROOT, kubectl_binary
from devtools.kind import cluster as kind_cluster
from devtools.kind import engine as kind_engine
from devtools.kind import images, stack

NAMESPACE = "kind-e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kind)


@pytest.fixture(scope="session")
def kind_env(
    request: pytest.FixtureRequest, tiny_model: Path, tiny_lora: Path
) -> Iterator[kind_cluster.KindCluster]:
    """The test kind cluster, ready for models in NAMESPACE."""
    engine = kind_engine.detect()
    removed = kind_cluster.clean(engine)
    if removed:
        print(f"\n[kind] removed what an earlier run left: {', '.join(removed)}", file=sys.stderr)
    started = time.monotonic()
    toolchain.ensure_all(toolchain.ALL_COMPONENTS)
    images.ensure_node_image(engine)
    images.ensure_project_images(engine)
    built = time.monotonic() - started
    # pytest-kind runs kind with this process's environment and our binaries (it would
    # download kind v0.17 and kubectl v1.25 otherwise, which cannot be reached here).
    os.environ.update(
        {
            key: value
            for key, value in engine.env().items()
            if key in ("CONTAINERS_CONF", "KIND_EXPERIMENTAL_PROVIDER")
        }
    )
    options = request.config.option
    options.kind_bin = str(kind_cluster.kind_binary())
    options.kind_kubectl_bin = kubectl_binary()
    options.kind_image = images.NODE_IMAGE
    options.cluster_name = kind_cluster.TEST_CLUSTER
    kind_cluster.save_host_sysctls()
    request.addfinalizer(lambda: print(f"\n[kind] teardown: {kind_cluster.clean(engine)}", file=sys.stderr))
    step = time.monotonic()
    created = request.getfixturevalue("kind_cluster")
    cluster = kind_cluster.KindCluster(
        engine, kind_cluster.TEST_CLUSTER, Path(created.kubeconfig_path), DEFAULT_ROOT / "kind-test"
    )
    create_seconds = time.monotonic() - step
    cluster.create_namespace(NAMESPACE)
    figures = stack.prepare(cluster, {"tiny": tiny_model, "tiny-lora": tiny_lora}, NAMESPACE)
    print(
        f"\n[kind] images {built:.0f}s, kind create {create_seconds:.0f}s, "
        + ", ".join(f"{k} {v}s" for k, v in figures.items()),
        file=sys.stderr,
    )
    yield cluster
