"""The router's data plane against fake pods: routing by name, alias and verified adapter, errors
in OpenAI's shape, streams passed through as they come, and retries only before the first byte."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.fakepod import PROMPT_TOKENS, FakePod, FakePods
from tests.router.conftest import RunningRouter, route
from vllm_operator import api

CHAT = "/v1/chat/completions"


def chat(client: httpx.Client, model: str, **extra: Any) -> httpx.Response:
    return client.post(CHAT, json={"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def events(response: httpx.Response) -> list[Any]:
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def two_pods(fake_pods: FakePods) -> tuple[list[tuple[str, FakePod]], FakePod, FakePod]:
    a, b = FakePod("a"), FakePod("b")
    pods = [(fake_pods.add(a), a), (fake_pods.add(b), b)]
    return pods, a, b


def test_routes_by_name_spreads_over_pods_and_reuses_connections(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    pods, a, b = two_pods(fake_pods)
    other = FakePod("o", served="other")
    running_router.use(route("tiny", pods), route("other", [(fake_pods.add(other), other)]))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        answered = Counter(chat(client, "tiny").json()["pod"] for _ in range(20))
        assert chat(client, "other").json()["pod"] == "o"
    assert answered == {"a": 10, "b": 10}  # idle pods take turns
    # Keep-alive to the pods: 20 requests, not 20 connections.
    assert a.connections + b.connections <= 4, (a.connections, b.connections)


def test_alias_is_rewritten_and_adapters_go_only_to_pods_that_serve_them(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    a, b = FakePod("a", adapters={"sql"}), FakePod("b")
    pods = [(fake_pods.add(a), a), (fake_pods.add(b), b)]
    running_router.use(
        route("tiny", pods, adapters=["sql", "poem"], routing=api.Routing(aliases=["tiny-latest"]))
    )
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        response = chat(client, "tiny-latest")
        assert response.status_code == 200 and response.json()["model"] == "tiny"
        assert {chat(client, "sql").json()["pod"] for _ in range(10)} == {"a"}
        unloaded = chat(client, "poem")
        listing = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert [s["model"] for s in a.seen + b.seen if s["model"] != "sql"] == ["tiny"]
    assert unloaded.status_code == 503 and unloaded.headers["retry-after"] == "1"
    assert "poem" in unloaded.json()["error"]["message"]
    assert set(listing) == {"tiny", "tiny-latest", "sql", "poem"}
    assert listing["sql"]["parent"] == "tiny" and "parent" not in listing["tiny"]


def test_a_known_model_without_ready_pods_is_listed_and_answered_503_not_404(
    running_router: RunningRouter,
) -> None:
    running_router.use(route("sleepy", [], pods=0))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        listed = [m["id"] for m in client.get("/v1/models").json()["data"]]
        waiting = chat(client, "sleepy")
        unknown = chat(client, "nope")
    assert listed == ["sleepy"]
    assert waiting.status_code == 503 and waiting.json()["error"]["type"] == "service_unavailable_error"
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": 404,
        }
    }


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "words"),
    [
        ("POST", CHAT, b"not json", 400, "not JSON"),
        ("POST", CHAT, b'{"messages": []}', 400, "`model`"),
        ("POST", CHAT, b'{"model": 7}', 400, "`model`"),
        ("POST", CHAT, b'["model"]', 400, "`model`"),
        ("POST", CHAT, b'{"model": "tiny", "pad": "' + b"x" * 70_000 + b'"}', 413, "--max-body-bytes"),
        ("GET", "/v1/nothing", b"", 404, "no route"),
        ("PUT", CHAT, b"{}", 405, "not routed"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_fix(
    running_router: RunningRouter, method: str, path: str, content: bytes, status: int, words: str
) -> None:
    running_router.use(route("tiny", []))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        response = client.request(method, path, content=content)
        assert response.status_code == status
        assert words in response.json()["error"]["message"]
        if status != 413:  # a refused upload closes its connection; others keep it
            assert client.get("/healthz").status_code == 200


def test_a_stream_is_relayed_as_it_is_produced(running_router: RunningRouter, fake_pods: FakePods) -> None:
    slow = FakePod("s", events=4, delay=0.4)
    running_router.use(route("tiny", [(fake_pods.add(slow), slow)]))
    arrivals: list[float] = []
    start = time.monotonic()
    with (
        httpx.Client(base_url=running_router.url, timeout=10) as client,
        client.stream("POST", CHAT, json={"model": "tiny", "stream": True}) as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 5  # 4 events and [DONE]
    # The first event arrives one pod delay after the request, not after the whole stream (2 s).
    assert arrivals[0] < 0.9 and arrivals[-1] - arrivals[0] > 1.0, arrivals


def test_retries_go_to_another_pod_only_before_the_first_byte(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    pods, a, b = two_pods(fake_pods)
    running_router.use(route("tiny", pods))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        for fault in ("drop", "503", "drop", "503"):
            a.faults.append(fault)  # a fails its next request, whichever that is
            answers = []
            while a.faults:
                response = chat(client, "tiny")
                assert response.status_code == 200, (fault, response.text)
                answers.append(response.json()["pod"])
            # The request that failed on a was sent again and answered (by b, or by a anew when
            # a's drop looked like a pooled connection it had just closed).
        # Cut after the first event: the client gets it, then an error event, never a duplicate.
        a.faults.append("cut")
        b.faults.append("cut")
        with client.stream("POST", CHAT, json={"model": "tiny", "stream": True}) as response:
            got = events(response)
        metrics = client.get("/metrics").text
    assert response.status_code == 200
    assert [e["i"] for e in got[:1]] == [0] and got[-1] == "[DONE]"
    assert got[1]["error"]["code"] == 502 and "closed the stream" in got[1]["error"]["message"]
    assert len(got) == 3
    assert 'vllm_router_retries_total{model="tiny"} 4.0' in metrics, metrics
    for address, _ in pods:  # upstream latency per pod, beside the per-model figures
        assert f'vllm_router_pod_first_byte_seconds_count{{pod="{address}"}}' in metrics
    assert 'vllm_router_broken_streams_total{model="tiny"} 1.0' in metrics


def test_every_pod_failing_gives_502_and_a_refusing_pod_is_skipped(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    pods, a, b = two_pods(fake_pods)
    running_router.use(route("tiny", pods))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        a.faults.extend(["drop"] * 3)
        b.faults.extend(["drop"] * 3)
        failed = chat(client, "tiny")
        assert failed.status_code == 502 and "failed before answering" in failed.json()["error"]["message"]
        a.faults.clear()
        b.faults.clear()
        # A pod whose port refuses connections (it restarted) costs one retry, not an error.
        dead = FakePod("dead")
        running_router.use(route("tiny", [("127.0.0.1:1", dead), pods[0]]))
        assert all(chat(client, "tiny").status_code == 200 for _ in range(6))
    assert not dead.seen


def test_client_disconnect_stops_the_pods_work(running_router: RunningRouter, fake_pods: FakePods) -> None:
    slow = FakePod("s", events=50, delay=0.1)
    running_router.use(route("tiny", [(fake_pods.add(slow), slow)]))
    with (
        httpx.Client(base_url=running_router.url, timeout=10) as client,
        client.stream("POST", CHAT, json={"model": "tiny", "stream": True}) as response,
    ):
        next(response.iter_lines())
    deadline = time.monotonic() + 3
    while slow.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.in_flight == 0  # the 5 s stream was abandoned with its client


def test_a_pod_killed_under_load_costs_no_request_that_had_not_started(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    """One of 4 pods dies mid-load: requests it held before their first byte go to another pod;
    only streams it had already started may end in an error event."""
    pods = [FakePod(f"p{i}", events=3, delay=0.2) for i in range(4)]
    addresses = [fake_pods.add(p) for p in pods]
    running_router.use(route("tiny", list(zip(addresses, pods, strict=True))))
    outcomes: list[tuple[bool, int, bool]] = []  # (stream, events before an error, failed)
    stop = threading.Event()

    def client(n: int) -> None:
        stream = n % 2 == 0
        with httpx.Client(base_url=running_router.url, timeout=20) as http:
            while not stop.is_set():
                if not stream:
                    r = chat(http, "tiny")
                    outcomes.append((False, 0, r.status_code != 200))
                    continue
                with http.stream("POST", CHAT, json={"model": "tiny", "stream": True}) as r:
                    got = events(r) if r.status_code == 200 else []
                errors = [e for e in got if isinstance(e, dict) and "error" in e]
                before = len([e for e in got if isinstance(e, dict) and "i" in e])
                outcomes.append((True, before, r.status_code != 200 or bool(errors)))

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, n) for n in range(16)]
        time.sleep(1.5)
        fake_pods.kill(addresses[0])
        time.sleep(1.5)
        stop.set()
        for future in futures:
            future.result()
    failed = [o for o in outcomes if o[2]]
    assert len(outcomes) > 60 and pods[0].seen  # the victim was serving when it died
    # Only streams that had delivered events may fail; nothing else is lost.
    assert all(stream and before >= 1 for stream, before, _ in failed), failed
    print(f"{len(outcomes)} requests, {len(failed)} streams cut after their first event")


def prompt(session: int, turn: int, system: str = "You are terse.") -> dict[str, Any]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for t in range(turn + 1):
        messages.append({"role": "user", "content": f"session {session} question {t} " + "x" * 40})
        if t < turn:
            messages.append({"role": "assistant", "content": f"answer {t}"})
    return {"model": "tiny", "messages": messages}


def test_prefix_affinity_keeps_conversations_on_one_pod_within_the_load_bound(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    pods = [FakePod(f"p{i}") for i in range(4)]
    served = [(fake_pods.add(p), p) for p in pods]
    running_router.use(route("tiny", served, routing=api.Routing(strategy="PrefixAffinity")))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        homes = {
            s: {client.post(CHAT, json=prompt(s, turn)).json()["pod"] for turn in range(4)} for s in range(16)
        }
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) >= 3  # sessions spread over the pods

    # One identical conversation start from 32 clients at once: the load bound spreads them.
    for pod in pods:
        pod.delay, pod.most_in_flight = 0.5, 0
    with ThreadPoolExecutor(32) as pool, httpx.Client(base_url=running_router.url, timeout=20) as client:
        answers = list(pool.map(lambda _: client.post(CHAT, json=prompt(0, 0)).json()["pod"], range(32)))
    bound = math.ceil(32 * 1.25 / 4)
    assert max(p.most_in_flight for p in pods) <= bound, [p.most_in_flight for p in pods]
    assert len(set(answers)) == 4


def test_session_header_pins_requests(running_router: RunningRouter, fake_pods: FakePods) -> None:
    pods = [FakePod(f"p{i}") for i in range(3)]
    running_router.use(
        route(
            "tiny",
            [(fake_pods.add(p), p) for p in pods],
            routing=api.Routing(session_header="x-session-id"),
        )
    )
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        homes = {s: {chat(client, "tiny", user=str(i)).json()["pod"] for i in range(3)} for s in ("s1",)}
        pinned = {
            s: {
                client.post(CHAT, json={"model": "tiny"}, headers={"x-session-id": s}).json()["pod"]
                for _ in range(5)
            }
            for s in ("alpha", "beta", "gamma", "delta")
        }
    assert len(homes["s1"]) > 1  # without the header, requests spread
    assert all(len(p) == 1 for p in pinned.values()), pinned


def test_sigterm_lets_an_open_stream_finish(fake_pods: FakePods, tmp_path: Path) -> None:
    """The real command: `vllm-operator router --upstream`, stopped mid-stream."""
    slow = FakePod("s", events=6, delay=0.25)
    address = fake_pods.add(slow)
    port = free_port()
    listen = ["--host", "127.0.0.1", "--port", str(port)]
    log = (tmp_path / "router.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_operator", "router", "--upstream", f"tiny=http://{address}", *listen],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "router.log").read_text()
            time.sleep(0.1)
        got: list[Any] = []

        def stream() -> None:
            with (
                httpx.Client(base_url=url, timeout=10) as client,
                client.stream("POST", CHAT, json={"model": "tiny", "stream": True}) as response,
            ):
                got.extend(events(response))

        reader = threading.Thread(target=stream)
        reader.start()
        while not slow.in_flight:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx_refused(url)  # no new connections once stopping
        reader.join(10)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert [e["i"] for e in got[:-1]] == list(range(6)) and got[-1] == "[DONE]"


def httpx_refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.TransportError:
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_callers_key_goes_to_the_pod_and_hop_headers_do_not(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    """The router holds no key: the pod checks the caller's Authorization header itself."""
    pod = FakePod("a")
    address = fake_pods.add(pod)
    running_router.use(route("tiny", [(address, pod)]))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        client.post(
            CHAT,
            json={"model": "tiny"},
            headers={
                "Authorization": "Bearer sk-1",
                "Connection": "keep-alive, X-Hop",
                "x-hop": "1",
                "x-trace": "7",
            },
        )
    seen = pod.seen[0]["headers"]
    assert seen["authorization"] == "Bearer sk-1" and seen["x-trace"] == "7"
    assert "keep-alive" not in seen.get("connection", "") and seen["host"] == address
    assert "x-hop" not in seen  # named in Connection: this hop's only (RFC 9110 7.6.1)


def test_a_refused_large_upload_still_reads_its_413(running_router: RunningRouter) -> None:
    """The router refuses a body over --max-body-bytes at its headers, while the client is still
    sending 64 MiB: the client reads the 413. The router half-closes and discards the rest for
    a while (a lingering close) rather than closing with the upload arriving, whose RST can
    destroy the answer on a real network; on loopback this test also passed before that."""
    running_router.use(route("tiny", []))
    big = b'{"model": "tiny", "pad": "' + b"x" * (64 * 1024 * 1024) + b'"}'
    for _ in range(3):
        with httpx.Client(base_url=running_router.url, timeout=10) as client:
            response = client.post(CHAT, content=big)
        assert response.status_code == 413
        assert "--max-body-bytes" in response.json()["error"]["message"]


def test_tokens_are_counted_from_the_usage_the_pods_send(
    running_router: RunningRouter, fake_pods: FakePods
) -> None:
    pod = FakePod("a", events=5)
    running_router.use(route("tiny", [(fake_pods.add(pod), pod)]))
    with httpx.Client(base_url=running_router.url, timeout=10) as client:
        for _ in range(2):  # JSON answers: usage {7, 1} each
            assert client.post(CHAT, json={"model": "tiny"}).status_code == 200
        with_usage = {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}}
        assert "usage" in client.post(CHAT, json=with_usage).text  # usage {7, 5}
        assert client.post(CHAT, json={"model": "tiny", "stream": True}).status_code == 200  # none
        metrics = client.get("/metrics").text
    assert f'vllm_router_prompt_tokens_total{{model="tiny"}} {3 * PROMPT_TOKENS}.0' in metrics, metrics
    assert 'vllm_router_generation_tokens_total{model="tiny"} 7.0' in metrics, metrics
