"""Fast checks of the harness's pure parts (no cluster, no Go build)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from devtools import pki, toolchain, versions
from devtools.cluster import GPU_RESOURCE, ClusterSpec, Ports, node_manifests
from devtools.processes import free_ports, is_running


def test_nodes_have_gpus_kwok_annotation_and_no_taint() -> None:
    """Two GPU nodes with 8 GPUs, one CPU node, all managed by kwok and untainted."""
    nodes = node_manifests(ClusterSpec())
    capacity = {n["metadata"]["name"]: n["status"]["capacity"] for n in nodes}
    assert capacity["kwok-gpu-0"][GPU_RESOURCE] == "8"
    assert capacity["kwok-gpu-1"][GPU_RESOURCE] == "8"
    assert GPU_RESOURCE not in capacity["kwok-cpu-0"]
    for node in nodes:
        assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
        assert node["metadata"]["labels"]["type"] == "kwok"
        assert "taints" not in node.get("spec", {})


def test_ports_are_distinct() -> None:
    """Every component gets its own port."""
    ports = list(vars(Ports.allocate()).values())
    assert len(set(ports)) == len(ports)
    assert len(set(free_ports(20))) == 20


def x509(cert: Path, *options: str) -> str:
    """What `openssl x509 -noout` prints of a certificate."""
    return subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", *options], check=True, capture_output=True, text=True
    ).stdout


def test_pki_chain_verifies(tmp_path: Path) -> None:
    """The serving and admin certs verify against the CA; admin is in system:masters."""
    made = pki.make_all(tmp_path, "10.96.0.0/16")
    assert made.exists()
    for cert in (made.serving_cert, made.admin_cert):
        subprocess.run(
            ["openssl", "verify", "-CAfile", str(made.ca_cert), str(cert)], check=True, capture_output=True
        )
    text = x509(made.serving_cert, "-text")
    assert "IP Address:10.96.0.1" in text and "IP Address:127.0.0.1" in text
    subject = x509(made.admin_cert, "-subject")
    assert "O = system:masters" in subject


def test_version_ldflags_stamp_the_pinned_version() -> None:
    """kube-apiserver gets gitVersion/gitMajor/gitMinor from versions.py."""
    flags = toolchain.version_ldflags("k8s.io/component-base/version", versions.KUBERNETES)
    assert f"-X k8s.io/component-base/version.gitVersion={versions.KUBERNETES}" in flags
    assert f"-X k8s.io/component-base/version.gitMinor={versions.kubernetes_minor()}" in flags


def test_wrapper_modules_match_versions() -> None:
    """The Go wrapper modules pin what versions.py says (the build checks this too)."""
    k8s = (toolchain.HARNESS_DIR / "k8s" / "go.mod").read_text()
    assert f"k8s.io/kubernetes {versions.KUBERNETES}" in k8s
    replaced = [line for line in k8s.splitlines() if "=>" in line]
    assert replaced and all(line.endswith(versions.KUBERNETES_STAGING) for line in replaced)
    etcd = (toolchain.HARNESS_DIR / "etcd" / "go.mod").read_text()
    assert f"go.etcd.io/etcd/server/v3 {versions.ETCD}" in etcd


def test_cache_dir_is_per_version_and_outside_the_repo() -> None:
    """Binaries live in ~/.cache/vllm-operator/bin/<name>-<version>/."""
    directory = toolchain.KUBERNETES.directory
    assert directory.name == f"kubernetes-{versions.KUBERNETES}"
    assert toolchain.HARNESS_DIR.parents[1] not in directory.parents


def test_is_running_sees_ourselves_only() -> None:
    """A live pid is running; a finished child is not."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not is_running(proc.pid)
    assert is_running(os.getpid())
