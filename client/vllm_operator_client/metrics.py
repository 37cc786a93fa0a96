"""Per-request and per-batch figures: TTFT, latency, tokens and throughput."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestMetrics:
    """What one request cost, measured on the client's monotonic clock."""

    endpoint: str = ""
    started: float = 0.0  # monotonic time the request was first sent
    total_s: float = 0.0  # first send to last byte, retries included
    ttft_s: float | None = None  # first send to the first chunk carrying text (streams only)
    chunks: int = 0  # SSE data events carrying text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    # Seconds between consecutive text chunks (streams only).
    chunk_gaps_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the total time."""
        return self.completion_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def inter_token_s(self) -> float | None:
        """Mean time per output token after the first (streams only)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.total_s - self.ttft_s) / (self.completion_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        """Plain figures for JSON (without the per-chunk gaps)."""
        d = asdict(self)
        d.pop("chunk_gaps_s")
        d["tokens_per_s"] = self.tokens_per_s
        d["inter_token_s"] = self.inter_token_s
        return d


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None when empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class BatchMetrics:
    """Aggregate of many requests run together."""

    items: int
    errors: int
    total_s: float  # wall time of the whole batch
    prompt_tokens: int
    completion_tokens: int
    avg_item_s: float  # mean latency of the successful items
    items_per_s: float
    output_tokens_per_s: float
    ttft_p50_s: float | None

    @classmethod
    def of(cls, metrics: Sequence[RequestMetrics], errors: int, wall_s: float) -> BatchMetrics:
        """Summarize the metrics of the successful items of a batch that took `wall_s`."""
        done = len(metrics)
        out = sum(m.completion_tokens for m in metrics)
        ttfts = [m.ttft_s for m in metrics if m.ttft_s is not None]
        return cls(
            items=done + errors,
            errors=errors,
            total_s=wall_s,
            prompt_tokens=sum(m.prompt_tokens for m in metrics),
            completion_tokens=out,
            avg_item_s=sum(m.total_s for m in metrics) / done if done else 0.0,
            items_per_s=done / wall_s if wall_s > 0 else 0.0,
            output_tokens_per_s=out / wall_s if wall_s > 0 else 0.0,
            ttft_p50_s=percentile(ttfts, 50),
        )
