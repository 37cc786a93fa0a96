"""The chart offline: lint, render with several value sets, validate, refuse bad values."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import kubeschema, values_doc
from devtools.helm import (
    CHART,
    CHART_CRD,
    Manifest,
    by_kind,
    container,
    env_of,
    helm,
    one,
    template,
)
from devtools.paths import CRD_FILE, REPO_ROOT
from vllm_operator import cli
from vllm_operator.settings import ENV_PREFIX, OperatorSettings

# Kinds the pinned Kubernetes schemas do not describe (the Prometheus Operator's CRD).
NOT_BUILT_IN = {"ServiceMonitor"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "servicemonitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "no-crd": {"crds": {"install": False}},
    "custom": {
        "image": {"repository": "registry.example/vllm-operator", "tag": "dev", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "settings": {
            "serverImage": "registry.example/vllm-server:dev",
            "defaultResources": {"requests": {"cpu": "4", "memory": "32Gi"}},
            "scrapeIntervalSeconds": 0,
        },
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/team": "ml"},
        "verbose": True,
        "serviceAccount": {"name": "ops", "annotations": {"example.com/role": "x"}},
        "crds": {"keep": False},
    },
    "router-off": {"router": {"enabled": False}},
    "router-custom": {
        "watchNamespaces": ["team-a"],
        "imagePullSecrets": [{"name": "regcred"}],
        "router": {
            "replicas": 3,
            "port": 8080,
            "selector": "tier in (public,beta),!internal",
            "verbose": True,
            "graceSeconds": 120,
            "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
            "serviceAccount": {"name": "router-sa", "annotations": {"example.com/role": "r"}},
            "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
            "podAnnotations": {"example.com/team": "edge"},
            "podLabels": {"example.com/tier": "edge"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "priorityClassName": "edge",
        },
    },
}


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    """A values file holding `values`."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tmp_path: Path, values: dict[str, Any]) -> list[Manifest]:
    """The chart rendered with `values` over the defaults."""
    return template([values_file(tmp_path, values)])


COMPONENT = "app.kubernetes.io/component"


def of(component: str, manifests: list[Manifest]) -> list[Manifest]:
    """The manifests of one component of the chart: `operator` (and the CRD) or `router`."""
    return [m for m in manifests if m["metadata"].get("labels", {}).get(COMPONENT) == component]


def operator_objects(manifests: list[Manifest]) -> list[Manifest]:
    """The operator's manifests (the router's are left out)."""
    return of("operator", manifests)


def router_objects(manifests: list[Manifest]) -> list[Manifest]:
    """The router's manifests."""
    return of("router", manifests)


def router_container(manifests: list[Manifest]) -> dict[str, Any]:
    """The router container of the rendered router Deployment."""
    containers: list[dict[str, Any]] = one(router_objects(manifests), "Deployment")["spec"]["template"][
        "spec"
    ]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_lint_strict() -> None:
    proc = helm("lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict_with_values(tmp_path: Path, name: str) -> None:
    proc = helm("lint", "--strict", str(CHART), "-f", str(values_file(tmp_path, VALUE_SETS[name])))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(tmp_path: Path, name: str) -> None:
    manifests = render(tmp_path, VALUE_SETS[name])
    for manifest in manifests:
        if manifest["kind"] not in NOT_BUILT_IN:
            kubeschema.validate(manifest)
    assert one(operator_objects(manifests), "Deployment")
    assert len(operator_objects(manifests)) + len(router_objects(manifests)) == len(manifests), "unlabelled"


def test_one_resource_kind_per_template() -> None:
    for path in (CHART / "templates").glob("*.yaml"):
        kinds = set(re.findall(r"^kind: (\w+)", path.read_text(), flags=re.MULTILINE))
        assert len(kinds) <= 1, f"{path.name} renders {kinds}"


def test_operator_deployment_is_single_recreate(tmp_path: Path) -> None:
    spec = one(operator_objects(render(tmp_path, {})), "Deployment")["spec"]
    assert (spec["replicas"], spec["strategy"]) == (1, {"type": "Recreate"})


@pytest.mark.parametrize("component", ["operator", "router"])
def test_pods_are_restricted(tmp_path: Path, component: str) -> None:
    manifests = of(component, render(tmp_path, {}))
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (only,) = pod["containers"]
    security = only["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # The root filesystem is read-only: a scratch /tmp.
    assert only["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]


def test_probes_and_ports(tmp_path: Path) -> None:
    operator = container(operator_objects(render(tmp_path, {})))
    assert "--liveness=http://0.0.0.0:8080/healthz" in operator["args"]
    assert "--metrics-port=9090" in operator["args"]
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}


def test_defaults_watch_every_namespace_with_a_cluster_role(tmp_path: Path) -> None:
    manifests = operator_objects(render(tmp_path, {}))
    assert container(manifests)["args"][:2] == ["run", "--all-namespaces"]
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(manifests, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert not by_kind(manifests, "Role") and not by_kind(manifests, "RoleBinding")


def test_namespaced_scope_gets_a_role_per_namespace(tmp_path: Path) -> None:
    manifests = operator_objects(render(tmp_path, VALUE_SETS["namespaced"]))
    args = container(manifests)["args"]
    assert "--all-namespaces" not in args
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=team-a", "--namespace=team-b"]
    assert [r["metadata"]["namespace"] for r in by_kind(manifests, "Role")] == ["team-a", "team-b"]
    bindings = by_kind(manifests, "RoleBinding")
    assert [b["metadata"]["namespace"] for b in bindings] == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == "vllm-system" for b in bindings)
    assert not by_kind(manifests, "ClusterRole") and not by_kind(manifests, "ClusterRoleBinding")


def rules(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """The rules of the (Cluster)Roles, all of them."""
    roles = by_kind(manifests, "ClusterRole") + by_kind(manifests, "Role")
    return [rule for role in roles for rule in role["rules"]]


# Exactly what the operator calls; tests/chart/test_install.py runs it with these and no more.
EXPECTED_RULES = [
    {"apiGroups": ["serving.vllm-operator.io"], "resources": ["vllmmodels"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["serving.vllm-operator.io"], "resources": ["vllmmodels/status"], "verbs": ["patch"]},
    {"apiGroups": ["serving.vllm-operator.io"], "resources": ["vllmmodels/scale"], "verbs": ["patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
]  # fmt: skip


def test_rbac_rules_are_exactly_what_the_operator_uses(tmp_path: Path) -> None:
    assert one(operator_objects(render(tmp_path, {})), "ClusterRole")["rules"] == EXPECTED_RULES
    roles = by_kind(operator_objects(render(tmp_path, VALUE_SETS["namespaced"])), "Role")
    assert len(roles) == 2
    for role in roles:
        assert role["rules"] == EXPECTED_RULES


@pytest.mark.parametrize("name", ["defaults", "namespaced", "router-custom"])
def test_rbac_grants_only_create_on_secrets_and_no_wildcards(tmp_path: Path, name: str) -> None:
    for rule in rules(render(tmp_path, VALUE_SETS[name])):
        if "secrets" in rule["resources"]:
            assert rule == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
        assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"]
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_rbac_can_be_left_to_the_user(tmp_path: Path) -> None:
    manifests = render(tmp_path, {"rbac": {"create": False}})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & {m["kind"] for m in manifests}


def test_custom_values_reach_the_deployment(tmp_path: Path) -> None:
    manifests = operator_objects(render(tmp_path, VALUE_SETS["custom"]))
    pod = one(manifests, "Deployment")["spec"]["template"]
    operator = container(manifests)
    assert operator["image"] == "registry.example/vllm-operator:dev"
    assert operator["imagePullPolicy"] == "Always"
    assert operator["resources"] == VALUE_SETS["custom"]["resources"]
    assert "--verbose" in operator["args"]
    assert pod["metadata"]["annotations"] == {"example.com/team": "ml"}
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["serviceAccountName"] == "ops"
    assert one(manifests, "ServiceAccount")["metadata"]["name"] == "ops"


def test_image_tag_defaults_to_app_version(tmp_path: Path) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    image = f"ghcr.io/vllm-operator/vllm-operator:{app_version}"
    manifests = render(tmp_path, {})
    assert container(operator_objects(manifests))["image"] == image
    assert router_container(manifests)["image"] == image


def test_settings_env_is_what_the_operator_reads(tmp_path: Path) -> None:
    """The env the chart renders, read back by the operator, gives the settings of the values."""
    env = env_of(operator_objects(render(tmp_path, VALUE_SETS["custom"])))
    settings = OperatorSettings.from_env(env)
    assert settings.server_image == "registry.example/vllm-server:dev"
    assert settings.default_resources == {"requests": {"cpu": "4", "memory": "32Gi"}}
    assert settings.scrape_interval_seconds == 0
    assert json.loads(env["VLLM_OPERATOR_DEFAULT_RESOURCES"]) == settings.default_resources


def camel(name: str) -> str:
    """snake_case -> camelCase."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def test_values_settings_match_the_operator_defaults() -> None:
    """Every operator setting is a value, with the operator's own default (no drift)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    expected = {
        camel(name): field.get_default(call_default_factory=True)
        for name, field in OperatorSettings.model_fields.items()
        # admin_key and router_token: a generated Secret (templates/admin-key.yaml);
        # router_url: the router's Service.
        if name not in ("admin_key", "router_token", "router_url")
    }
    assert values == expected


def test_default_env_covers_every_setting(tmp_path: Path) -> None:
    env = env_of(operator_objects(render(tmp_path, {})))
    assert set(env) == {ENV_PREFIX + name.upper() for name in OperatorSettings.model_fields}
    key = env[ENV_PREFIX + "ADMIN_KEY"]
    again = env_of(operator_objects(render(tmp_path, {})))
    assert len(key) == 48 and key != again[ENV_PREFIX + "ADMIN_KEY"]  # random
    router = "http://vllm-vllm-operator-router.vllm-system.svc:8000"
    token = env[ENV_PREFIX + "ROUTER_TOKEN"]
    assert len(token) == 48 and token != key
    assert OperatorSettings.from_env(env) == OperatorSettings(
        admin_key=key, router_url=router, router_token=token
    )


def test_the_operator_reads_the_routers_view_only_when_there_is_a_router(tmp_path: Path) -> None:
    values = {"router": {"enabled": True, "port": 8100}, "settings": {"clusterDomain": "svc.example"}}
    env = env_of(operator_objects(render(tmp_path, values)))
    assert env[ENV_PREFIX + "ROUTER_URL"] == "http://vllm-vllm-operator-router.vllm-system.svc.example:8100"
    assert ENV_PREFIX + "ROUTER_URL" not in env_of(
        operator_objects(render(tmp_path, {"router": {"enabled": False}}))
    )


def test_metrics_service_and_service_monitor(tmp_path: Path) -> None:
    assert not by_kind(render(tmp_path, {}), "ServiceMonitor")
    everything = render(tmp_path, VALUE_SETS["servicemonitor"])
    manifests = operator_objects(everything)
    service = one(manifests, "Service")
    port = {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    assert service["spec"]["ports"] == [port]
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # Neither the metrics Service nor the ServiceMonitor picks up the router's pods or Service.
    router = router_objects(everything)
    router_pod_labels = one(router, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= router_pod_labels.items()
    router_service_labels = one(router, "Service")["metadata"]["labels"]
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= router_service_labels.items()


# The router: `vllm-operator router` from the operator's image, one OpenAI endpoint for every model.


def kinds(manifests: list[Manifest]) -> Counter[str]:
    """How many manifests of each kind."""
    return Counter(m["kind"] for m in manifests)


ROUTER_KINDS: dict[str, tuple[dict[str, Any], dict[str, int]]] = {
    "defaults": (
        {},
        {"Deployment": 1, "Service": 1, "ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1},
    ),
    "namespaced": (
        VALUE_SETS["namespaced"],
        {"Deployment": 1, "Service": 1, "ServiceAccount": 1, "Role": 2, "RoleBinding": 2},
    ),
    "no rbac": ({"rbac": {"create": False}}, {"Deployment": 1, "Service": 1, "ServiceAccount": 1}),
    "existing service account": (
        {"router": {"serviceAccount": {"create": False, "name": "mine"}}},
        {"Deployment": 1, "Service": 1, "ClusterRole": 1, "ClusterRoleBinding": 1},
    ),
    "disabled": (VALUE_SETS["router-off"], {}),
    "disabled, namespaced": ({**VALUE_SETS["namespaced"], **VALUE_SETS["router-off"]}, {}),
}


@pytest.mark.parametrize("case", ROUTER_KINDS)
def test_router_objects_follow_enabled_and_the_watch_scope(tmp_path: Path, case: str) -> None:
    values, expected = ROUTER_KINDS[case]
    manifests = render(tmp_path, values)
    assert kinds(router_objects(manifests)) == expected
    assert not [m for m in operator_objects(manifests) if "router" in m["metadata"]["name"]]
    # The operator's objects are the same whether the router is there or not.
    without_router = render(tmp_path, {**values, "router": {"enabled": False}})
    assert kinds(operator_objects(manifests)) == kinds(operator_objects(without_router))


# The router watches models and their pods; its one write is a model's scale (waking it from
# zero for the requests it holds), and it reads no Secret.
EXPECTED_ROUTER_RULES = [
    {"apiGroups": ["serving.vllm-operator.io"], "resources": ["vllmmodels"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["serving.vllm-operator.io"], "resources": ["vllmmodels/scale"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "role_kind", "namespaces"),
    [("defaults", "ClusterRole", [None]), ("namespaced", "Role", ["team-a", "team-b"])],
)
def test_router_rbac_reads_and_only_scales_and_is_scoped_like_the_operators(
    tmp_path: Path, name: str, role_kind: str, namespaces: list[str | None]
) -> None:
    manifests = render(tmp_path, VALUE_SETS[name])
    router, operator = router_objects(manifests), operator_objects(manifests)
    roles, bindings = by_kind(router, role_kind), by_kind(router, f"{role_kind}Binding")
    assert [r["metadata"].get("namespace") for r in roles] == namespaces
    assert [r["metadata"].get("namespace") for r in by_kind(operator, role_kind)] == namespaces
    account = one(router, "ServiceAccount")["metadata"]["name"]
    assert account != one(operator, "ServiceAccount")["metadata"]["name"]
    assert one(router, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account
    for role in roles:
        assert role["rules"] == EXPECTED_ROUTER_RULES
        for rule in role["rules"]:
            writes = set(rule["verbs"]) - {"get", "list", "watch"}
            assert not writes or (rule["resources"] == ["vllmmodels/scale"] and writes == {"patch"})
            assert "secrets" not in rule["resources"]
    for role, binding in zip(roles, bindings, strict=True):
        assert binding["metadata"].get("namespace") == role["metadata"].get("namespace")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role["metadata"]["name"]
        }  # fmt: skip
        subject = {"kind": "ServiceAccount", "name": account, "namespace": "vllm-system"}
        assert binding["subjects"] == [subject]


# Where the router listens and how long it drains, by default.
LISTEN = ["--host=0.0.0.0", "--port=8000", "--grace-seconds=30"]
ROUTER_ARGS = [
    ("defaults", {}, ["router", "--all-namespaces", *LISTEN]),
    ("namespaces", VALUE_SETS["namespaced"], ["router", "--namespace=team-a", "--namespace=team-b", *LISTEN]),
    (
        "selector",
        {"router": {"selector": "tier in (public,beta),!internal"}},
        ["router", "--all-namespaces", "--selector=tier in (public,beta),!internal", *LISTEN],
    ),
    (
        "everything",
        VALUE_SETS["router-custom"],
        ["router", "--namespace=team-a", "--selector=tier in (public,beta),!internal", "--host=0.0.0.0",
         "--port=8080", "--grace-seconds=120", "--verbose"],
    ),
    # The operator's own --verbose is not the router's.
    ("operator verbose", {"verbose": True}, ["router", "--all-namespaces", *LISTEN]),
]  # fmt: skip


@pytest.mark.parametrize(("what", "values", "args"), ROUTER_ARGS, ids=[what for what, _, _ in ROUTER_ARGS])
def test_router_args(tmp_path: Path, what: str, values: dict[str, Any], args: list[str]) -> None:
    manifests = render(tmp_path, values)
    assert router_container(manifests)["args"] == args
    # Exactly the namespaces the operator watches.
    scope = [a for a in container(operator_objects(manifests))["args"] if a.startswith("--namespace")]
    assert [a for a in args if a.startswith("--namespace")] == scope
    assert ("--all-namespaces" in args) == (not scope)
    # The router's own command line reads them as meant.
    parsed = cli.parser().parse_args(args)
    assert parsed.func is cli.cmd_router
    assert parsed.namespace == [a.split("=", 1)[1] for a in scope]
    assert parsed.all_namespaces == (not scope)
    assert parsed.selector == values.get("router", {}).get("selector", "")
    assert parsed.upstream == []


@pytest.mark.parametrize(("values", "port"), [({}, 8000), ({"router": {"port": 8080}}, 8080)])
def test_router_probes_ports_and_service(tmp_path: Path, values: dict[str, Any], port: int) -> None:
    manifests = render(tmp_path, values)
    router = router_container(manifests)
    assert router["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert router["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert router["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # SIGKILL comes after the pre-stop pause and the drain (--grace-seconds=30), not during them.
    assert router["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    pod = one(router_objects(manifests), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 30 + 10
    service = one(router_objects(manifests), "Service")
    assert service["metadata"]["name"] == "vllm-vllm-operator-router"  # <fullname>-router
    assert service["spec"]["type"] == "ClusterIP"
    service_port = {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}
    assert service["spec"]["ports"] == [service_port]
    pod_labels = one(router_objects(manifests), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_router_and_operator_never_select_each_others_pods(tmp_path: Path) -> None:
    manifests = render(tmp_path, {})
    operator, router = (one(of(c, manifests), "Deployment") for c in ("operator", "router"))
    for selecting, other in ((operator, router), (router, operator)):
        selector = selecting["spec"]["selector"]["matchLabels"]
        assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()


def test_router_shares_the_operators_image_and_security(tmp_path: Path) -> None:
    values = {
        "image": {"repository": "registry.example/vllm-operator", "tag": "dev", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 2000, "fsGroup": 2000},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 2000, "readOnlyRootFilesystem": True},
    }
    manifests = render(tmp_path, values)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())  # helm merges maps over these
    for component in ("operator", "router"):
        pod = one(of(component, manifests), "Deployment")["spec"]["template"]["spec"]
        (only,) = pod["containers"]
        assert (only["image"], only["imagePullPolicy"]) == ("registry.example/vllm-operator:dev", "Always")
        for key, found in (("securityContext", only), ("podSecurityContext", pod)):
            assert found["securityContext"] == {**defaults[key], **values[key]}, key
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_router_custom_values_reach_its_objects(tmp_path: Path) -> None:
    values = VALUE_SETS["router-custom"]["router"]
    manifests = render(tmp_path, VALUE_SETS["router-custom"])
    router = router_objects(manifests)
    deployment = one(router, "Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 3
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120 + 15
    assert router_container(manifests)["resources"] == values["resources"]
    assert pod["metadata"]["annotations"] == values["podAnnotations"]
    assert values["podLabels"].items() <= pod["metadata"]["labels"].items()
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod["spec"][key] == values[key], key
    assert pod["spec"]["serviceAccountName"] == "router-sa"
    account = one(router, "ServiceAccount")["metadata"]
    assert (account["name"], account["annotations"]) == ("router-sa", values["serviceAccount"]["annotations"])
    service = one(router, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == values["service"]["annotations"]
    # The operator's pod keeps its own placement and account.
    operator_pod = one(operator_objects(manifests), "Deployment")["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity", "priorityClassName"} & set(operator_pod)
    assert operator_pod["serviceAccountName"] == "vllm-vllm-operator"


def test_router_can_run_as_an_existing_service_account_which_must_be_named(tmp_path: Path) -> None:
    existing = {"router": {"serviceAccount": {"create": False, "name": "mine"}}}
    router = router_objects(render(tmp_path, existing))
    assert not by_kind(router, "ServiceAccount")
    assert one(router, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
    assert one(router, "ClusterRoleBinding")["subjects"][0]["name"] == "mine"
    values = {"router": {"serviceAccount": {"create": False}}}
    proc = helm("template", "vllm", str(CHART), "-f", str(values_file(tmp_path, values)))
    assert proc.returncode != 0
    assert "router.serviceAccount.name is required" in proc.stderr, proc.stderr


def test_chart_crd_copy_is_byte_identical_to_the_generated_one() -> None:
    assert CHART_CRD.read_bytes() == CRD_FILE.read_bytes(), "run `make chart-crd`"


def test_rendered_crd_is_the_generated_one_kept_on_uninstall(tmp_path: Path) -> None:
    crd = one(render(tmp_path, {}), "CustomResourceDefinition")
    generated = yaml.safe_load(CRD_FILE.read_text())
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert generated["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    for key in ("annotations", "labels"):
        crd["metadata"].pop(key, None)
        generated["metadata"].pop(key, None)
    assert crd == generated


def test_crd_is_optional_and_its_keep_policy_too(tmp_path: Path) -> None:
    assert not by_kind(render(tmp_path, VALUE_SETS["no-crd"]), "CustomResourceDefinition")
    crd = one(render(tmp_path, {"crds": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


BAD_VALUES = [
    ("wrong type", {"image": {"tag": 7}}, "/image/tag"),
    ("wrong type nested", {"settings": {"scrapeConcurrency": "many"}}, "/settings/scrapeConcurrency"),
    ("bad enum", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("unknown top-level key", {"replicaCount": 2}, "replicaCount"),
    ("unknown nested key", {"settings": {"serverImg": "x"}}, "serverImg"),
    ("bad namespace name", {"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ("string instead of list", {"watchNamespaces": "team-a"}, "/watchNamespaces"),
    ("out of range", {"settings": {"rateHysteresis": 1.5}}, "/settings/rateHysteresis"),
    ("root user", {"settings": {"runAsUser": 0}}, "/settings/runAsUser"),
    ("not a quantity", {"settings": {"defaultShmSize": "8GB"}}, "/settings/defaultShmSize"),
    ("router port out of range", {"router": {"port": 70000}}, "/router/port"),
    ("router negative replicas", {"router": {"replicas": -1}}, "/router/replicas"),
    ("router unknown key", {"router": {"replicaCount": 2}}, "replicaCount"),
    ("router service type", {"router": {"service": {"type": "ExternalName"}}}, "/router/service/type"),
    ("router selector not a string", {"router": {"selector": {"tier": "a"}}}, "/router/selector"),
    ("router grace not whole seconds", {"router": {"graceSeconds": 2.5}}, "/router/graceSeconds"),
]


@pytest.mark.parametrize(("what", "values", "key"), BAD_VALUES, ids=[what for what, _, _ in BAD_VALUES])
def test_schema_refuses_bad_values_naming_the_key(
    tmp_path: Path, what: str, values: dict[str, Any], key: str
) -> None:
    proc = helm("template", "vllm", str(CHART), "-f", str(values_file(tmp_path, values)))
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert key in proc.stderr, proc.stderr


def test_every_value_is_documented() -> None:
    values, schema, docs = values_doc.load()
    undocumented = [path for path, _, _ in values_doc.entries(schema, values) if not docs.get(path)]
    assert not undocumented, f"add a `# --` comment in values.yaml for {undocumented}"
    not_camel = [
        path
        for path, _, _ in values_doc.entries(schema, values)
        if not re.fullmatch(r"[a-z][a-zA-Z0-9]*", path.rsplit(".", 1)[-1])
    ]
    assert not not_camel, f"values keys are camelCase: {not_camel}"


def test_every_value_is_in_the_schema() -> None:
    values, schema, _ = values_doc.load()
    assert set(values) == set(schema["properties"]) - values_doc.IGNORED


def test_readme_values_table_is_current() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert values_doc.splice(readme) == readme, "run `make chart-docs`"


def test_every_name_fits_a_dns_label_even_with_the_longest_full_name(tmp_path: Path) -> None:
    values = {"fullnameOverride": "x" * 63, "nameOverride": "y" * 63, "serviceMonitor": {"enabled": True}}
    manifests = render(tmp_path, values)
    names = [m["metadata"]["name"] for m in manifests if m["kind"] != "CustomResourceDefinition"]
    assert "x" * 55 + "-metrics" in names
    assert "x" * 56 + "-router" in names
    assert all(len(name) <= 63 for name in names), names
    labels = [v for m in manifests for v in m["metadata"]["labels"].values()]
    assert "y" * 56 + "-router" in labels
    assert all(len(label) <= 63 for label in labels), labels
