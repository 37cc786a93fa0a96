"""The pure autoscaling planner (autoscale.py), table-driven and on a fake clock.

`Loop` plays the operator's loop for one model (autoscaler._model): one Signals per tick into
observe(), then decide(), and scaled() whenever the decision differs from the current replicas.
Time only moves when a test advances it; nothing sleeps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from vllm_operator.api import Autoscaling
from vllm_operator.autoscale import (
    WAKE_FALLBACK_SECONDS,
    Decision,
    History,
    Signals,
    decide,
    need,
    observe,
    scaled,
)
from vllm_operator.autoscaler import RouterDemand, demand_of, engine_signals
from vllm_operator.throughput import PodSample

START = 1000.0
"""The fake monotonic clock's first reading."""

Load = Callable[[float], int]
"""Requests the clients keep in flight at a moment."""


def policy(**overrides: Any) -> Autoscaling:
    """spec.autoscaling with maxReplicas 10 and the defaults, but for `overrides` (snake_case)."""
    return Autoscaling.model_validate({"max_replicas": 10, **overrides})


def sig(at: float, in_flight: int | None = 0, requests: int | None = 0, **engine: Any) -> Signals:
    return Signals(at=at, in_flight=in_flight, requests=requests, **engine)


def idle(_: float) -> int:
    return 0


def constant(level: int) -> Load:
    return lambda _: level


def step(at: float, level: int) -> Load:
    """Nothing before `at`, then `level` in flight."""
    return lambda t: level if t >= at else 0


def square(start: float, period: float, level: int) -> Load:
    """`level` in flight for the first half of each period from `start`, nothing in the second."""
    return lambda t: level if t >= start and (t - start) % period < period / 2 else 0


@dataclass(frozen=True)
class Change:
    at: float
    old: int
    new: int
    decision: Decision


@dataclass
class Loop:
    """The operator's loop for one model on a fake clock; `History` starts when the Loop does."""

    spec: Autoscaling
    current: int
    now: float = START
    ready_lag: float = 0.0
    """Seconds a pod takes to become ready after a scale-up."""
    replica_log: list[tuple[float, int]] = field(default_factory=list)
    """(time, spec.replicas): what `ready` follows, `ready_lag` seconds late."""
    answered: int = 0
    """The router's answered-requests counter."""
    changes: list[Change] = field(default_factory=list)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    history: History = field(init=False)

    def __post_init__(self) -> None:
        self.history = History(started=self.now, replicas=self.current)
        if not self.replica_log:
            self.replica_log.append((-math.inf, self.current))

    def ready(self) -> int:
        """Pods ready now: those asked for `ready_lag` ago, fewer at once after a scale-down."""
        asked = [n for at, n in self.replica_log if at <= self.now - self.ready_lag]
        return min(asked[-1], self.current)

    def set_replicas(self, replicas: int) -> None:
        """spec.replicas changed: by our decision, or by the router waking the model."""
        self.current = replicas
        self.replica_log.append((self.now, replicas))

    def tick(
        self, in_flight: int | None, *, router: bool = True, answered: int | None = None, **engine: Any
    ) -> Decision:
        """One tick at `now` with the router's view (unless `router` is False) and the engines'."""
        if answered is not None:
            self.answered += answered
        engine.setdefault("ready", self.ready())
        signals = Signals(
            at=self.now,
            in_flight=in_flight if router else None,
            requests=self.answered if router else None,
            **engine,
        )
        if self.current > self.history.replicas:
            scaled(self.history, self.history.replicas, self.current, self.now)  # the router woke it
        self.history.replicas = self.current
        observe(self.history, signals, self.spec)
        decision = decide(self.history, self.spec, self.current, self.now)
        if decision.replicas != self.current:
            scaled(self.history, self.current, decision.replicas, self.now)
            self.changes.append(Change(self.now, self.current, decision.replicas, decision))
            self.history.replicas = decision.replicas
            self.set_replicas(decision.replicas)
        self.decisions.append((self.now, decision))
        return decision

    def run(self, seconds: float, load: Load, *, every: float = 1.0, router: bool = True) -> None:
        """Tick every `every` seconds for `seconds`; the router answers what was in flight each tick.

        Without the router the same load shows as the engines' running requests.
        """
        end = self.now + seconds
        while self.now < end - 1e-9:
            level = load(self.now)
            if router:
                self.tick(level, answered=level)
            else:
                self.tick(None, router=False, running=level)
            self.now += every

    def ups(self) -> list[Change]:
        return [c for c in self.changes if c.new > c.old]

    def downs(self) -> list[Change]:
        return [c for c in self.changes if c.new < c.old]

    def first_zero(self) -> float | None:
        return next((c.at for c in self.changes if c.new == 0), None)


def assert_no_early_scale_down(loop: Loop) -> None:
    """No scale-down sooner than scaleDownDelaySeconds after the last scale-up (or the start)."""
    last_up = loop.history.started
    for change in loop.changes:
        if change.new > change.old:
            last_up = change.at
        else:
            assert change.at - last_up >= loop.spec.scale_down_delay_seconds, (change, last_up)


# 1. A step from idle to four replicas' worth: panic within 2 s, then four replicas.


@pytest.mark.parametrize("offset", [0.0, 0.5], ids=["ticks-on-the-second", "ticks-half-a-second-off"])
@pytest.mark.parametrize("ready_lag", [0.0, 30.0], ids=["pods-ready-at-once", "pods-ready-after-30s"])
def test_step_to_four_times_capacity_panics_up_within_two_seconds(offset: float, ready_lag: float) -> None:
    spec = policy()
    loop = Loop(spec, current=1, ready_lag=ready_lag)
    jump = START + 120.0
    load = step(jump, 4 * int(spec.target_in_flight))
    loop.run(120.0 + offset, load)
    assert loop.changes == []  # idle at one replica before the step

    loop.run(2.0, load)
    assert loop.changes, "no scale-up within 2 s of the step"
    first = loop.changes[0]
    assert first.at - jump <= 2.0
    assert first.new > first.old == 1
    assert first.decision.panic
    assert first.decision.reason.startswith("burst: ")

    loop.run(120.0, load)
    assert loop.current == 4
    assert max(c.new for c in loop.changes) == 4  # no overshoot
    assert loop.downs() == []


# 2. A 60 s square wave: few changes per cycle, no scale-down inside the delay.

PERIOD = 60.0
CYCLES = 12


def square_wave(level: int, offset: float = 0.0) -> Loop:
    loop = Loop(policy(), current=1, now=START + offset)
    loop.run(CYCLES * PERIOD, square(START, PERIOD, level))
    return loop


def changes_per_cycle(loop: Loop) -> list[int]:
    """Replica changes in each whole cycle after the first."""
    return [
        sum(1 for c in loop.changes if START + k * PERIOD <= c.at < START + (k + 1) * PERIOD)
        for k in range(1, CYCLES)
    ]


@pytest.mark.parametrize(
    "level",
    [
        pytest.param(16, id="2-replicas-high"),
        pytest.param(32, id="4-replicas-high"),
        pytest.param(48, id="6-replicas-high"),
    ],
)
@pytest.mark.parametrize("offset", [0.0, 0.5], ids=["ticks-on-the-second", "ticks-half-a-second-off"])
def test_square_wave_moves_few_times_per_cycle(level: int, offset: float) -> None:
    loop = square_wave(level, offset)
    assert loop.ups(), "the load never scaled the model up"
    assert max(c.new for c in loop.changes) == math.ceil(level / loop.spec.target_in_flight)
    counts = changes_per_cycle(loop)
    assert all(count <= loop.spec.min_replicas + 1 for count in counts), counts
    assert_no_early_scale_down(loop)
    assert min(d.replicas for _, d in loop.decisions) >= loop.spec.min_replicas


@pytest.mark.parametrize("level", [16, 32, 48], ids=["2-replicas-high", "4-replicas-high", "6-replicas-high"])
def test_square_wave_settles_and_never_scales_down_mid_peak(level: int) -> None:
    loop = square_wave(level)
    peak = math.ceil(level / loop.spec.target_in_flight)
    mid_peak = [c for c in loop.downs() if square(START, PERIOD, level)(c.at)]
    settled = [c for c in loop.changes if c.at >= START + 3 * PERIOD]
    assert loop.current == peak
    assert mid_peak == [], [(c.at - START, c.old, c.new, c.decision.reason) for c in mid_peak]
    assert settled == [], [(c.at - START, c.old, c.new, c.decision.reason) for c in settled]


# 3. Scale-down waits the delay, then takes the highest need over it.


def test_scale_down_waits_the_delay_then_steps_through_the_highest_need() -> None:
    spec = policy(stable_window_seconds=10, panic_window_seconds=2)
    loop = Loop(spec, current=1)
    loop.run(60.0, constant(32))
    assert loop.current == 4
    up = loop.ups()[-1].at
    fall = loop.now  # from here: 30 s more at 4 replicas' worth, 60 s at 3, then 1

    def phases(t: float) -> int:
        return 32 if t < fall + 30 else 24 if t < fall + 90 else 8

    loop.run(400.0, phases)

    downs = loop.downs()
    assert [c.at for c in loop.ups()] == [up]  # the way down never goes back up
    assert (downs[0].old, downs[0].new) == (4, 3)  # not straight to 1
    assert "highest need over 120s: 3" in downs[0].decision.reason
    assert downs[0].at - up >= spec.scale_down_delay_seconds
    assert downs[0].at >= fall + 30 + spec.scale_down_delay_seconds - 1  # 4 was needed until fall + 30
    below_three = next(c.at for c in downs if c.new < 3)
    assert below_three >= fall + 90 + spec.scale_down_delay_seconds - 1  # 3 was needed until fall + 90
    assert loop.current == 1
    assert_no_early_scale_down(loop)


def waiting_history(last_up: float, needs: list[tuple[float, int]]) -> History:
    return History(started=0.0, last_scale_up=last_up, needs=deque(needs))


@pytest.mark.parametrize(
    ("last_up", "needs", "now", "expected", "why"),
    [
        pytest.param(100.0, [], 219.0, 4, "scale-down waits 1s more", id="one-second-before-the-delay"),
        pytest.param(100.0, [], 220.0, 1, "highest need over 120s: 1", id="at-the-delay"),
        pytest.param(
            100.0, [(150.0, 3), (200.0, 2)], 220.0, 3, "highest need over 120s: 3", id="takes-the-highest"
        ),
        pytest.param(
            100.0, [(100.0, 3), (200.0, 2)], 220.0, 2, "highest need over 120s: 2", id="older-need-gone"
        ),
        pytest.param(100.0, [(150.0, 4)], 220.0, 4, "needed 4 within 120s", id="current-still-needed"),
        pytest.param(100.0, [(150.0, 9)], 220.0, 4, "needed 9 within 120s", id="never-up-on-the-way-down"),
    ],
)
def test_scale_down_decision(
    last_up: float, needs: list[tuple[float, int]], now: float, expected: int, why: str
) -> None:
    history = waiting_history(last_up, needs)
    spec = policy()
    observe(history, sig(now), spec)
    decision = decide(history, spec, 4, now)
    assert (decision.replicas, decision.panic) == (expected, False)
    assert why in decision.reason


def test_scale_down_with_no_delay() -> None:
    spec = policy(scale_down_delay_seconds=0)
    history = History(started=0.0)
    observe(history, sig(10.0), spec)
    assert decide(history, spec, 3, 10.0).replicas == 1


# 4. Scale to zero: minReplicas 0, the router's view, idleSeconds of nothing, the delay.


@pytest.mark.parametrize(
    ("idle_seconds", "delay", "binds"),
    [
        pytest.param(300, 120, "idle", id="idleSeconds-binds"),
        pytest.param(30, 600, "delay", id="scaleDownDelay-binds"),
    ],
)
def test_goes_to_zero_after_idle_and_delay(idle_seconds: int, delay: int, binds: str) -> None:
    spec = policy(min_replicas=0, idle_seconds=idle_seconds, scale_down_delay_seconds=delay)
    loop = Loop(spec, current=1)
    loop.run(30.0, constant(16))  # scales up to 2; the last request is answered at START + 29
    assert loop.current == 2
    last_up = loop.ups()[-1].at
    last_activity = START + 29
    loop.run(1500.0, idle)

    expected = last_activity + idle_seconds if binds == "idle" else last_up + delay
    assert loop.first_zero() == expected
    assert expected >= last_activity + idle_seconds
    assert expected >= last_up + delay
    assert loop.current == 0
    zero = next(c for c in loop.changes if c.new == 0)
    assert "idle for" in zero.decision.reason


@pytest.mark.parametrize("moves_at", [100.0, 250.0], ids=["early", "just-before-idle"])
def test_answered_requests_between_ticks_reset_the_idle_time(moves_at: float) -> None:
    spec = policy(min_replicas=0)  # idleSeconds 300
    loop = Loop(spec, current=1)
    while loop.now < START + 1000:
        # in flight is 0 at every tick; one request is answered between two ticks
        loop.tick(0, answered=1 if loop.now == START + moves_at else 0)
        loop.now += 1
    assert loop.first_zero() == START + moves_at + spec.idle_seconds


def test_steady_counter_goes_to_zero_after_idle_seconds() -> None:
    spec = policy(min_replicas=0)
    loop = Loop(spec, current=1)
    loop.answered = 57  # the router answered requests before the operator started
    loop.run(1000.0, idle)
    assert loop.first_zero() == START + spec.idle_seconds


@pytest.mark.parametrize(
    ("min_replicas", "router"),
    [
        pytest.param(0, False, id="no-router-view"),
        pytest.param(1, True, id="minReplicas-1"),
        pytest.param(1, False, id="minReplicas-1-no-router-view"),
    ],
)
def test_never_goes_to_zero(min_replicas: int, router: bool) -> None:
    spec = policy(min_replicas=min_replicas, idle_seconds=10, scale_down_delay_seconds=0)
    loop = Loop(spec, current=1)
    loop.run(3 * 3600.0, idle, router=router)
    assert len(loop.decisions) == 3 * 3600
    assert all(d.replicas == 1 for _, d in loop.decisions)
    assert loop.changes == []


# 5. At zero: the router wakes the model; without a router view the operator does.


@pytest.mark.parametrize("in_flight", [0, 1, 50], ids=["idle", "one-held", "many-held"])
def test_at_zero_with_the_router_leaves_waking_to_it(in_flight: int) -> None:
    """The router writes the wake-up within ms; the operator writes it only if requests are
    still held at zero WAKE_FALLBACK_SECONDS later (the router's write failed)."""
    loop = Loop(policy(min_replicas=0), current=0)
    loop.run(WAKE_FALLBACK_SECONDS - 1.0, constant(in_flight))
    assert loop.changes == []
    assert all(d.replicas == 0 and "router wakes it" in d.reason for _, d in loop.decisions)
    loop.run(120.0, constant(in_flight))
    if not in_flight:
        assert loop.changes == []
        return
    ((at, decision),) = [(at, d) for at, d in loop.decisions if d.replicas != 0][:1]
    assert at - START >= WAKE_FALLBACK_SECONDS and at - START < WAKE_FALLBACK_SECONDS + 1.5
    assert decision.replicas == 1 and decision.reason.startswith("requests held at zero")


@pytest.mark.parametrize(
    ("min_replicas", "running", "expected"),
    [
        pytest.param(0, 0, 1, id="minReplicas-0-idle"),
        pytest.param(0, 40, 1, id="minReplicas-0-busy"),
        pytest.param(3, 0, 3, id="minReplicas-3"),
    ],
)
def test_at_zero_without_router_view_goes_back_to_minimum(
    min_replicas: int, running: int, expected: int
) -> None:
    loop = Loop(policy(min_replicas=min_replicas), current=0)
    decision = loop.tick(None, router=False, running=running)
    assert decision.replicas == expected
    assert "without a router view" in decision.reason
    assert [(c.old, c.new) for c in loop.changes] == [(0, expected)]


def test_at_zero_below_min_replicas_with_router_goes_to_minimum() -> None:
    loop = Loop(policy(min_replicas=2), current=0)
    assert loop.tick(0).replicas == 2


def test_router_wake_counts_as_a_scale_up() -> None:
    spec = policy(min_replicas=0, idle_seconds=10)
    loop = Loop(spec, current=0)
    loop.run(30.0, idle)
    assert loop.current == 0
    woke = loop.now
    loop.set_replicas(1)  # the router's 0 -> 1 write for a held request
    loop.tick(1, answered=0)  # the held request, in flight while the pod starts
    loop.now += 1
    loop.run(600.0, idle)
    assert loop.first_zero() == woke + spec.scale_down_delay_seconds
    assert loop.ups() == []  # the wake was the router's, not ours


# 6. An operator restart: a fresh History never scales down before its own delay.


@pytest.mark.parametrize("replicas", [2, 4, 10])
@pytest.mark.parametrize("delay", [60, 120, 600])
def test_fresh_history_waits_a_full_delay(replicas: int, delay: int) -> None:
    loop = Loop(policy(scale_down_delay_seconds=delay), current=replicas)
    loop.run(delay + 10.0, idle)
    assert all(d.replicas == replicas for at, d in loop.decisions if at < START + delay)
    assert [(c.at, c.old, c.new) for c in loop.changes] == [(START + delay, replicas, 1)]


@pytest.mark.parametrize("router", [True, False], ids=["router-view", "engines-only"])
def test_restart_mid_scale_up_never_goes_back(router: bool) -> None:
    spec = policy()
    load = constant(48)  # six replicas' worth
    before = Loop(spec, current=1, ready_lag=30.0)
    before.run(60.0, idle, router=router)
    while not before.changes:  # the load comes in two steps: two replicas' worth first
        before.run(1.0, constant(16), router=router)
    at_restart = before.current
    assert 1 < at_restart < 6

    after = Loop(spec, current=at_restart, now=before.now, ready_lag=30.0, replica_log=before.replica_log)
    after.run(600.0, load, router=router)
    assert min(d.replicas for _, d in after.decisions) >= at_restart
    assert after.downs() == []
    assert after.current == 6


# 7. Clamping, and each target driving the count.


@pytest.mark.parametrize(
    ("overrides", "current", "signals", "expected", "signal"),
    [
        pytest.param({}, 1, {"in_flight": 1000}, 10, "in flight", id="clamped-to-max"),
        pytest.param({"max_replicas": 3}, 5, {"in_flight": 1000}, 3, "in flight", id="above-max-comes-down"),
        pytest.param({"min_replicas": 3}, 1, {"in_flight": 0}, 3, "in flight", id="below-min-goes-up"),
        pytest.param({"min_replicas": 3}, 3, {"in_flight": 0}, 3, "in flight", id="idle-holds-min"),
        pytest.param(
            {"target_waiting": 4}, 1, {"in_flight": 8, "waiting": 20}, 5, "waiting for 4", id="waiting-drives"
        ),
        pytest.param(
            {"target_kv_cache": 0.5},
            2,
            {"in_flight": 8, "kv_cache": 0.9, "ready": 2},
            4,
            "KV cache 1.80 replicas full",
            id="kv-cache-drives",
        ),
        pytest.param(
            {"target_waiting": 10, "target_kv_cache": 0.5},
            2,
            {"in_flight": 40, "waiting": 20, "kv_cache": 0.9, "ready": 2},
            5,
            "in flight",
            id="in-flight-largest",
        ),
        pytest.param(
            {"target_waiting": 2, "target_kv_cache": 0.5},
            2,
            {"in_flight": 8, "waiting": 20, "kv_cache": 0.9, "ready": 2},
            10,
            "waiting for 2",
            id="waiting-largest",
        ),
        pytest.param(
            {"target_waiting": 10, "target_kv_cache": 0.2},
            2,
            {"in_flight": 8, "waiting": 20, "kv_cache": 0.9, "ready": 2},
            9,
            "KV cache",
            id="kv-cache-largest",
        ),
        pytest.param(
            {"target_kv_cache": 0.1, "max_replicas": 6},
            2,
            {"in_flight": 8, "kv_cache": 0.9, "ready": 2},
            6,
            "KV cache",
            id="kv-cache-clamped-to-max",
        ),
    ],
)
def test_clamping_and_targets(
    overrides: dict[str, Any], current: int, signals: dict[str, Any], expected: int, signal: str
) -> None:
    spec = policy(**overrides)
    history = History(started=0.0)  # long ago: a scale-down need not wait
    observe(history, sig(START, **signals), spec)
    decision = decide(history, spec, current, START)
    assert decision.replicas == expected
    assert signal in decision.reason
    assert spec.min_replicas <= decision.replicas <= spec.max_replicas


def test_panic_takes_the_larger_of_burst_and_stable() -> None:
    spec = policy()
    history = History(started=0.0)
    for t in range(100, 160):  # 54 s at ten replicas' worth, then 6 s at two
        observe(history, sig(float(t), in_flight=80 if t < 154 else 16, ready=1), spec)
    stable, _ = need(list(history.samples), spec)
    assert stable == 10
    assert decide(history, spec, 1, 159.0).replicas == stable


def test_no_samples_holds() -> None:
    decision = decide(History(started=0.0), policy(), 3, START)
    assert decision == Decision(3, "no load observed yet")


# 8. need(): samples and targets to a replica count.

NEED_CASES = [
    pytest.param([], {}, 0, "0.0 in flight", id="no-samples"),
    pytest.param([sig(0)], {}, 0, "0.0 in flight for 8", id="idle"),
    pytest.param([sig(0, 1)], {}, 1, "1.0 in flight", id="one-request"),
    pytest.param([sig(0, 16)], {}, 2, "16.0 in flight", id="exact-multiple"),
    pytest.param([sig(0, 17)], {}, 3, "17.0 in flight", id="just-above"),
    pytest.param([sig(0, 0), sig(1, 16), sig(2, 32)], {}, 2, "16.0 in flight", id="mean-of-samples"),
    pytest.param([sig(0, 10)], {"target_in_flight": 2.5}, 4, "for 2.5 per", id="fractional-target"),
    pytest.param([sig(0, 3)], {"target_in_flight": 0.1}, 30, "3.0 in flight", id="float-rounding"),
    pytest.param([sig(0, None, None, running=10, waiting=7)], {}, 3, "17.0 in flight", id="no-router-view"),
    pytest.param(
        [sig(0, None, None, running=4), sig(1, 12, running=99)],
        {},
        1,
        "8.0 in flight",
        id="router-view-comes-and-goes",
    ),
    pytest.param([sig(0, 5, running=40, waiting=40)], {}, 1, "5.0 in flight", id="router-view-wins"),
    pytest.param([sig(0, 8, waiting=25)], {"target_waiting": 10}, 3, "25.0 waiting for 10", id="waiting"),
    pytest.param(
        [sig(0, 24, waiting=30)], {"target_waiting": 10}, 3, "24.0 in flight", id="tie-keeps-in-flight"
    ),
    pytest.param(
        [sig(0, 40, waiting=30)], {"target_waiting": 10}, 5, "in flight", id="in-flight-above-waiting"
    ),
    pytest.param(
        [sig(0, 0, kv_cache=0.5, ready=3)],
        {"target_kv_cache": 0.5},
        3,
        "KV cache 1.50 replicas",
        id="kv-cache",
    ),
    pytest.param(
        [sig(0, 0, kv_cache=0.5, ready=2), sig(1, 0, kv_cache=1.0, ready=4)],
        {"target_kv_cache": 0.8},
        4,
        "KV cache 2.50 replicas",
        id="kv-cache-mean-of-used",
    ),
    pytest.param(
        [sig(0, 8, kv_cache=0.9, ready=0)], {"target_kv_cache": 0.5}, 1, "in flight", id="kv-no-ready"
    ),
    pytest.param([sig(0, 0, waiting=40)], {}, 0, "0.0 in flight", id="waiting-not-a-target"),
]


@pytest.mark.parametrize(("samples", "overrides", "count", "why"), NEED_CASES)
def test_need(samples: list[Signals], overrides: dict[str, Any], count: int, why: str) -> None:
    got, reason = need(samples, policy(**overrides))
    assert got == count
    assert why in reason


# The operator loop's readers of the router's JSON and the last scrape (autoscaler.py).


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {"models": {"m": {"namespace": "ns", "resource": "r", "inFlight": 3, "requests": 10}}},
            {("ns", "r"): RouterDemand(3, 10)},
            id="one-model",
        ),
        pytest.param(None, {}, id="not-json-object"),
        pytest.param({"models": []}, {}, id="models-not-a-map"),
        pytest.param(
            {"models": {"m": {"namespace": "ns", "resource": "r", "inFlight": -1, "requests": 0}}},
            {},
            id="negative-in-flight-left-out",
        ),
        pytest.param(
            {"models": {"m": {"namespace": "ns", "resource": "r", "inFlight": "3", "requests": 0}}},
            {},
            id="string-count-left-out",
        ),
        pytest.param(
            {
                "models": {
                    "a": {"namespace": "ns", "resource": "a", "inFlight": 0, "requests": 0},
                    "b": "junk",
                }
            },
            {("ns", "a"): RouterDemand(0, 0)},
            id="bad-entry-skipped-good-kept",
        ),
    ],
)
def test_demand_of(raw: object, expected: dict[tuple[str, str], RouterDemand]) -> None:
    assert demand_of(raw) == expected


def test_engine_signals_count_only_healthy_pods() -> None:
    samples = {
        "a": PodSample("a", 0.0, ready=True, healthy=True, running=2, waiting=3, kv_cache_usage=0.5),
        "b": PodSample("b", 0.0, ready=True, healthy=True, running=1, waiting=0, kv_cache_usage=0.1),
        "c": PodSample("c", 0.0, ready=True, healthy=False, running=9, waiting=9, kv_cache_usage=0.9),
    }
    running, waiting, kv, ready = engine_signals(samples)
    assert (running, waiting, ready) == (3, 3, 2)
    assert kv == pytest.approx(0.3)
    assert engine_signals({}) == (0, 0, 0.0, 0)
