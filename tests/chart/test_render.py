"""The chart offline: lint, render with several value sets, validate, refuse bad values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import kubeschema
from tests.chart import values_doc
from tests.chart.helm import (
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
from tests.paths import CRD_FILE, REPO_ROOT
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
}


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    """A values file holding `values`."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def render(tmp_path: Path, values: dict[str, Any]) -> list[Manifest]:
    """The chart rendered with `values` over the defaults."""
    return template([values_file(tmp_path, values)])


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
    assert one(manifests, "Deployment")


def test_one_resource_kind_per_template() -> None:
    for path in (CHART / "templates").glob("*.yaml"):
        kinds = set(re.findall(r"^kind: (\w+)", path.read_text(), flags=re.MULTILINE))
        assert len(kinds) <= 1, f"{path.name} renders {kinds}"


def test_deployment_is_single_recreate_and_restricted(tmp_path: Path) -> None:
    manifests = render(tmp_path, {})
    spec = one(manifests, "Deployment")["spec"]
    pod = spec["template"]["spec"]
    assert (spec["replicas"], spec["strategy"]) == (1, {"type": "Recreate"})
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(manifests)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_probes_and_ports(tmp_path: Path) -> None:
    operator = container(render(tmp_path, {}))
    assert "--liveness=http://0.0.0.0:8080/healthz" in operator["args"]
    assert "--metrics-port=9090" in operator["args"]
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert operator[probe]["httpGet"] == {"path": "/healthz", "port": "healthz"}


def test_defaults_watch_every_namespace_with_a_cluster_role(tmp_path: Path) -> None:
    manifests = render(tmp_path, {})
    assert container(manifests)["args"][:2] == ["run", "--all-namespaces"]
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(manifests, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert not by_kind(manifests, "Role") and not by_kind(manifests, "RoleBinding")


def test_namespaced_scope_gets_a_role_per_namespace(tmp_path: Path) -> None:
    manifests = render(tmp_path, VALUE_SETS["namespaced"])
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
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["serving.vllm-operator.io"], "resources": ["vllmmodels/status"], "verbs": ["patch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
]  # fmt: skip


def test_rbac_rules_are_exactly_what_the_operator_uses(tmp_path: Path) -> None:
    assert one(render(tmp_path, {}), "ClusterRole")["rules"] == EXPECTED_RULES
    for role in by_kind(render(tmp_path, VALUE_SETS["namespaced"]), "Role"):
        assert role["rules"] == EXPECTED_RULES


@pytest.mark.parametrize("name", ["defaults", "namespaced"])
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
    manifests = render(tmp_path, VALUE_SETS["custom"])
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
    assert container(render(tmp_path, {}))["image"] == f"ghcr.io/vllm-operator/vllm-operator:{app_version}"


def test_settings_env_is_what_the_operator_reads(tmp_path: Path) -> None:
    """The env the chart renders, read back by the operator, gives the settings of the values."""
    env = env_of(render(tmp_path, VALUE_SETS["custom"]))
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
        if name != "admin_key"  # a generated Secret (templates/admin-key.yaml), never a value
    }
    assert values == expected


def test_default_env_covers_every_setting(tmp_path: Path) -> None:
    env = env_of(render(tmp_path, {}))
    assert set(env) == {ENV_PREFIX + name.upper() for name in OperatorSettings.model_fields}
    key = env[ENV_PREFIX + "ADMIN_KEY"]
    assert len(key) == 48 and key != env_of(render(tmp_path, {}))[ENV_PREFIX + "ADMIN_KEY"]  # random
    assert OperatorSettings.from_env(env) == OperatorSettings(admin_key=key)


def test_metrics_service_and_service_monitor(tmp_path: Path) -> None:
    assert not by_kind(render(tmp_path, {}), "ServiceMonitor")
    manifests = render(tmp_path, VALUE_SETS["servicemonitor"])
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
    manifests = render(tmp_path, {"fullnameOverride": "x" * 63, "serviceMonitor": {"enabled": True}})
    names = {m["kind"]: m["metadata"]["name"] for m in manifests if m["kind"] != "CustomResourceDefinition"}
    assert names["Service"] == "x" * 55 + "-metrics"
    assert all(len(name) <= 63 for name in names.values()), names
