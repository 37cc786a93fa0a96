"""Schemathesis fuzzes every route of the server's own OpenAPI document on the real engine.

No input may get a 5xx, and the server must be healthy and serving afterwards. The run is
bounded (examples per route and mode, a short context) to take ~2-3 minutes on two cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok

from devtools.realserver import RealServer, lora_flags, start_server

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

API_KEY = "fuzz-key"
ADMIN_TOKEN = "fuzz-admin"
# Examples per route and generation mode (positive: valid per the schema; negative: not).
# Generation routes cost the engine; the others answer at once.
EXAMPLES = {"/v1/chat/completions": 120, "/v1/completions": 150}
OTHER_EXAMPLES = 60


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_model: Path, tiny_lora: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealServer]:
    """A server configured as the operator deploys it, with a short context.

    --max-model-len 128 bounds every generation: most generated bodies leave max_tokens out,
    and the default (the rest of the context) would otherwise run ~1000 tokens each.
    HF_HUB_OFFLINE: a generated lora_path that is no directory would be tried as a hub repo.
    """
    srv = start_server(
        tiny_model,
        [
            "--max-model-len",
            "128",
            *lora_flags(tiny_lora),
            "--api-key",
            API_KEY,
        ],
        log_path=tmp_path_factory.mktemp("fuzz-logs") / "server.log",
        env={"VLLM_SERVER_ADMIN_TOKEN": ADMIN_TOKEN, "HF_HUB_OFFLINE": "1"},
    )
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Tally:
    """What the fuzzer sent and what came back."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)

    def add(self, status: int) -> None:
        self.requests += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1


def _bounded(body: Any) -> Any:
    """Clamp `n` in a generated body to 2 when the server would accept it.

    Each choice costs a generation: n up to the protocol's 128 times 128 tokens ran for
    minutes. Values the server refuses (below 1, above 128, not an integer) are kept.
    """
    if isinstance(body, dict):
        n = body.get("n")
        if isinstance(n, int) and not isinstance(n, bool) and 2 < n <= 128:
            return {**body, "n": 2}
    return body


def _served_models_only(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with `model` limited to the served names, for the generation routes.

    Random names are all 404 before the engine sees them; the named ones reach it (the base
    model and a LoRA adapter). Negative cases still send other names.
    """
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"]["properties"]["model"] = {"enum": ["tiny", "preloaded"]}
    return doc


def _fuzz_operation(operation: Any, mode: GenerationMode, examples: int, url: str, tally: Tally) -> None:
    """Send `examples` generated cases of one operation; record, do not raise, 5xx answers."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        if isinstance(case.body, dict):
            case.body = _bounded(case.body)
        response = case.call(base_url=url, headers=headers, timeout=120)
        tally.add(response.status_code)
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except FailureGroup:
            # Our own summary: schemathesis' report repeats the Authorization header.
            tally.server_errors.append(
                f"{case.method} {case.path} {response.status_code}: "
                f"body={json.dumps(case.body, default=str)[:300]} -> {response.text[:300]}"
            )

    run()


def test_fuzz_the_openapi_document_finds_no_server_error(fuzz_server: RealServer) -> None:
    url = fuzz_server.url
    doc = httpx.get(f"{url}/openapi.json", timeout=10).json()
    # Every body the routes parse is described, so the fuzzer exercises them.
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    ):
        assert "requestBody" in doc["paths"][path]["post"], path
    schema = schemathesis.openapi.from_dict(_served_models_only(doc))
    tally = Tally()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document must describe every route validly
        operation = result.ok()
        examples = EXAMPLES.get(operation.path, OTHER_EXAMPLES)
        # A route without parameters or body has nothing to get wrong.
        modes = (
            [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
            if len(operation.body)
            else [GenerationMode.POSITIVE]
        )
        for mode in modes:
            t0, sent = time.monotonic(), tally.requests
            _fuzz_operation(operation, mode, examples, url, tally)
            print(
                f"\n{operation.label} {mode.value}: {tally.requests - sent} requests in "
                f"{time.monotonic() - t0:.1f} s",
                end="",
            )
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(tally.by_status.items()))
    print(f"\nfuzz: {tally.requests} requests, {len(tally.server_errors)} answered >= 500 ({statuses})")
    assert tally.server_errors == [], "\n".join(tally.server_errors[:10])
    assert tally.requests >= 700
    # Still healthy and serving.
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        headers=fuzz_server.headers(),
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "ignore_eos": True,
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
