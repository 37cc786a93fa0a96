"""How many replicas a model's load asks for: pure functions over observed signals.

The autoscaler (`autoscaler.py`) feeds one `Signals` per tick into a `History` and asks `decide`.
Scale-ups act on the larger of two averages of the load: over the stable window, and over the
short panic window once that one needs `panicThreshold` x the ready replicas (a burst). A
scale-down waits `scaleDownDelaySeconds` after the last scale-up and then takes the highest
need seen over that delay, so a square wave of load moves the replicas once, not every cycle.
Going to zero needs `minReplicas: 0`, the router's view (it holds the next request while the
model wakes) and no activity for `idleSeconds`; waking from zero is the router's write, not
ours, so that many held requests make exactly one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from vllm_operator.api import Autoscaling

WAKE_FALLBACK_SECONDS = 5.0
"""Requests held at zero this long mean the router's wake-up write failed: the operator writes it."""


@dataclass(frozen=True)
class Signals:
    """A model's load at one instant."""

    at: float
    """Monotonic seconds."""
    in_flight: int | None
    """Requests in flight or held at the router; None without a router view."""
    requests: int | None
    """Requests the router has answered so far (a counter); None without a router view."""
    running: int = 0
    """Requests the engines run, summed over pods (from the last scrape)."""
    waiting: int = 0
    """Requests queued in the engines, summed over pods (from the last scrape)."""
    kv_cache: float = 0.0
    """KV-cache use, mean over the pods scraped."""
    ready: int = 0


@dataclass
class History:
    """What the autoscaler remembers of one model: samples, and when things last happened.

    A new History (an operator start) counts as a fresh scale-up and as activity, so a restarted
    operator never scales down or to zero before a full delay of its own observations.
    """

    started: float
    samples: deque[Signals] = field(default_factory=deque)
    last_scale_up: float = 0.0
    last_activity: float = 0.0
    needs: deque[tuple[float, int]] = field(default_factory=deque)
    """(time, replicas the load needed) over the scale-down delay."""
    requests: int | None = None
    replicas: int = 0
    """spec.replicas as last seen, to notice a wake-up the router wrote."""

    def __post_init__(self) -> None:
        self.last_scale_up = self.last_scale_up or self.started
        self.last_activity = self.last_activity or self.started


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    panic: bool = False


def observe(history: History, signals: Signals, spec: Autoscaling) -> None:
    """Add a sample; activity is any request in flight, queued or answered since the last one."""
    history.samples.append(signals)
    while history.samples and history.samples[0].at <= signals.at - spec.stable_window_seconds:
        history.samples.popleft()
    moved = (
        signals.requests is not None and history.requests is not None and signals.requests != history.requests
    )
    if moved or (signals.in_flight or 0) > 0 or signals.running > 0 or signals.waiting > 0:
        history.last_activity = signals.at
    if signals.requests is not None:
        history.requests = signals.requests


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def need(samples: list[Signals], spec: Autoscaling) -> tuple[int, str]:
    """Replicas the mean load of `samples` needs by each target; the largest, and why."""
    load = _mean([float(s.in_flight if s.in_flight is not None else s.running + s.waiting) for s in samples])
    best = (
        math.ceil(load / spec.target_in_flight - 1e-9),
        f"{load:.1f} in flight for {spec.target_in_flight:g} per replica",
    )
    if spec.target_waiting is not None:
        waiting = _mean([float(s.waiting) for s in samples])
        count = math.ceil(waiting / spec.target_waiting - 1e-9)
        if count > best[0]:
            best = (count, f"{waiting:.1f} waiting for {spec.target_waiting:g} per replica")
    if spec.target_kv_cache is not None:
        used = _mean([s.kv_cache * s.ready for s in samples])
        count = math.ceil(used / spec.target_kv_cache - 1e-9)
        if count > best[0]:
            best = (count, f"KV cache {used:.2f} replicas full for {spec.target_kv_cache:g} per replica")
    return best


def decide(history: History, spec: Autoscaling, current: int, now: float) -> Decision:
    """The replicas to run now and why; `current` is the model's `spec.replicas`."""
    samples = list(history.samples)
    if not samples:
        return Decision(current, "no load observed yet")
    latest = samples[-1]
    stable, stable_why = need(samples, spec)
    recent = [s for s in samples if s.at > now - spec.panic_window_seconds]
    burst, burst_why = need(recent, spec)
    # A step of load shows in the window's mean only once it fills a share of the window (a
    # quarter for 4x at the default threshold: 1.5 s of 6); load held over the last two
    # samples is a burst already, so a step is acted on at the second tick after it.
    if len(samples) >= 2:
        sustained, sustained_why = min((need([s], spec) for s in samples[-2:]), key=lambda n: n[0])
        if sustained > burst:
            burst, burst_why = sustained, sustained_why
    panic = burst >= spec.panic_threshold * max(latest.ready, 1) and burst > current and burst > stable
    wanted, why = (burst, f"burst: {burst_why}") if panic else (stable, stable_why)

    routed = latest.in_flight is not None
    idle_for = now - history.last_activity
    # Idle is "no activity for idleSeconds", not "the stable mean is 0": a burst would keep
    # a model up for a whole stable window past idleSeconds otherwise.
    if spec.min_replicas == 0 and routed and idle_for >= spec.idle_seconds:
        if current == 0:
            return Decision(0, f"idle for {idle_for:.0f}s")
        if now - history.last_scale_up >= spec.scale_down_delay_seconds:
            return Decision(0, f"idle for {idle_for:.0f}s (idleSeconds {spec.idle_seconds})")
    floor = max(spec.min_replicas, 1)
    wanted = min(max(wanted, floor), spec.max_replicas)

    # A scale-down keeps the highest need of the delay, short bursts included: the stable mean
    # of a square wave is half its peak, and remembering only that flapped every cycle.
    while history.needs and history.needs[0][0] <= now - spec.scale_down_delay_seconds:
        history.needs.popleft()
    history.needs.append((now, min(max(wanted, burst), spec.max_replicas)))

    if current == 0:
        if routed and spec.min_replicas == 0:
            # The router holds the requests and writes the one wake-up itself, within ms. If
            # requests are still held at zero WAKE_FALLBACK_SECONDS later, its write failed
            # (e.g. no RBAC for it): the operator wakes the model. Its write tests for 0, so it
            # never adds a second one to the router's.
            waiting_since = next((s.at for s in reversed(samples) if not s.in_flight), samples[0].at - 1e-9)
            if latest.in_flight and now - waiting_since >= WAKE_FALLBACK_SECONDS:
                return Decision(floor, f"requests held at zero for {now - waiting_since:.0f}s: waking it")
            return Decision(0, "at zero: the router wakes it on the next request")
        return Decision(floor, "at zero without a router view: back to minimum")
    if wanted > current:
        return Decision(wanted, why, panic)
    if wanted < current:
        since = now - history.last_scale_up
        if since < spec.scale_down_delay_seconds:
            return Decision(
                current, f"{why}; scale-down waits {spec.scale_down_delay_seconds - since:.0f}s more"
            )
        highest = max(n for _, n in history.needs)
        if highest < current:
            return Decision(highest, f"{why}; highest need over {spec.scale_down_delay_seconds}s: {highest}")
        return Decision(current, f"{why}; needed {highest} within {spec.scale_down_delay_seconds}s")
    return Decision(current, why)


def scaled(history: History, old: int, new: int, now: float) -> None:
    """Record a replica change the autoscaler made (or the router's wake from zero)."""
    if new > old:
        history.last_scale_up = now
