"""The chart in the local cluster: install, run the operator as its ServiceAccount, upgrade, uninstall.

kwok fakes pods, so the chart's own Deployment runs no image; the operator runs instead as a
local process with the Deployment's arguments and environment and a token of the chart's
ServiceAccount, which proves the RBAC is enough for its whole job (and no more). The router's
objects install too (its pod runs nothing either); its RBAC is checked with `kubectl auth can-i`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools.cluster import LocalCluster, condition, wait_until
from devtools.paths import CRD_NAME, REPO_ROOT
from tests.chart.release import Release, exists

pytestmark = pytest.mark.cluster

# Marks the model Deployments our operator made: another operator in the same session
# (the e2e tests' admin one) would use the default server image.
SERVER_IMAGE = "chart-test.invalid/vllm-server:sa"
# kwok's pods serve nothing: scraping would only report every pod unhealthy.
TEST_SETTINGS = (f"--set=settings.serverImage={SERVER_IMAGE}", "--set=settings.scrapeIntervalSeconds=0")
MODEL = "llama-8b"
# An RBAC refusal as the API server words it (quotes may be escaped in a logged JSON body).
DENIED = re.compile(r'cannot (\w+) resource \\?"([\w./]+)\\?"')
# kopf watches CRDs (to notice new ones) and, given namespaces, lists namespaces (to match
# patterns); refused, it logs and carries on. The chart grants neither: both are cluster-wide.
OPTIONAL_CALLS = {
    ("list", "customresourcedefinitions"),
    ("watch", "customresourcedefinitions"),
    ("list", "namespaces"),
    ("watch", "namespaces"),
}
READY_SECONDS = 60
# The router's reads: it watches the models and lists their pods (and may only patch a model's scale).
ROUTER_READS = (
    ("get", "vllmmodels.serving.vllm-operator.io"),
    ("list", "vllmmodels.serving.vllm-operator.io"),
    ("watch", "vllmmodels.serving.vllm-operator.io"),
    ("list", "pods"),
    ("watch", "pods"),
)
ROUTER_REFUSED = (
    ("create", "vllmmodels.serving.vllm-operator.io"),
    ("patch", "vllmmodels.serving.vllm-operator.io"),
    ("delete", "vllmmodels.serving.vllm-operator.io"),
    ("patch", "vllmmodels.serving.vllm-operator.io/status"),
    ("get", "pods"),
    ("delete", "pods"),
    ("get", "secrets"),
    ("list", "secrets"),
    ("create", "deployments"),
    ("create", "events"),
)


@pytest.fixture
def make_namespace(cluster: LocalCluster) -> Iterator[Callable[[], str]]:
    """Creates extra fresh namespaces on demand; deletes them afterwards."""
    made: list[str] = []

    def make() -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        cluster.kubectl("create", "namespace", name, check=True)
        made.append(name)
        return name

    yield make
    for name in made:
        cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def release(cluster: LocalCluster, namespace: str) -> Iterator[Release]:
    """The chart's release in a fresh namespace, uninstalled afterwards whatever happened."""
    installed = Release(cluster, namespace)
    yield installed
    installed.uninstall(check=False)


def example_model() -> dict[str, Any]:
    """examples/model.yaml without its HF token (the operator may not read Secrets anyway)."""
    model: dict[str, Any] = yaml.safe_load((REPO_ROOT / "examples" / "model.yaml").read_text())
    del model["spec"]["hfTokenSecretRef"]
    return model


def serve_example(cluster: LocalCluster, namespace: str) -> None:
    """Apply the example model and wait until the operator reports it Ready."""
    cluster.apply(example_model(), namespace=namespace)
    cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Ready", f"vllmmodel/{MODEL}", f"--timeout={READY_SECONDS}s",
        check=True, timeout=READY_SECONDS + 10,
    )  # fmt: skip


def assert_operator_did_its_job(cluster: LocalCluster, namespace: str) -> None:
    """Children applied with our settings, status written, Events posted."""
    deployment = cluster.get_json("deployment", MODEL, namespace=namespace)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == SERVER_IMAGE
    assert exists(cluster, "service", MODEL, namespace)
    status = cluster.get_json("vllmmodel", MODEL, namespace=namespace)["status"]
    assert status["phase"] == "Ready"
    assert status["endpoint"] == f"http://{MODEL}.{namespace}.svc:8000/v1"
    events = cluster.get_json("events", f"--field-selector=involvedObject.name={MODEL}", namespace=namespace)
    reasons = {e["reason"] for e in events["items"] if e.get("reportingComponent") == "vllm-operator"}
    assert "Created" in reasons, reasons


def router_name(release: Release) -> str:
    """The router's Deployment, Service, ServiceAccount and (Cluster)Role(Binding)s: <fullname>-router."""
    return f"{release.name}-router"


def router_can(release: Release, verb: str, resource: str, *scope: str) -> bool:
    """`kubectl auth can-i` as the router's ServiceAccount."""
    user = f"system:serviceaccount:{release.namespace}:{router_name(release)}"
    proc = release.cluster.kubectl("auth", "can-i", verb, resource, *scope, f"--as={user}")
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def assert_router_installed(release: Release) -> None:
    """The router's Deployment (kwok "runs" it), Service and own ServiceAccount are there."""
    cluster, name = release.cluster, router_name(release)
    deployment = cluster.get_json("deployment", name, namespace=release.namespace)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == name != release.service_account
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][0] == "router"
    service = cluster.get_json("service", name, namespace=release.namespace)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 8000)]
    assert exists(cluster, "serviceaccount", name, release.namespace)


def assert_router_reads_only(release: Release, *scope: str) -> None:
    """Within `scope`, the router may read models and list pods, and write nothing but a
    model's scale (to wake it from zero)."""
    for verb, resource in ROUTER_READS:
        assert router_can(release, verb, resource, *scope), (verb, resource, scope)
    for verb, resource in ROUTER_REFUSED:
        assert not router_can(release, verb, resource, *scope), (verb, resource, scope)
    models = "vllmmodels.serving.vllm-operator.io"
    assert router_can(release, "patch", models, "--subresource=scale", *scope)
    assert not router_can(release, "update", models, "--subresource=scale", *scope)
    assert not router_can(release, "patch", models, "--subresource=status", *scope)


def denied_calls(log: str) -> set[tuple[str, str]]:
    """(verb, resource) of every call the API server refused for lack of RBAC, from the log."""
    return set(DENIED.findall(log))


def assert_no_denied_calls(log: str) -> None:
    """Nothing was refused but kopf's cluster-wide discovery reads, which it can do without."""
    unexpected = denied_calls(log) - OPTIONAL_CALLS
    assert not unexpected, f"the operator was refused {sorted(unexpected)}"


def run_operator_and_serve(release: Release, model_namespace: str, tmp_path: Path) -> str:
    """Run the operator as the chart's ServiceAccount until the example model is Ready; its log."""
    operator = release.operator(release.token_kubeconfig(tmp_path / "operator.kubeconfig"))
    operator.start()
    try:
        serve_example(release.cluster, model_namespace)
        assert_operator_did_its_job(release.cluster, model_namespace)
    except Exception:
        print(operator.tail())
        raise
    finally:
        operator.stop()
    return operator.log.read_text(errors="replace")


def test_all_namespaces(release: Release, make_namespace: Callable[[], str], tmp_path: Path) -> None:
    notes = release.install(*TEST_SETTINGS).stdout
    assert "kubectl -n default apply -f examples/model.yaml" in notes
    router = router_name(release)
    assert f"http://{router}.{release.namespace}.svc:8000/v1" in notes
    cluster = release.cluster
    assert exists(cluster, "clusterrole", release.name)
    assert exists(cluster, "clusterrolebinding", release.name)
    assert release.deployment()["status"].get("readyReplicas") == 1  # kwok "runs" it
    assert_router_installed(release)
    assert exists(cluster, "clusterrole", router)
    assert exists(cluster, "clusterrolebinding", router)
    assert_router_reads_only(release, "--all-namespaces")

    model_namespace = make_namespace()
    assert_no_denied_calls(run_operator_and_serve(release, model_namespace, tmp_path))

    assert release.can("create", "deployments", "-n", make_namespace())
    assert not release.can("get", "secrets", "-n", model_namespace)
    assert not release.can("list", "secrets", "--all-namespaces")
    assert not release.can("delete", "deployments", "-n", model_namespace)
    assert not release.can("list", "namespaces")
    assert_router_reads_only(release, "-n", model_namespace)


def test_listed_namespaces_only(release: Release, make_namespace: Callable[[], str], tmp_path: Path) -> None:
    watched = [make_namespace(), make_namespace()]
    release.install(*TEST_SETTINGS, f"--set=watchNamespaces={{{','.join(watched)}}}")
    cluster = release.cluster
    assert not exists(cluster, "clusterrole", release.name)
    router = router_name(release)
    assert not exists(cluster, "clusterrole", router)
    for namespace in watched:
        assert exists(cluster, "role", release.name, namespace)
        assert exists(cluster, "rolebinding", release.name, namespace)
        assert exists(cluster, "role", router, namespace)
        assert exists(cluster, "rolebinding", router, namespace)
    assert_router_installed(release)
    assert_router_reads_only(release, "-n", watched[0])

    assert_no_denied_calls(run_operator_and_serve(release, watched[1], tmp_path))

    other = make_namespace()
    assert release.can("create", "deployments", "-n", watched[0])
    assert not release.can("create", "deployments", "-n", other)
    assert not release.can("create", "deployments", "-n", release.namespace)
    assert not release.can("list", "vllmmodels.serving.vllm-operator.io", "--all-namespaces")
    assert not release.can("get", "secrets", "-n", watched[0])
    assert not router_can(release, "list", "vllmmodels.serving.vllm-operator.io", "-n", other)
    assert not router_can(release, "list", "vllmmodels.serving.vllm-operator.io", "--all-namespaces")

    release.uninstall()
    for namespace in watched:
        for name in (release.name, router):
            assert not exists(cluster, "role", name, namespace)
            assert not exists(cluster, "rolebinding", name, namespace)


def operator_env(release: Release) -> dict[str, str]:
    """The environment of the installed operator Deployment."""
    container = release.deployment()["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: release.env_value(item) for item in container["env"]}


def test_upgrade_then_uninstall_keeps_the_crd(release: Release) -> None:
    release.install(*TEST_SETTINGS)
    assert operator_env(release)["VLLM_OPERATOR_SERVER_IMAGE"] == SERVER_IMAGE

    release.upgrade("--set=settings.serverImage=chart-test.invalid/vllm-server:v2")
    env = operator_env(release)
    assert env["VLLM_OPERATOR_SERVER_IMAGE"] == "chart-test.invalid/vllm-server:v2"
    assert env["VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS"] == "0"  # --reuse-values kept the rest
    history = json.loads(
        release.cluster.helm(
            "history", release.name, "-n", release.namespace, "-o", "json", check=True
        ).stdout
    )
    assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]

    release.uninstall()
    cluster = release.cluster
    for kind, scope in (
        ("deployment", release.namespace),
        ("serviceaccount", release.namespace),
        ("service", release.namespace),
        ("clusterrole", None),
        ("clusterrolebinding", None),
    ):
        name = f"{release.name}-metrics" if kind == "service" else release.name
        for left in (name, router_name(release)):
            assert not exists(cluster, kind, left, scope), f"{kind} {left} left behind"
    crd = cluster.get_json("crd", CRD_NAME)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def adapters_ready(cluster: LocalCluster, namespace: str) -> dict[str, Any]:
    return condition(cluster.get_json("vllmmodel", MODEL, namespace=namespace), "AdaptersReady")


def test_the_operator_creates_admin_token_secrets_and_never_reads_one(
    release: Release, make_namespace: Callable[[], str], tmp_path: Path
) -> None:
    # Scraping on: adapters are managed in scrape rounds (kwok's pods refuse the connections).
    release.install(f"--set=settings.serverImage={SERVER_IMAGE}", "--set=settings.scrapeIntervalSeconds=1")
    cluster, namespace = release.cluster, make_namespace()
    secret = ("create", "secret", "generic", "llama-key", "-n", namespace, "--from-literal=token=sk-chart")
    cluster.kubectl(*secret, check=True)
    model = example_model()
    model["spec"]["lora"] = {"adapters": [{"name": "sql", "source": "hf://org/sql-lora"}]}
    model["spec"]["apiKeySecretRef"] = {"name": "llama-key", "key": "token"}
    cluster.apply(model, namespace=namespace)
    assert release.can("create", "secrets", "-n", namespace)
    for verb in ("get", "list", "watch", "patch", "update", "delete"):
        assert not release.can(verb, "secrets", "-n", namespace), verb

    operator = release.operator(release.token_kubeconfig(tmp_path / "operator.kubeconfig"))
    assert len(operator_env(release)["VLLM_OPERATOR_ADMIN_KEY"]) >= 32  # generated by the chart
    operator.start()
    try:

        def admin_secrets() -> list[str]:
            listed = cluster.get_json("secrets", namespace=namespace)["items"]
            return [
                s["metadata"]["name"] for s in listed if s["metadata"]["name"].startswith(f"{MODEL}-admin-")
            ]

        wait_until(lambda: len(admin_secrets()) == 1, "the model's admin-token Secret", timeout=READY_SECONDS)
        # The operator holds the token itself; what is left is that kwok's pods serve nothing.
        wait_until(
            lambda: adapters_ready(cluster, namespace).get("reason") == "NoHealthyPods",
            "AdaptersReady to wait for pods",
            timeout=READY_SECONDS,
        )
        key_before = operator_env(release)["VLLM_OPERATOR_ADMIN_KEY"]
        release.upgrade("--set=verbose=true")
        assert operator_env(release)["VLLM_OPERATOR_ADMIN_KEY"] == key_before  # kept: no pod rolls
    except Exception:
        print(operator.tail())
        raise
    finally:
        operator.stop()
    log = operator.log.read_text(errors="replace")
    assert_no_denied_calls(log)
    assert "sk-chart" not in log
