"""The routing table as a pure function of VLLMModels and pods, and the balancer's choices."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from vllm_operator import throughput
from vllm_operator.api import RoutingStatus
from vllm_operator.router import balance, proxy, stats, table


def model(
    name: str,
    *,
    namespace: str = "ns",
    created: str = "2026-01-01T00:00:00Z",
    spec: dict[str, Any] | None = None,
    pods: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": {"model": "/models/m", **(spec or {})},
        "status": {"pods": pods or []},
    }


def pod(name: str, of: str, ip: str = "10.0.0.1", ready: bool = True, **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": {"app.kubernetes.io/instance": of}, **meta},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def infos(*pods: dict[str, Any]) -> list[table.PodInfo]:
    return [i for i in (table.pod_info(p) for p in pods) if i is not None]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (pod("p", "m"), table.PodInfo("ns", "p", "m", "10.0.0.1", True)),
        (pod("p", "m", ready=False), table.PodInfo("ns", "p", "m", "10.0.0.1", False)),
        (pod("p", "m", ip=""), table.PodInfo("ns", "p", "m", "", False)),
        (
            pod("p", "m", deletionTimestamp="2026-01-01T00:00:00Z"),
            table.PodInfo("ns", "p", "m", "10.0.0.1", False),
        ),
        ({"metadata": {"name": "p", "labels": {}}}, None),
        ({}, None),
    ],
)
def test_pod_info(obj: dict[str, Any], expected: table.PodInfo | None) -> None:
    assert table.pod_info(obj) == expected


def test_names_route_to_ready_pods_and_adapters_only_to_pods_that_serve_them() -> None:
    spec = {
        "servedModelName": "llama",
        "lora": {"adapters": [{"name": "sql", "source": "/a"}, {"name": "poem", "source": "/b"}]},
        "routing": {"aliases": ["llama-latest"]},
    }
    status_pods = [{"name": "m-a", "loraAdapters": ["sql"]}, {"name": "m-b", "loraAdapters": []}]
    built = table.build(
        [model("m", spec=spec, pods=status_pods)],
        infos(
            pod("m-a", "m", "10.0.0.1"), pod("m-b", "m", "fd00::2"), pod("m-c", "m", "10.0.0.3", ready=False)
        ),
    )
    base = built.resolve("llama")
    assert base is not None and [e.address for e in base.eligible()] == ["10.0.0.1:8000", "[fd00::2]:8000"]
    assert base.route.pods == 3
    alias = built.resolve("llama-latest")
    assert alias is not None and alias.rewrite == "llama"
    sql = built.resolve("sql")
    assert sql is not None and [e.pod for e in sql.eligible()] == ["m-a"]
    poem = built.resolve("poem")
    assert poem is not None and poem.eligible() == ()
    assert built.resolve("m") is None  # the served name replaces metadata.name
    assert [e["id"] for e in built.listing()] == ["llama", "llama-latest", "poem", "sql"]


def test_the_older_resource_keeps_a_contested_name() -> None:
    old = model("old", namespace="a", created="2026-01-01T00:00:00Z", spec={"servedModelName": "shared"})
    new = model("new", namespace="b", created="2026-02-01T00:00:00Z", spec={"servedModelName": "shared"})
    for order in ([old, new], [new, old]):
        built = table.build(order, [])
        target = built.resolve("shared")
        assert target is not None and target.route.key == "a/old"
        assert built.conflicts == ("b/new: name 'shared' is already served by a/old",)


def test_invalid_models_and_other_namespaces_pods_are_left_out() -> None:
    built = table.build(
        [model("bad", spec={"replicas": -1}), model("good")],
        infos(
            {**pod("good-x", "good"), "metadata": {**pod("good-x", "good")["metadata"], "namespace": "other"}}
        ),
    )
    assert built.resolve("bad") is None
    good = built.resolve("good")
    assert good is not None and good.eligible() == () and good.route.pods == 0


@pytest.mark.parametrize(
    ("upstreams", "error"),
    [
        ([("m", "http://127.0.0.1:9000"), ("m", "http://127.0.0.1:9001")], None),
        ([("m", "https://h:1")], "http://HOST:PORT"),
        ([("m", "http://h:1/v1")], "without a path"),
    ],
)
def test_static_upstreams(upstreams: list[tuple[str, str]], error: str | None) -> None:
    if error is not None:
        with pytest.raises(ValueError, match=error):
            table.static(upstreams)
        return
    target = table.static(upstreams).resolve("m")
    assert target is not None and [e.address for e in target.eligible()] == [
        "127.0.0.1:9000",
        "127.0.0.1:9001",
    ]


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (
            {"messages": [{"role": "system", "content": "S" * 9}, {"role": "user", "content": "U" * 9}]},
            "SSSS\x00UUUU",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "abcdef"}]},
                    {"role": "assistant", "content": "x"},
                    {"role": "user", "content": "later"},
                ]
            },
            "\x00abcd",
        ),
        ({"messages": [{"role": "assistant", "content": "x"}]}, None),
        ({"messages": ["junk", 3]}, None),
        ({"prompt": "hello world"}, "hell"),
        ({"prompt": ["first prompt", "second"]}, "firs"),
        ({"prompt": [1, 2, 3]}, None),
        ({}, None),
    ],
)
def test_prefix_key(body: dict[str, Any], key: str | None) -> None:
    assert balance.prefix_key(body, 4) == key


def endpoints(n: int) -> list[table.Endpoint]:
    return [table.Endpoint(pod=f"p{i}", address=f"10.0.0.{i}:8000") for i in range(n)]


def test_least_load_prefers_the_idlest_and_takes_turns_on_ties() -> None:
    b = balance.Balancer()
    eps = endpoints(3)
    assert Counter(b.pick(eps).pod for _ in range(30)) == {"p0": 10, "p1": 10, "p2": 10}  # type: ignore[union-attr]
    b.acquire(eps[0].address)
    b.acquire(eps[1].address)
    assert {b.pick(eps).pod for _ in range(5)} == {"p2"}  # type: ignore[union-attr]
    assert b.pick(eps, exclude={e.address for e in eps}) is None


def test_a_refusing_pod_is_skipped_for_a_moment_unless_it_is_the_only_one() -> None:
    b = balance.Balancer()
    eps = endpoints(2)
    b.mark_down(eps[0].address, now=100.0)
    assert {b.pick(eps, now=100.5).pod for _ in range(4)} == {"p1"}  # type: ignore[union-attr]
    assert {b.pick(eps, now=101.5).pod for _ in range(4)} == {"p0", "p1"}  # type: ignore[union-attr]
    assert b.pick(eps[:1], now=100.5) == eps[0]


def test_affinity_is_stable_and_bounded() -> None:
    b = balance.Balancer()
    eps = endpoints(4)
    homes = {f"session {i}": b.pick(eps, key=f"session {i}") for i in range(200)}
    assert all(b.pick(eps, key=k) == e for k, e in homes.items())  # the same key, the same pod
    assert min(Counter(e.address for e in homes.values() if e).values()) > 25  # keys spread (50 each)
    # One hot key with requests held open: the bound (1.25 x mean, rounded down) moves the excess.
    for _ in range(40):
        chosen = b.pick(eps, key="hot", load_factor=1.25)
        assert chosen is not None
        b.acquire(chosen.address)
    assert max(b.in_flight.values()) <= 12 and len(b.in_flight) == 4  # at most 1.2 x the mean of 10
    # Removing a pod moves only its own keys.
    moved = [k for k, e in homes.items() if e != eps[3] and balance.Balancer().pick(eps[:3], key=k) != e]
    assert not moved


@pytest.mark.parametrize("in_flight", [8, 32, 33, 100])
def test_affinity_never_puts_more_than_load_factor_times_the_mean_on_a_pod(in_flight: int) -> None:
    """Many keys with requests held open: max/mean <= loadFactor (rounding up reached 1.375 at 32)."""
    b = balance.Balancer()
    eps = endpoints(4)
    for i in range(in_flight):
        chosen = b.pick(eps, key=f"conversation {i % 5}", load_factor=1.25)
        assert chosen is not None
        b.acquire(chosen.address)
    loads = [b.in_flight.get(e.address, 0) for e in eps]
    assert max(loads) <= 1.25 * in_flight / 4 + 1e-9, loads


def test_a_moved_key_stays_where_the_bound_sent_it() -> None:
    """After the bound moved a conversation, its next turns go where its prefix is now cached,
    even once its ring pod has room again."""
    b = balance.Balancer()
    eps = endpoints(4)
    home = b.pick(eps, key="talk")
    assert home is not None
    for _ in range(3):  # the ring pod busy with other work: past the bound
        b.acquire(home.address)
    moved = b.pick(eps, key="talk")
    assert moved is not None and moved != home
    for _ in range(3):
        b.release(home.address)
    assert {b.pick(eps, key="talk") for _ in range(5)} == {moved}


def test_round_robin_takes_turns_whatever_the_load() -> None:
    b = balance.Balancer()
    eps = endpoints(3)
    for _ in range(5):
        b.acquire(eps[0].address)
    picks = [b.pick(eps, rotate=True) for _ in range(6)]
    assert Counter(e.pod for e in picks if e) == {"p0": 2, "p1": 2, "p2": 2}


@pytest.mark.parametrize(
    ("demand", "views"),
    [
        (
            {"models": {"m": {"namespace": "ns", "resource": "r", "pods": 3, "readyPods": 2, "inFlight": 5}}},
            {("ns", "r"): RoutingStatus(endpoints=3, ready_endpoints=2, in_flight=5)},
        ),
        (
            {
                "models": {
                    "m": {"namespace": "ns", "resource": "r", "pods": -1, "readyPods": 2, "inFlight": 5}
                }
            },
            {},
        ),
        (
            {
                "models": {
                    "m": {"namespace": "ns", "resource": "r", "pods": 1, "readyPods": True, "inFlight": 0}
                }
            },
            {},
        ),
        ({"models": {"m": {"namespace": 3, "resource": "r", "pods": 1, "readyPods": 1, "inFlight": 0}}}, {}),
        ({"models": {"m": "junk"}}, {}),
        ({"models": []}, {}),
        ([], {}),
        (None, {}),
    ],
)
def test_router_view_reads_only_well_formed_entries(demand: Any, views: dict[Any, RoutingStatus]) -> None:
    assert throughput.router_view(demand) == views


def test_router_view_of_a_built_table_round_trips() -> None:
    """What the router serves at /router/demand is what the operator reads."""
    built = table.build(
        [model("m", spec={"servedModelName": "llama"})], infos(pod("m-a", "m"), pod("m-b", "m"))
    )
    demand = stats.Stats().demand(built, {"10.0.0.1:8000": 2})
    assert throughput.router_view(json.loads(json.dumps(demand))) == {
        ("ns", "m"): RoutingStatus(endpoints=2, ready_endpoints=2, in_flight=0)
    }


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        pytest.param([(b"x-a", b"1")], [b"x-a"], id="end-to-end-kept"),
        pytest.param([(b"Connection", b"close"), (b"TE", b"trailers")], [], id="standard-hop-dropped"),
        pytest.param(
            [(b"connection", b"X-Hop, x-other"), (b"x-hop", b"1"), (b"X-OTHER", b"2"), (b"x-end", b"3")],
            [b"x-end"],
            id="named-by-connection-dropped-any-case",
        ),
        pytest.param([(b"content-length", b"5"), (b"host", b"h")], [], id="framing-and-host-dropped"),
    ],
)
def test_end_to_end_headers(headers: list[tuple[bytes, bytes]], kept: list[bytes]) -> None:
    assert [k for k, _ in proxy.end_to_end(headers)] == kept
