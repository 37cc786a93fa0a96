"""Operator settings from the environment: parsed, and bad values named with their variable."""

from __future__ import annotations

import pytest

from vllm_operator.cli import main
from vllm_operator.settings import OperatorSettings, SettingsError


def test_from_env_reads_strings_and_json() -> None:
    settings = OperatorSettings.from_env(
        {
            "VLLM_OPERATOR_SERVER_IMAGE": "example.com/s:1",
            "VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS": "2",
            "VLLM_OPERATOR_DEFAULT_RESOURCES": '{"requests": {"cpu": "2"}}',
        }
    )
    assert settings.server_image == "example.com/s:1"
    assert settings.scrape_interval_seconds == 2
    assert settings.default_resources == {"requests": {"cpu": "2"}}


@pytest.mark.parametrize(
    ("env", "named"),
    [
        (
            {"VLLM_OPERATOR_DEFAULT_RESOURCES": "{cpu: 2"},
            "VLLM_OPERATOR_DEFAULT_RESOURCES: '{cpu: 2' is not valid JSON",
        ),
        ({"VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS": "-1"}, "VLLM_OPERATOR_SCRAPE_INTERVAL_SECONDS: "),
        ({"VLLM_OPERATOR_RATE_HYSTERESIS": "1.5"}, "VLLM_OPERATOR_RATE_HYSTERESIS: "),
        ({"VLLM_OPERATOR_IMAGE_PULL_POLICY": "Sometimes"}, "VLLM_OPERATOR_IMAGE_PULL_POLICY: "),
        ({"VLLM_OPERATOR_DEFAULT_SHM_SIZE": "8GB"}, "VLLM_OPERATOR_DEFAULT_SHM_SIZE: "),
        ({"VLLM_OPERATOR_RUN_AS_USER": "0"}, "VLLM_OPERATOR_RUN_AS_USER: "),
        ({"VLLM_OPERATOR_SERVER_IMAGE": ""}, "VLLM_OPERATOR_SERVER_IMAGE: "),
        ({"VLLM_OPERATOR_CLUSTER_DOMAIN": ""}, "VLLM_OPERATOR_CLUSTER_DOMAIN: "),
        (
            {"VLLM_OPERATOR_DEFAULT_RESOURCES": '{"request": {"cpu": "2"}}'},
            "VLLM_OPERATOR_DEFAULT_RESOURCES: Value error, unknown keys ['request']",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        OperatorSettings.from_env(env)
    assert named in str(caught.value)


def test_cli_refuses_bad_settings_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VLLM_OPERATOR_SCRAPE_CONCURRENCY", "0")
    assert main(["run", "--all-namespaces"]) == 2
    assert "VLLM_OPERATOR_SCRAPE_CONCURRENCY" in capsys.readouterr().err
