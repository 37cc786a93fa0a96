"""`bench --model-ref NS/NAME` reads the endpoint and model name from a VLLMModel on a real API server."""

from __future__ import annotations

import json

import pytest

from devtools.cluster import LocalCluster
from devtools.operator_process import install_crd
from devtools.realserver import RealServer
from tests.client.conftest import API_KEY
from vllm_operator.cli import main

pytestmark = [pytest.mark.cluster, pytest.mark.engine]


def test_bench_load_by_model_ref(
    cluster: LocalCluster,
    namespace: str,
    client_server: RealServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    install_crd(cluster)
    model = {
        "apiVersion": "serving.vllm-operator.io/v1alpha1",
        "kind": "VLLMModel",
        "metadata": {"name": "bench-target", "namespace": namespace},
        "spec": {"model": "/models/tiny", "servedModelName": "tiny"},
    }
    cluster.apply(model)
    # No operator here: write the status a ready model would have, pointing at the real server.
    status = {"status": {"phase": "Ready", "endpoint": f"{client_server.url}/v1"}}
    cluster.kubectl(
        "patch",
        "vllmmodel",
        "bench-target",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
        check=True,
    )
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    code = main(
        [
            "bench",
            "load",
            "--model-ref",
            f"{namespace}/bench-target",
            "--api-key",
            API_KEY,
            "--requests",
            "4",
            "--max-tokens",
            "4",
            "--json",
            "--no-progress",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["completed"] == 4

    missing = main(["bench", "check", "--model-ref", f"{namespace}/nope"])
    assert missing == 2 and "nope" in capsys.readouterr().err
