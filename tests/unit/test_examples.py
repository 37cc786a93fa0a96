"""Every example renders, and every rendered manifest is valid for the pinned Kubernetes release."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from devtools import kubeschema
from devtools.paths import REPO_ROOT
from vllm_operator.cli import main, render_documents
from vllm_operator.settings import OperatorSettings

EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"model.yaml", "model-lora.yaml", "model-quantized.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_renders_valid_manifests(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    manifests = render_documents(documents, OperatorSettings())
    assert {m["kind"] for m in manifests} == {"Deployment", "Service"}
    for manifest in manifests:
        kubeschema.validate(manifest)


def test_validator_refuses_a_broken_manifest() -> None:
    documents = [d for d in yaml.safe_load_all((REPO_ROOT / "examples" / "model.yaml").read_text()) if d]
    deployment = next(m for m in render_documents(documents, OperatorSettings()) if m["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicie"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        kubeschema.validate(deployment)
    deployment["spec"]["template"]["spec"]["containers"][0].pop("imagePullPolicie")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        kubeschema.validate(deployment)


def test_cli_render_prints_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", str(REPO_ROOT / "examples" / "model.yaml")]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["Service", "Deployment"]


def test_cli_render_invalid_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: serving.vllm-operator.io/v1alpha1\nkind: VLLMModel\nmetadata: {name: m}\n"
        "spec: {model: org/m, tensorParallelSize: 0}\n"
    )
    assert main(["render", "-f", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "VLLMModel/m: spec.tensorParallelSize" in err


def test_cli_render_wrong_kind_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: m}\n")
    assert main(["render", "-f", str(bad)]) == 2
    assert "expected kind VLLMModel" in capsys.readouterr().err


def test_cli_render_a_list_document_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    assert main(["render", "-f", str(bad)]) == 2
    assert "expected a VLLMModel mapping, got a YAML list" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["70000", "-1", "http"])
def test_cli_run_refuses_a_bad_metrics_port(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--all-namespaces", "--metrics-port", value])
    assert exited.value.code == 2
    assert "--metrics-port" in capsys.readouterr().err


def test_the_security_models_snippets_are_valid_and_select_the_model_pods() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Security model", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    snippets = {d["kind"]: d for d in yaml.safe_load_all(block) if d}
    assert set(snippets) == {"NetworkPolicy", "PodDisruptionBudget"}
    tiny = [d for d in yaml.safe_load_all((REPO_ROOT / "examples" / "tiny-cpu.yaml").read_text()) if d]
    deployment = next(m for m in render_documents(tiny, OperatorSettings()) if m["kind"] == "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    for snippet in snippets.values():
        kubeschema.validate(snippet)
    assert snippets["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert snippets["NetworkPolicy"]["spec"]["ingress"][0]["ports"][0]["port"] == port
    assert snippets["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
