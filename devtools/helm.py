"""Running helm on the chart offline: lint, template, and parsing what it renders."""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from devtools import toolchain
from devtools.paths import REPO_ROOT

CHART = REPO_ROOT / "charts" / "vllm-operator"
CHART_CRD = CHART / "files" / "crd.yaml"
RELEASE = "vllm"

Manifest = dict[str, Any]


def helm_env() -> dict[str, str]:
    """helm's state in a throwaway directory, so that offline runs touch nothing of the user's."""
    home = Path(tempfile.gettempdir()) / "vllm-operator-chart-tests"
    env = dict(os.environ)
    for kind in ("CACHE", "CONFIG", "DATA"):
        env[f"HELM_{kind}_HOME"] = str(home / kind.lower())
    env.pop("KUBECONFIG", None)
    return env


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm without a cluster; output captured, never raises on failure."""
    return subprocess.run(
        [str(toolchain.binary("helm")), *args],
        capture_output=True, text=True, env=helm_env(), timeout=120, check=False,
    )  # fmt: skip


def value_args(values: Sequence[str | Path] = (), sets: Sequence[str] = ()) -> list[str]:
    """`-f FILE` and `--set K=V` arguments."""
    args: list[str] = []
    for path in values:
        args += ["-f", str(path)]
    for assignment in sets:
        args += ["--set", assignment]
    return args


def template(
    values: Sequence[str | Path] = (), sets: Sequence[str] = (), namespace: str = "vllm-system"
) -> list[Manifest]:
    """The manifests `helm template` renders (raises with helm's message when it fails)."""
    proc = helm("template", RELEASE, str(CHART), "--namespace", namespace, *value_args(values, sets))
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(manifests: Sequence[Manifest], kind: str) -> list[Manifest]:
    """The manifests of one kind, in render order."""
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: Sequence[Manifest], kind: str) -> Manifest:
    """The single manifest of a kind (fails when there are none or several)."""
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """The operator container of the rendered Deployment."""
    containers: list[dict[str, Any]] = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(manifests: Sequence[Manifest]) -> dict[str, str]:
    """The operator container's environment as a dict, Secret references read from the rendered Secrets."""
    secrets = {m["metadata"]["name"]: m.get("data", {}) for m in manifests if m.get("kind") == "Secret"}
    env = {}
    for item in container(manifests).get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env
