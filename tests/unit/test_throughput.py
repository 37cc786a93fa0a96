"""Aggregation of pod scrapes: rates, counter resets, pods that come and go, partial failures."""

from __future__ import annotations

import pytest

from vllm_operator.api import Metrics, PodStatus, VLLMModelStatus
from vllm_operator.throughput import (
    GENERATION_TOKENS,
    PROMPT_TOKENS,
    REQUESTS,
    PodSample,
    aggregate,
    parse_metrics,
    worth_writing,
)

PAGE = """# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1200.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 300.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 7.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 4.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""


def test_parse_metrics_sums_label_sets() -> None:
    counters, running, waiting, kv = parse_metrics(PAGE)
    assert counters == {GENERATION_TOKENS: 1200.0, PROMPT_TOKENS: 300.0, REQUESTS: 10.0}
    assert (running, waiting, kv) == (4.0, 1.0, 0.25)


def test_parse_metrics_old_cache_name_and_empty_page() -> None:
    _, _, _, kv = parse_metrics(
        '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{a="b"} 0.5\n'
    )
    assert kv == 0.5
    assert parse_metrics("") == ({GENERATION_TOKENS: 0.0, PROMPT_TOKENS: 0.0, REQUESTS: 0.0}, 0, 0, 0.0)


def sample(
    name: str, at: float, gen: float, *, healthy: bool = True, running: float = 0, **kw: object
) -> PodSample:
    return PodSample(
        name=name,
        at=at,
        ready=True,
        healthy=healthy,
        counters={GENERATION_TOKENS: gen, PROMPT_TOKENS: gen / 2, REQUESTS: gen / 100},
        running=running,
        **kw,  # type: ignore[arg-type]
    )


A0, B0 = sample("a", 0, 0), sample("b", 0, 0)
DOWN = PodSample("b", 10, ready=True, healthy=False, error="timed out")
CASES = [
    # name, previous samples, current samples, expected generation tokens/s
    ("first scrape has no rate", {}, [sample("a", 10, 500)], 0.0),
    ("one pod", {"a": sample("a", 0, 100)}, [sample("a", 10, 600)], 50.0),
    ("two pods summed", {"a": A0, "b": B0}, [sample("a", 10, 100), sample("b", 10, 300)], 40.0),
    ("counter reset counts what came after", {"a": sample("a", 0, 1000)}, [sample("a", 10, 200)], 20.0),
    ("new pod joins with no rate", {"a": A0}, [sample("a", 10, 100), sample("b", 10, 9999)], 10.0),
    ("gone pod contributes nothing", {"a": A0, "b": B0}, [sample("a", 10, 100)], 10.0),
    ("failed pod contributes nothing", {"a": A0, "b": B0}, [sample("a", 10, 100), DOWN], 10.0),
    ("pod recovering from a failure", {"a": PodSample("a", 0, ready=True)}, [sample("a", 10, 100)], 0.0),
]


@pytest.mark.parametrize(("case", "previous", "current", "tokens"), CASES, ids=[c[0] for c in CASES])
def test_generation_rate(
    case: str, previous: dict[str, PodSample], current: list[PodSample], tokens: float
) -> None:
    result = aggregate(previous, current, "t")
    assert result.metrics.generation_tokens_per_second == pytest.approx(tokens)
    assert result.metrics.prompt_tokens_per_second == pytest.approx(tokens / 2)


def test_gauges_unhealthy_and_pods() -> None:
    current = [
        sample("a", 10, 100, running=3, kv_cache_usage=0.2, adapters=("sql",)),
        sample("b", 10, 100, running=1, kv_cache_usage=0.4, adapters=("sql", "chat")),
        PodSample("c", 10, ready=True, healthy=False, error="connection refused"),
        PodSample("d", 10, ready=False),
    ]
    result = aggregate({}, current, "2026-01-01T00:00:00Z")
    assert result.metrics.running_requests == 4
    assert result.metrics.kv_cache_usage == pytest.approx(0.3)
    assert result.metrics.scraped_at == "2026-01-01T00:00:00Z"
    assert result.unhealthy == {"c": "connection refused"}
    assert [(p.name, p.ready, p.healthy) for p in result.pods] == [
        ("a", True, True),
        ("b", True, True),
        ("c", True, False),
        ("d", False, False),
    ]
    assert [(a.name, a.ready_pods) for a in result.adapters] == [("chat", 1), ("sql", 2)]


def test_pod_list_is_bounded() -> None:
    result = aggregate({}, [sample(f"p{i:03d}", 1, 0) for i in range(500)], "t")
    assert len(result.pods) == 64


def with_metrics(tokens: float, running: int = 0, healthy: bool = True) -> VLLMModelStatus:
    return VLLMModelStatus(
        phase="Ready",
        metrics=Metrics(generation_tokens_per_second=tokens, running_requests=running, scraped_at="x"),
        pods=[PodStatus(name="a", ready=True, healthy=healthy, generation_tokens_per_second=tokens)],
    )


HYSTERESIS = [
    ("same figures", with_metrics(100), with_metrics(100), False),
    ("rate jitter under 10 %", with_metrics(100), with_metrics(105), False),
    ("rate moved 20 %", with_metrics(100), with_metrics(120), True),
    ("tiny rates never matter", with_metrics(0.1), with_metrics(0.3), False),
    ("from idle to busy", with_metrics(0), with_metrics(50), True),
    ("running requests changed", with_metrics(100, running=2), with_metrics(100, running=3), True),
    ("pod turned unhealthy", with_metrics(100), with_metrics(100, healthy=False), True),
    ("first metrics", VLLMModelStatus(phase="Ready"), with_metrics(0), True),
]


@pytest.mark.parametrize(("case", "old", "new", "write"), HYSTERESIS, ids=[c[0] for c in HYSTERESIS])
def test_worth_writing(case: str, old: VLLMModelStatus, new: VLLMModelStatus, write: bool) -> None:
    assert worth_writing(old, new) is write
