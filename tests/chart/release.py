"""A release of the chart in the local cluster, and the operator run as its ServiceAccount."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devtools.cluster import LocalCluster
from devtools.helm import CHART
from devtools.operator_process import OperatorProcess
from devtools.paths import CRD_NAME

# Release name = chart name, so every resource is simply called vllm-operator.
RELEASE = "vllm-operator"


@dataclass
class Release:
    """`helm install/upgrade/uninstall` of the chart, and what it installed."""

    cluster: LocalCluster
    namespace: str
    name: str = RELEASE

    @property
    def service_account(self) -> str:
        """The ServiceAccount the chart made for the operator."""
        return self.name

    @property
    def user(self) -> str:
        """The service account's user name, for `kubectl --as`."""
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"

    def helm(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`helm COMMAND RELEASE CHART -n NS ...`, failing with helm's output."""
        return self.cluster.helm(
            command, self.name, str(CHART), "-n", self.namespace, "--wait", "--timeout=120s", *args,
            check=True,
        )  # fmt: skip

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Install the chart (taking over a CRD an earlier release or `kubectl apply` left)."""
        adopt_crd(self.cluster, self.name, self.namespace)
        return self.helm("install", *args)

    def upgrade(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Upgrade with the previous values plus `args`."""
        return self.helm("upgrade", "--reuse-values", *args)

    def uninstall(self, check: bool = True) -> None:
        """Uninstall the release."""
        self.cluster.helm("uninstall", self.name, "-n", self.namespace, "--wait", check=check)

    def deployment(self) -> dict[str, Any]:
        """The operator Deployment the chart installed."""
        deployment: dict[str, Any] = self.cluster.get_json("deployment", self.name, namespace=self.namespace)
        return deployment

    def can(self, verb: str, resource: str, *scope: str) -> bool:
        """`kubectl auth can-i` as the operator's ServiceAccount."""
        proc = self.cluster.kubectl("auth", "can-i", verb, resource, *scope, f"--as={self.user}")
        assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
        return proc.stdout.strip() == "yes"

    def token_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig that authenticates as the operator's ServiceAccount (a bound token)."""
        token = self.cluster.kubectl(
            "create", "token", self.service_account, "-n", self.namespace, "--duration=1h", check=True
        ).stdout.strip()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": self.cluster.server, "certificate-authority": str(self.cluster.pki.ca_cert)}}],
            "users": [{"name": self.service_account, "user": {"token": token}}],
            "contexts": [{"name": "operator", "context": {"cluster": "local", "user": self.service_account}}],
            "current-context": "operator",
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def operator(self, kubeconfig: Path) -> OperatorProcess:
        """The operator as a process with the Deployment's own arguments and environment."""
        container = self.deployment()["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: self.env_value(item) for item in container.get("env", [])}
        namespaces = tuple(a.split("=", 1)[1] for a in container["args"] if a.startswith("--namespace="))
        env["KUBECONFIG"] = str(kubeconfig)
        return OperatorProcess(
            self.cluster, log_name=f"chart-operator-{self.namespace}.log", env=env, namespaces=namespaces
        )

    def env_value(self, item: dict[str, Any]) -> str:
        """An env entry's value, reading a secretKeyRef the way the kubelet would."""
        if "value" in item:
            return str(item["value"])
        ref = item["valueFrom"]["secretKeyRef"]
        secret = self.cluster.get_json("secret", ref["name"], namespace=self.namespace)
        return base64.b64decode(secret["data"][ref["key"]]).decode()


def adopt_crd(cluster: LocalCluster, release: str, namespace: str) -> None:
    """Mark an existing CRD as this release's, as Helm requires to take it over."""
    if cluster.kubectl("get", "crd", CRD_NAME).returncode != 0:
        return
    cluster.kubectl("label", "--overwrite", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", check=True)
    cluster.kubectl(
        "annotate", "--overwrite", "crd", CRD_NAME,
        f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}",
        check=True,
    )  # fmt: skip


def exists(cluster: LocalCluster, kind: str, name: str, namespace: str | None = None) -> bool:
    """True when the object is there."""
    scope = ["-n", namespace] if namespace else []
    return cluster.kubectl("get", kind, name, *scope).returncode == 0
