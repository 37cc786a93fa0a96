"""Fixtures for the operator's end-to-end tests: the CRD installed and the operator running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.operator_process import OperatorProcess, install_crd
from tests.harness.cluster import LocalCluster


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
