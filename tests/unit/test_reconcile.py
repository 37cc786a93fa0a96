"""A reconcile against a recording fake cluster: what gets written, and when nothing does."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from vllm_operator import reconcile, render
from vllm_operator.api import API_VERSION, KIND
from vllm_operator.controller import Controller
from vllm_operator.monitor import Monitor
from vllm_operator.settings import OperatorSettings

SETTINGS = OperatorSettings(admin_key="test-admin-key")


class FakeCluster:
    """Stores what is applied (merging like a server that adds defaults) and records every write."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.model = model
        self.objects: dict[str, dict[str, Any]] = {}
        self.applied: list[str] = []
        self.created: list[str] = []
        self.status_writes: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.pods: list[dict[str, Any]] = []

    async def get(self, kind: str, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.objects.get(kind)

    async def apply(self, manifest: Mapping[str, Any]) -> Mapping[str, Any]:
        stored = copy.deepcopy(dict(manifest))
        stored["metadata"]["uid"] = "child-uid"  # server-added fields must not look like drift
        if stored["kind"] == "Deployment":
            stored["metadata"]["generation"] = 1
            stored["status"] = {"observedGeneration": 1, "replicas": 0}
        self.objects[stored["kind"]] = stored
        self.applied.append(stored["kind"])
        return stored

    async def create(self, manifest: Mapping[str, Any]) -> bool:
        if manifest["kind"] in self.objects:
            return False
        self.objects[manifest["kind"]] = copy.deepcopy(dict(manifest))
        self.created.append(manifest["kind"])
        return True

    async def list_pods(self, namespace: str, selector: str) -> Sequence[Mapping[str, Any]]:
        return self.pods

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> None:
        self.status_writes.append(status)
        self.model["status"] = status

    async def event(self, owner: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))


def model(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": "llama", "namespace": "team-a", "uid": "model-uid", "generation": 1},
        "spec": {"model": "org/model", **spec},
    }


async def test_first_reconcile_applies_children_with_owner_and_writes_status() -> None:
    cluster = FakeCluster(model())
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert cluster.applied == ["Service", "Deployment"]
    for child in cluster.objects.values():
        owner = child["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (
            "VLLMModel",
            "model-uid",
            True,
        )
    assert len(cluster.status_writes) == 1
    written = cluster.status_writes[0]
    assert written["observedGeneration"] == 1
    assert written["endpoint"] == "http://llama.team-a.svc:8000/v1"
    # One Event for both children: 200 models applied at once post 200, not 400.
    assert cluster.events == [("Normal", "Created", "created Service llama and Deployment llama")]


async def test_noop_reconcile_writes_nothing() -> None:
    cluster = FakeCluster(model())
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    writes = (len(cluster.applied), len(cluster.status_writes), len(cluster.events))
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert plan.apply == [] and plan.status is None and plan.events == []
    assert (len(cluster.applied), len(cluster.status_writes), len(cluster.events)) == writes


async def test_status_written_once_per_change() -> None:
    cluster = FakeCluster(model())
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    cluster.objects["Deployment"]["status"] = {
        "observedGeneration": 1,
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
    }
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert len(cluster.status_writes) == 2
    assert cluster.status_writes[-1]["phase"] == "Ready"
    assert ("Normal", "Ready", "1/1 replicas ready") in cluster.events


async def test_deleted_child_comes_back() -> None:
    cluster = FakeCluster(model())
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    del cluster.objects["Service"]
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert [m["kind"] for m in plan.apply] == ["Service"]


async def test_hand_edited_child_is_repaired() -> None:
    cluster = FakeCluster(model())
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    cluster.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert [m["kind"] for m in plan.apply] == ["Deployment"]
    assert (
        cluster.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] != "evil:latest"
    )


async def test_spec_change_reapplies_deployment() -> None:
    cluster = FakeCluster(model())
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    cluster.model["spec"]["maxModelLen"] = 4096
    cluster.model["metadata"]["generation"] = 2
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert [m["kind"] for m in plan.apply] == ["Deployment"]


@pytest.mark.parametrize(
    "spec",
    [
        {"resources": {"limits": {"nvidia.com/gpu": 8}}},
        {"engineArgs": ["--port=1"]},
    ],
)
async def test_invalid_spec_recorded_once_as_condition_and_event(spec: dict[str, Any]) -> None:
    cluster = FakeCluster(model(**spec))
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert cluster.applied == []
    assert len(cluster.status_writes) == 1
    conditions = {c["type"]: c for c in cluster.status_writes[0]["conditions"]}
    assert conditions["SpecValid"]["status"] == "False"
    assert conditions["SpecValid"]["reason"] == "InvalidSpec"
    assert "spec" in conditions["SpecValid"]["message"]
    assert cluster.status_writes[0]["phase"] == "Failed"
    warnings = [e for e in cluster.events if e[0] == "Warning"]
    assert len(warnings) == 1 and warnings[0][1] == "InvalidSpec"


async def test_fixing_an_invalid_spec_recovers() -> None:
    cluster = FakeCluster(model(engineArgs=["--port=1"]))
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    cluster.model["spec"]["engineArgs"] = []
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    conditions = {c["type"]: c for c in cluster.status_writes[-1]["conditions"]}
    assert conditions["SpecValid"]["status"] == "True"
    assert cluster.applied == ["Service", "Deployment"]


async def test_deleting_model_is_left_to_garbage_collection() -> None:
    cluster = FakeCluster(model())
    cluster.model["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert plan == reconcile.Plan() and cluster.applied == [] and cluster.status_writes == []


@pytest.mark.parametrize("kind", ["Service", "Deployment"])
async def test_a_child_name_taken_by_a_foreign_object_is_never_adopted(kind: str) -> None:
    cluster = FakeCluster(model())
    foreign_object = {"kind": kind, "metadata": {"name": "llama", "namespace": "team-a", "uid": "theirs"}}
    cluster.objects[kind] = copy.deepcopy(foreign_object)
    for _ in range(2):
        plan, _observed = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
        assert cluster.objects[kind] == foreign_object  # not applied over, no owner reference added
        assert plan.retry is not None
    assert cluster.applied == []
    (degraded,) = [c for c in cluster.model["status"]["conditions"] if c["type"] == "Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "NameConflict")
    assert f"{kind} llama" in degraded["message"] and "not owned" in degraded["message"]
    assert cluster.model["status"]["phase"] == "Failed"
    assert [e[1] for e in cluster.events] == ["NameConflict"]  # once, not every retry
    assert len(cluster.status_writes) == 1

    del cluster.objects[kind]  # the owner removed it: the model takes the name and recovers
    plan, _observed = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert plan.retry is None and set(cluster.applied) == {"Service", "Deployment"}
    (degraded,) = [c for c in cluster.model["status"]["conditions"] if c["type"] == "Degraded"]
    assert degraded["status"] == "False"


async def test_a_lora_model_gets_its_admin_token_secret_created_never_read() -> None:
    cluster = FakeCluster(model(lora={"adapters": [{"name": "sql", "source": "/lora/sql"}]}))
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert cluster.created == ["Secret"] and [m["kind"] for m in plan.create] == ["Secret"]
    secret = cluster.objects["Secret"]
    ref = reconcile.ref_of(cluster.model)
    token = render.admin_token(ref, SETTINGS)
    assert base64.b64decode(secret["data"]["token"]).decode() == token
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "model-uid"
    env = cluster.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "VLLM_SERVER_ADMIN_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "token"}},
    } in env
    assert token not in json.dumps(cluster.objects["Deployment"])  # only a reference in the pod spec

    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert plan.create == [] and cluster.created == ["Secret"]  # nothing to do: nothing created

    # The Secret was deleted and a pod cannot start without it: it is created again.
    del cluster.objects["Secret"]
    cluster.pods = [
        {
            "metadata": {"name": "p"},
            "status": {
                "containerStatuses": [
                    {
                        "state": {
                            "waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": f'secret "{secret["metadata"]["name"]}" not found',
                            }
                        }
                    }
                ]
            },
        }
    ]
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert cluster.created == ["Secret", "Secret"]


def test_admin_tokens_differ_per_model_and_key_and_a_new_key_renames_the_secret() -> None:
    a, b = render.ModelRef("a", "ns", "u1"), render.ModelRef("b", "ns", "u2")
    one, two = OperatorSettings(admin_key="one"), OperatorSettings(admin_key="two")
    tokens = {render.admin_token(r, s) for r in (a, b) for s in (one, two)}
    assert len(tokens) == 4 and all(len(t) == 64 for t in tokens)
    assert render.admin_secret_name(a, one) != render.admin_secret_name(a, two)
    assert "one" not in repr(one)  # the key never reaches a log through the settings' repr


async def test_models_without_lora_get_no_secret() -> None:
    cluster = FakeCluster(model())
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert cluster.created == [] and "Secret" not in cluster.objects


class TwoModelCluster(FakeCluster):
    """Status writes of model `bad` are refused; the others are recorded."""

    async def write_status(
        self, namespace: str, name: str, status: dict[str, Any], previous: Mapping[str, Any]
    ) -> None:
        if name == "bad":
            raise RuntimeError("refused")
        self.status_writes.append({"name": name, **status})


class NoPodsScraper:
    """A Scraper for models whose pods are not there yet."""

    async def scrape_all(self, targets: Mapping[Any, Sequence[Any]]) -> dict[Any, list[Any]]:
        return {key: [] for key in targets}


async def test_one_models_failed_status_write_does_not_stop_the_others() -> None:
    cluster = TwoModelCluster(model())
    controller = Controller(cluster, SETTINGS)
    for name in ("bad", "good"):  # the bad one first, as a round walks them
        body = model()
        body["metadata"] = {**body["metadata"], "name": name, "uid": f"uid-{name}"}
        controller.remember(body)
        controller.store.state(("team-a", name)).observed = reconcile.Observed(None, [])
    writes = await Monitor(controller).scrape_round(NoPodsScraper())  # type: ignore[arg-type]
    assert writes == 1
    assert [w["name"] for w in cluster.status_writes] == ["good"]


class DeletingScraper(NoPodsScraper):
    """A round during which the model is deleted (the watch's forget runs mid-round)."""

    def __init__(self, controller: Controller, key: tuple[str, str]) -> None:
        self.controller, self.key = controller, key

    async def scrape_all(self, targets: Mapping[Any, Sequence[Any]]) -> dict[Any, list[Any]]:
        self.controller.forget(self.key)
        return await super().scrape_all(targets)


async def test_a_model_deleted_mid_round_leaves_nothing_behind() -> None:
    cluster = FakeCluster(model())
    controller = Controller(cluster, SETTINGS)
    key = ("team-a", model()["metadata"]["name"])
    controller.remember(model())
    controller.store.state(key).observed = reconcile.Observed(None, [])
    writes = await Monitor(controller).scrape_round(DeletingScraper(controller, key))  # type: ignore[arg-type]
    assert writes == 0
    assert key not in controller.store and controller.store.bodies() == {}
