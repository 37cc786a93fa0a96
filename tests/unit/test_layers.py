"""The layers stay honest: pure modules import no kopf or client, only `k8s` talks to the API."""

from __future__ import annotations

import ast

import pytest

from tests.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "operator" / "vllm_operator"
PURE = ["api", "render", "status", "settings", "crd", "docs", "reconcile", "throughput", "lora"]
FORBIDDEN_IN_PURE = {
    "kopf",
    "kubernetes",
    "urllib3",
    "httpx",
    "requests",
    "vllm_operator.k8s",
    "vllm_operator.handlers",
}
API_CLIENTS = {"kubernetes", "kopf"}
MAY_USE_CLIENT = {"k8s", "handlers", "controller", "cli"}


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def top(names: set[str]) -> set[str]:
    return names | {n.split(".")[0] for n in names}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_client(module: str) -> None:
    assert not top(imports(module)) & FORBIDDEN_IN_PURE


def test_only_edges_import_a_client() -> None:
    modules = [p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")]
    offenders = [m for m in modules if m not in MAY_USE_CLIENT and top(imports(m)) & API_CLIENTS]
    assert offenders == []


def test_only_k8s_calls_the_api() -> None:
    """The controller may name client exceptions, but only `k8s` builds API objects."""
    for module in MAY_USE_CLIENT - {"k8s"}:
        source = (PACKAGE / f"{module}.py").read_text()
        for call in ("CoreV1Api", "AppsV1Api", "CustomObjectsApi", "ApiClient("):
            assert call not in source, f"{module} uses {call}"
