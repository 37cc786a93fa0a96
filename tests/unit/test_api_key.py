"""How the operator gets a keyed server's API key: from the model's Secret, cached, never shown."""

from __future__ import annotations

import time

import pytest
from kubernetes.client.exceptions import ApiException

from tests.unit.test_reconcile import SETTINGS, FakeCluster, model
from vllm_operator.api import SecretKeyRef
from vllm_operator.controller import API_KEY_RETRY, Controller

REF = SecretKeyRef(name="tiny-key", key="token")


class SecretCluster(FakeCluster):
    """A cluster with one answer for every Secret read, counting the reads."""

    def __init__(self, answer: str | int | None) -> None:
        super().__init__(model())
        self.answer = answer
        self.reads = 0

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        self.reads += 1
        if isinstance(self.answer, int):
            raise ApiException(status=self.answer)
        return self.answer


@pytest.mark.parametrize(
    ("answer", "value", "words"),
    [
        ("sk-1", "sk-1", []),
        (None, "", ["tiny-key", "no key 'token'", "spec.apiKeySecretRef"]),
        (404, "", ["tiny-key", "not found", "spec.apiKeySecretRef"]),
        (403, "", ["tiny-key", "rbac.readApiKeySecrets=true"]),
        (500, "", ["tiny-key", "HTTP 500"]),
    ],
)
def test_api_key_or_why_not(answer: str | int | None, value: str, words: list[str]) -> None:
    controller = Controller(SecretCluster(answer), SETTINGS)
    got, problem = controller.api_key("ns", REF)
    assert got == value
    assert bool(problem) == (not value) and all(w in problem for w in words), problem


def test_a_key_is_read_once_a_minute_a_failure_retried_soon() -> None:
    cluster = SecretCluster("sk-1")
    controller = Controller(cluster, SETTINGS)
    for _ in range(3):
        assert controller.api_key("ns", REF) == ("sk-1", "")
    assert cluster.reads == 1
    # A failed read is kept only briefly: expire it by hand rather than sleeping.
    cluster.answer = 403
    controller.api_keys.clear()
    assert controller.api_key("ns", REF)[0] == ""
    cluster.answer = "sk-2"
    until, _, _ = controller.api_keys[("ns", "tiny-key", "token")]
    assert until - time.monotonic() <= API_KEY_RETRY
    controller.api_keys[("ns", "tiny-key", "token")] = (until - 10, "", "expired")
    assert controller.api_key("ns", REF) == ("sk-2", "")
    assert cluster.reads == 3
