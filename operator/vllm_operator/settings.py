"""Operator-wide settings: defaults for every model, read from the environment."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_operator import __version__
from vllm_operator.api import ContainerResources, Quantity

ENV_PREFIX = "VLLM_OPERATOR_"


class OperatorSettings(BaseModel):
    """What the platform team sets once (Helm values) and every VLLMModel inherits.

    The chart's schema of its `settings` values is generated from these fields (`chart_schema`):
    their bounds, patterns and docstrings.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    server_image: str = Field(default=f"ghcr.io/vllm-operator/vllm-server:{__version__}", min_length=1)
    """Image of the bundled server, used when a resource sets no `spec.image`."""
    # A str with a pattern, not a Literal: from_env hands only str fields over unparsed (the
    # chart's schema still gets an enum: chart_schema reads the alternation back).
    image_pull_policy: str = Field(default="IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    """Pull policy of the model server pods (`Always`, `IfNotPresent` or `Never`)."""
    default_resources: ContainerResources = Field(default_factory=dict)
    """Container resources every model gets unless its spec overrides them."""
    storage_initializer_image: str = Field(default="kserve/storage-initializer:v0.14.0", min_length=1)
    """Init image that downloads s3:// and gs:// sources into the cache volume."""
    run_as_user: int = Field(default=1000, ge=1)
    """UID the server runs as (the bundled image's non-root user; the pods refuse root)."""
    default_shm_size: Quantity = "8Gi"
    """Size of every model pod's in-memory /dev/shm when the spec sets none."""
    scrape_interval_seconds: float = Field(default=15.0, ge=0)
    """How often every ready pod's /metrics and /health are read; 0 turns scraping off."""
    scrape_timeout_seconds: float = Field(default=2.0, gt=0)
    """Deadline of one pod's whole scrape (/health, /metrics and /v1/models together)."""
    scrape_concurrency: int = Field(default=64, ge=1)
    """Pods read at once, across all models."""
    rate_hysteresis: float = Field(default=0.1, ge=0, lt=1)
    """Relative change of a rate below which the status is not rewritten (0.1: 10 %)."""
    cluster_domain: str = Field(default="svc", min_length=1)
    """Suffix of the endpoint host: NAME.NAMESPACE.<this>."""
    router_url: str = Field(default="", pattern=r"^(https?://[^\s/]+)?$")
    """Base URL of the router (`vllm-operator router`) whose view of each model goes to
    `status.routing`, read every scrape round; empty: none (the chart sets it)."""
    router_token: str = Field(default="", repr=False)
    """Bearer token of the router's /router/park, which lets the autoscaler take a model to zero
    (the chart generates one for both); empty: models never go to zero."""
    autoscale_interval_seconds: float = Field(default=0.5, ge=0)
    """How often the autoscaler reads the router's demand and decides; 0 turns autoscaling off."""
    admin_key: str = Field(default="", repr=False)
    """Secret from which each LoRA model's adapter admin token is derived (the chart generates
    one); empty: a random one per operator start, so LoRA pods roll when the operator restarts."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read VLLM_OPERATOR_<FIELD> variables (non-strings as JSON); SettingsError names the bad one."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            try:
                values[name] = json.loads(raw) if field.annotation is not str else raw
            except ValueError:
                raise SettingsError([f"{ENV_PREFIX}{name.upper()}: {raw!r} is not valid JSON"]) from None
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = [f"{ENV_PREFIX}{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors()]
            raise SettingsError(problems) from None


class SettingsError(ValueError):
    """Operator settings from the environment that do not validate."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
