"""LoRA adapters: planning calls, the AdaptersReady verdict, and no pod roll for adapter changes."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.unit.test_reconcile import SETTINGS, FakeCluster, model
from vllm_operator import lora, reconcile, render
from vllm_operator.api import parse_spec
from vllm_operator.throughput import PodSample


def pod(
    name: str,
    *adapters: str,
    healthy: bool = True,
    ready: bool = True,
    models_error: str = "",
    roots: dict[str, str] | None = None,
) -> PodSample:
    return PodSample(
        name=name,
        at=0,
        ready=ready,
        healthy=healthy,
        adapters=tuple(adapters),
        models_error=models_error,
        adapter_roots=roots or {},
    )


OURS = {"sql": "/lora/sql", "chat": "org/chat-lora"}
SWAPPED = {"sql": "/tmp/evil", "chat": "org/chat-lora"}


REFUSED = "/v1/models answered 401: Invalid or missing API key."


WANTED = {"sql": "/lora/sql", "chat": "org/chat-lora"}


def test_desired_resolves_sources() -> None:
    spec = parse_spec(
        {
            "model": "m",
            "lora": {
                "adapters": [{"name": "sql", "source": "hf://o/sql"}, {"name": "x", "source": "pvc://c/x"}]
            },
        }
    )
    assert lora.desired(spec) == {"sql": "o/sql", "x": "/models/c/x"}
    assert lora.desired(parse_spec({"model": "m"})) == {}


PLANS: list[tuple[str, list[PodSample], dict[tuple[str, str], float], list[tuple[str, str, str]]]] = [
    ("all served", [pod("a", "sql", "chat")], {}, []),
    ("load missing", [pod("a", "sql")], {}, [("a", "load", "chat")]),
    ("unload unwanted", [pod("a", "sql", "chat", "old")], {}, [("a", "unload", "old")]),
    (
        "new pod gets all",
        [pod("a", "sql", "chat"), pod("b")],
        {},
        [("b", "load", "chat"), ("b", "load", "sql")],
    ),
    ("unhealthy pod left alone", [pod("a", healthy=False), pod("b", ready=False)], {}, []),
    ("backoff respected", [pod("a", "sql")], {("a", "chat"): 100.0}, []),
    ("backoff over", [pod("a", "sql")], {("a", "chat"): 5.0}, [("a", "load", "chat")]),
    ("unreadable pod left alone", [pod("a", models_error=REFUSED), pod("b", "sql")], {},
     [("b", "load", "chat")]),
    ("our paths served", [pod("a", "sql", "chat", roots=OURS)], {}, []),
    ("swapped adapter unloaded", [pod("a", "sql", "chat", roots=SWAPPED)], {}, [("a", "unload", "sql")]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "pods", "waiting", "calls"), PLANS, ids=[p[0] for p in PLANS])
def test_plan_calls(
    case: str, pods: list[PodSample], waiting: dict[tuple[str, str], float], calls: list[tuple[str, str, str]]
) -> None:
    planned = lora.plan_calls(WANTED, pods, waiting, now=10.0)
    assert [(c.pod, c.action, c.name) for c in planned] == calls
    assert all(c.path == WANTED[c.name] for c in planned if c.action == "load")


def test_downloaded_adapters_load_only_where_the_init_step_fetched_them() -> None:
    spec = parse_spec(
        {
            "model": "m",
            "lora": {
                "adapters": [{"name": "s3a", "source": "s3://b/a"}, {"name": "hub", "source": "hf://o/hub"}]
            },
        }
    )
    wanted, remote = lora.desired(spec), lora.downloaded(spec)
    assert remote == {"/cache/sources/lora-s3a"}
    pods = [pod("old"), pod("new")]
    fetched = {"old": frozenset(), "new": frozenset(remote)}
    planned = lora.plan_calls(wanted, pods, {}, 0.0, remote, fetched)
    assert [(c.pod, c.name) for c in planned] == [("new", "hub"), ("new", "s3a"), ("old", "hub")]


def test_backoff_grows_and_caps() -> None:
    assert [lora.backoff(n) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 120.0]


CONDITIONS: list[tuple[str, list[PodSample], dict[str, str], str, str, list[str]]] = [
    ("served", [pod("a", "sql", "chat"), pod("b", "sql", "chat")], {}, "True", "AdaptersServed", []),
    ("still loading", [pod("a", "sql")], {}, "False", "Loading", ["chat", "a", "loading"]),
    ("load failed", [pod("a", "sql")], {"chat": "load answered 400: not found"}, "False", "LoadFailed",
     ["chat", "not found"]),
    ("no pods", [pod("a", healthy=False)], {}, "Unknown", "NoHealthyPods", []),
    ("swapped behind our back",
     [pod("a", "sql", "chat", roots=SWAPPED), pod("b", "sql", "chat", roots=OURS)], {},
     "False", "AdapterReplaced", ["sql", "pod a", "/tmp/evil", "/lora/sql"]),
    ("unverifiable", [pod("a", "sql", "chat"), pod("b", models_error=REFUSED)], {}, "Unknown",
     "AdaptersUnverified", ["pod b", "401"]),
    ("missing and unverifiable", [pod("a", "sql"), pod("b", models_error=REFUSED)], {}, "False",
     "Loading", ["chat", "pod b", "401"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "pods", "errors", "status", "reason", "words"), CONDITIONS, ids=[c[0] for c in CONDITIONS]
)
def test_condition(
    case: str, pods: list[PodSample], errors: dict[str, str], status: str, reason: str, words: list[str]
) -> None:
    verdict = lora.condition(WANTED, pods, errors)
    assert verdict[:2] == (status, reason)
    assert all(w in verdict[2] for w in words), verdict
    if status == "False" and reason != "AdapterReplaced":
        assert "sql" not in verdict[2]


def deployment_args(cluster: FakeCluster) -> list[str]:
    return cluster.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[no-any-return]


def with_adapters(obj: dict[str, Any], *names: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["spec"]["lora"] = {"adapters": [{"name": n, "source": f"/lora/{n}"} for n in names]}
    obj["metadata"]["generation"] += 1
    return obj


async def test_adding_an_adapter_does_not_roll_pods() -> None:
    cluster = FakeCluster(with_adapters(model(), "sql"))
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert "sql=/lora/sql" in deployment_args(cluster)
    cluster.model = with_adapters(cluster.model, "sql", "chat")
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert plan.apply == []
    cluster.model = with_adapters(cluster.model)
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert plan.apply == []


async def test_a_new_downloaded_adapter_rolls_pods_and_nothing_else_does() -> None:
    def adapters(*pairs: tuple[str, str]) -> dict[str, Any]:
        obj = copy.deepcopy(cluster.model)
        obj["spec"]["lora"] = {"adapters": [{"name": n, "source": src} for n, src in pairs]}
        return obj

    cluster = FakeCluster(model())
    s3, hub = ("a", "s3://bucket/a"), ("b", "hf://org/b")
    cluster.model = adapters(hub)
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    steps = [
        ("add s3", [hub, s3], True),  # only an init step can download it
        ("remove s3", [hub], False),  # unloaded; the pods keep the files
        ("add it back", [hub, s3], False),  # these pods downloaded it at start
        ("move it", [hub, ("a", "s3://bucket/a2")], True),
        ("add hub", [("a", "s3://bucket/a2"), hub, ("c", "hf://org/c")], False),
    ]
    for step, pairs, rolls in steps:
        cluster.model = adapters(*pairs)
        plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
        assert [m["kind"] for m in plan.apply] == (["Deployment"] if rolls else []), step
    init = cluster.objects["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"] for c in init] == [["s3://bucket/a2", "/cache/sources/lora-a"]]


async def test_a_roll_for_another_reason_starts_pods_with_every_adapter() -> None:
    cluster = FakeCluster(with_adapters(model(), "sql"))
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    cluster.model = with_adapters(cluster.model, "sql", "chat")
    cluster.model["spec"]["maxModelLen"] = 4096
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    assert [m["kind"] for m in plan.apply] == ["Deployment"]
    args = deployment_args(cluster)
    assert "sql=/lora/sql" in args and "chat=/lora/chat" in args


@pytest.mark.parametrize(
    "value", ["5", "null", '"x"', "{}", '{"a": 1}', "[5]", '[{"name": 7}]', "not json", ""]
)
async def test_a_hand_edited_static_adapters_annotation_never_wedges_the_model(value: str) -> None:
    cluster = FakeCluster(with_adapters(model(), "sql"))
    await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    cluster.objects["Deployment"]["metadata"]["annotations"][render.STATIC_ADAPTERS] = value
    cluster.model = with_adapters(cluster.model, "sql", "chat")
    plan, _ = await reconcile.reconcile(cluster, cluster.model, SETTINGS)
    # Unreadable, so the pods' adapters are unknown: the Deployment is rendered from the spec again.
    assert [m["kind"] for m in plan.apply] == ["Deployment"]
    assert render.static_adapters(cluster.objects["Deployment"]) is not None


class OrderedScraper:
    """Records the order of the adapter calls and of the status withdrawals around them."""

    def __init__(self, log: list[str], after: list[PodSample]) -> None:
        self.log, self.after = log, after

    async def call_adapters(self, calls: Any, ips: Any, token: str = "") -> list[str]:
        self.log += [f"{c.action} {c.name} on {c.pod}" for c in calls]
        return ["" for _ in calls]

    async def scrape_all(self, targets: Any) -> dict[int, list[PodSample]]:
        return {0: self.after}


async def test_the_status_stops_listing_an_adapter_before_it_is_unloaded() -> None:
    """The router routes by the status: a pod must drop out of it before its adapter goes, or a
    spec that wants the adapter again meanwhile sends requests to a pod that no longer has it."""
    from vllm_operator import adapters
    from vllm_operator.scrape import Target
    from vllm_operator.store import ModelState

    spec = parse_spec(
        model(lora={"maxLoraRank": 8, "adapters": [{"name": "sql", "source": "/lora/sql"}]})["spec"]
    )
    log: list[str] = []
    withdrawn: list[tuple[str, ...]] = []

    async def withdraw(samples: list[PodSample], verdict: adapters.Verdict) -> None:
        log.append("status written")
        withdrawn.extend(s.adapters for s in samples)

    scraper = OrderedScraper(log, [pod("p0", "sql")])
    targets = [Target(name="p0", ip="10.0.0.1", ready=True, lora=True)]
    current, _, _ = await adapters.manage_adapters(
        ModelState(),
        [pod("p0", "sql", "old")],
        spec,
        targets,
        "",
        scraper,
        withdraw,  # type: ignore[arg-type]
    )
    assert log == ["status written", "unload old on p0"]
    assert withdrawn == [("sql",)]
    assert [s.adapters for s in current] == [("sql",)]
    log.clear()
    # Loads alone withdraw nothing: a new adapter is listed only once the pod says it serves it.
    await adapters.manage_adapters(ModelState(), [pod("p0")], spec, targets, "", scraper, withdraw)  # type: ignore[arg-type]
    assert log == ["load sql on p0"]
