"""Generated files are committed exactly as the code generates them."""

from __future__ import annotations

import yaml

from devtools.paths import CRD_FILE, REPO_ROOT
from vllm_operator import chart_schema, crd, docs
from vllm_operator.settings import OperatorSettings


def test_committed_crd_matches_models() -> None:
    assert CRD_FILE.read_text() == crd.crd_yaml(), (
        "run: vllm-operator crd > crds/serving.vllm-operator.io_vllmmodels.yaml"
    )


def test_readme_field_table_matches_models() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert docs.splice(readme) == readme, "run: vllm-operator docs --readme README.md"


def test_chart_settings_schema_matches_settings() -> None:
    """The chart's schema of `settings` is OperatorSettings' own: a changed bound fails here."""
    path = REPO_ROOT / "charts" / "vllm-operator" / "values.schema.json"
    text = path.read_text()
    assert chart_schema.splice(text) == text, (
        "run: make generate (vllm-operator chart-schema --values-schema "
        "charts/vllm-operator/values.schema.json)"
    )


def test_crd_is_structural() -> None:
    """No $ref, no anyOf without types, every property typed or explicitly free-form."""
    text = CRD_FILE.read_text()
    assert "$ref" not in text and "anyOf" not in text

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node or "items" in node:
                assert "type" in node, path
            for key, value in node.get("properties", {}).items():
                assert "type" in value or value.get("x-kubernetes-preserve-unknown-fields"), f"{path}.{key}"
                walk(value, f"{path}.{key}")
            if "items" in node:
                walk(node["items"], path + "[]")

    schema = yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    walk(schema, "")


def test_crd_has_printer_columns_and_subresources() -> None:
    version = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert names == ["Ready", "Desired", "Phase", "Tokens/s", "Adapters", "Endpoint", "Age"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert "status" in version["subresources"]


def test_every_spec_field_documented() -> None:
    table = docs.field_table()
    for row in docs.rows(__import__("vllm_operator.api", fromlist=["VLLMModelSpec"]).VLLMModelSpec):
        assert row.rstrip(" |").split("|")[-1].strip(), f"undocumented: {row}"
    assert "`spec.lora.adapters[].name`" in table


def test_every_version_is_the_operators() -> None:
    """`vllm_operator.__version__` is the one source; everything that repeats it must agree."""
    import tomllib

    import vllm_operator_client
    import vllm_server
    from vllm_operator import __version__

    chart = yaml.safe_load((REPO_ROOT / "charts" / "vllm-operator" / "Chart.yaml").read_text())
    server = tomllib.loads((REPO_ROOT / "images" / "vllm-server" / "pyproject.toml").read_text())
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith("vllm-operator-client==")]
    found = {
        "vllm_operator_client.__version__": vllm_operator_client.__version__,
        "pyproject.toml's pin of vllm-operator-client": pins[0].split("==", 1)[1] if pins else None,
        "Chart.yaml version": chart["version"],
        "Chart.yaml appVersion": chart["appVersion"],
        "vllm_server.__version__": vllm_server.__version__,
        "images/vllm-server/pyproject.toml": server["project"]["version"],
        "default server image tag": OperatorSettings().server_image.rsplit(":", 1)[1],
    }
    assert {k: v for k, v in found.items() if v != __version__} == {}
