"""Fixtures for the operator's end-to-end tests: the CRD installed and the operator running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.cluster import LocalCluster
from devtools.operator_process import OperatorProcess, install_crd


@pytest.fixture(scope="session")
def crd(cluster: LocalCluster) -> LocalCluster:
    install_crd(cluster)
    return cluster


@pytest.fixture(scope="session")
def operator(crd: LocalCluster) -> Iterator[OperatorProcess]:
    process = OperatorProcess(crd)
    process.start()
    yield process
    process.stop()
