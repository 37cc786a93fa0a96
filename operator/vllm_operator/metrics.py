"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter("vllm_operator_reconciles_total", "Reconciles of VLLMModels, by result.", ["result"])
COALESCED = Counter(
    "vllm_operator_coalesced_triggers_total",
    "Child events that needed no reconcile of their own: one of their model was already due.",
)
RECONCILE_SECONDS = Histogram(
    "vllm_operator_reconcile_duration_seconds",
    "Time one reconcile takes, API calls included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
APPLIES = Counter("vllm_operator_applies_total", "Children server-side applied, by kind.", ["kind"])
STATUS_WRITES = Counter("vllm_operator_status_writes_total", "Status patches written.")
SCALES = Counter(
    "vllm_operator_scales_total", "Replica changes the autoscaler wrote, by direction.", ["direction"]
)
EVENTS = Counter("vllm_operator_events_total", "Kubernetes Events posted, by type.", ["type"])


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve /metrics from a background thread."""
    start_http_server(port, addr=address)


SCRAPE_SECONDS = Histogram(
    "vllm_operator_scrape_duration_seconds",
    "Time to read one pod's /health, /metrics and /v1/models.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SCRAPE_FAILURES = Counter("vllm_operator_scrape_failures_total", "Pod scrapes that failed.")
SCRAPE_ROUND_SECONDS = Histogram(
    "vllm_operator_scrape_round_duration_seconds",
    "Time of one scrape round over every pod the operator watches.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
