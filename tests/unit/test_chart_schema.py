"""The chart's schema of `settings`, generated from OperatorSettings: what it accepts and refuses."""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import pytest
from jsonschema import Draft7Validator
from pydantic import BaseModel, Field
from pydantic.alias_generators import to_snake

from devtools.paths import REPO_ROOT
from vllm_operator import chart_schema
from vllm_operator.settings import ENV_PREFIX, OperatorSettings, SettingsError

SCHEMA = chart_schema.settings_values_schema()


class Case(NamedTuple):
    what: str
    settings: dict[str, Any]
    chart: bool
    """The generated schema accepts it (`helm install` goes on)."""
    operator: bool
    """OperatorSettings.from_env accepts the variables the chart renders from it."""


CASES = [
    Case("the defaults", {}, True, True),
    Case("bound: runAsUser 1", {"runAsUser": 1}, True, True),
    Case("bound: runAsUser 0 is root", {"runAsUser": 0}, False, False),
    Case("bound: scrapeIntervalSeconds 0 turns scraping off", {"scrapeIntervalSeconds": 0}, True, True),
    Case("exclusive bound: scrapeTimeoutSeconds 0", {"scrapeTimeoutSeconds": 0}, False, False),
    Case("exclusive bound: rateHysteresis 0.99", {"rateHysteresis": 0.99}, True, True),
    Case("exclusive bound: rateHysteresis 1", {"rateHysteresis": 1}, False, False),
    Case("type: scrapeConcurrency 2.5", {"scrapeConcurrency": 2.5}, False, False),
    Case("type: scrapeConcurrency many", {"scrapeConcurrency": "many"}, False, False),
    Case("pattern: defaultShmSize 8Gi", {"defaultShmSize": "8Gi"}, True, True),
    Case("pattern: defaultShmSize 8GB", {"defaultShmSize": "8GB"}, False, False),
    Case("maxLength: defaultShmSize of 33 digits", {"defaultShmSize": "1" * 33}, False, False),
    Case("enum from the pattern: imagePullPolicy Never", {"imagePullPolicy": "Never"}, True, True),
    Case("enum from the pattern: imagePullPolicy Sometimes", {"imagePullPolicy": "Sometimes"}, False, False),
    Case("minLength: serverImage empty", {"serverImage": ""}, False, False),
    # The operator never sees an unknown key's variable; only the schema can refuse the typo.
    Case("unknown key serverImg", {"serverImg": "x"}, False, True),
    # Set by the chart from the router's Service and the generated Secret, never by a user.
    Case("excluded: routerUrl", {"routerUrl": "http://router:8000"}, False, True),
    Case("excluded: routerToken", {"routerToken": "t"}, False, True),
    Case("excluded: adminKey", {"adminKey": "k"}, False, True),
    Case(
        "defaultResources: requests",
        {"defaultResources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
        True,
        True,
    ),
    Case(
        "defaultResources: limits in millicores and a count",
        {"defaultResources": {"limits": {"cpu": "500m", "nvidia.com/gpu": 1}}},
        True,
        True,
    ),
    Case("defaultResources: claims", {"defaultResources": {"claims": [{"name": "gpu"}]}}, True, True),
    Case("defaultResources: unknown key", {"defaultResources": {"foo": 1}}, False, False),
    Case("defaultResources: not an object", {"defaultResources": "2"}, False, False),
    # The operator hands quantities to the API server unchecked; the schema catches them first.
    Case("defaultResources: cpu lots", {"defaultResources": {"requests": {"cpu": "lots"}}}, False, True),
    Case("defaultResources: negative", {"defaultResources": {"limits": {"memory": -1}}}, False, True),
]
IDS = [case.what for case in CASES]


def chart_env(settings: dict[str, Any]) -> dict[str, str]:
    """The variables templates/deployment.yaml renders: strings as they are, the rest as JSON."""
    return {
        ENV_PREFIX + to_snake(key).upper(): value if isinstance(value, str) else json.dumps(value)
        for key, value in settings.items()
    }


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_schema_accepts_or_refuses(case: Case) -> None:
    assert Draft7Validator(SCHEMA).is_valid(case.settings) is case.chart


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_operator_agrees_except_where_the_table_says(case: Case) -> None:
    try:
        OperatorSettings.from_env(chart_env(case.settings))
    except SettingsError:
        accepted = False
    else:
        accepted = True
    assert accepted is case.operator


def test_the_schema_is_draft_07_and_documents_every_key() -> None:
    Draft7Validator.check_schema(SCHEMA)
    assert [key for key, sub in SCHEMA["properties"].items() if not sub.get("description")] == []


def test_the_excluded_keys_are_the_variables_the_deployment_sets_itself() -> None:
    template = (REPO_ROOT / "charts" / "vllm-operator" / "templates" / "deployment.yaml").read_text()
    named = set(re.findall(r"- name: (VLLM_OPERATOR_[A-Z_]+)\s*$", template, re.MULTILINE))
    assert named == {ENV_PREFIX + name.upper() for name in chart_schema.CHART_OWNED}


def test_every_resources_key_is_one_the_operator_takes() -> None:
    for key in chart_schema.container_resources_schema()["properties"]:
        OperatorSettings(default_resources={key: {} if key != "claims" else []})


class _Choices(BaseModel):
    word_choice: str = Field(default="a", pattern="^(a|b)$")
    url: str = Field(default="", pattern=r"^(https?://[^\s/]+)?$")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("wordChoice", {"type": "string", "enum": ["a", "b"]}),
        # Not a choice of plain words: stays a pattern.
        ("url", {"type": "string", "pattern": r"^(https?://[^\s/]+)?$"}),
    ],
)
def test_a_choice_of_words_becomes_an_enum(key: str, expected: dict[str, Any]) -> None:
    assert chart_schema.settings_values_schema(_Choices)["properties"][key] == expected


class _Optional(BaseModel):
    maybe: int | None = None


def test_a_field_the_schema_cannot_express_is_refused_not_written_half_right() -> None:
    with pytest.raises(ValueError, match=r"maybe: the chart's schema cannot express \['anyOf'\]"):
        chart_schema.settings_values_schema(_Optional)
