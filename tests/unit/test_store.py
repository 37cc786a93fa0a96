"""Store.turn: one reconcile of a model at a time, and a burst of child events costs one
reconcile while one runs and one waits."""

from __future__ import annotations

import threading
import time

from vllm_operator.store import Store

KEY = ("ns", "m")


def take_turn(store: Store, coalesce: bool, order: list[str], name: str, hold: threading.Event) -> None:
    with store.turn(KEY, coalesce) as turn:
        order.append(f"{name}:{'ran' if turn else 'skipped'}")
        if turn:
            hold.wait(5)


def start(
    store: Store, coalesce: bool, order: list[str], name: str, hold: threading.Event
) -> threading.Thread:
    thread = threading.Thread(target=take_turn, args=(store, coalesce, order, name, hold))
    thread.start()
    return thread


def settle() -> None:
    time.sleep(0.1)  # let a started thread reach the lock


def test_a_burst_while_one_runs_and_one_waits_is_skipped() -> None:
    store, order, hold = Store(), [], threading.Event()
    running = start(store, False, order, "running", hold)
    settle()
    waiting = start(store, True, order, "waiting", hold)
    settle()
    burst = [start(store, True, order, f"burst{i}", hold) for i in range(5)]
    for thread in burst:
        thread.join(2)
    assert order == ["running:ran"] + [f"burst{i}:skipped" for i in range(5)]
    hold.set()
    running.join(2)
    waiting.join(2)
    assert order[-1] == "waiting:ran"


def test_an_event_while_one_only_runs_waits_for_it() -> None:
    """The running reconcile may have read before the change: the event's reconcile must follow."""
    store, order, hold = Store(), [], threading.Event()
    running = start(store, False, order, "running", hold)
    settle()
    event = start(store, True, order, "event", hold)
    settle()
    assert order == ["running:ran"]
    hold.set()
    running.join(2)
    event.join(2)
    assert order == ["running:ran", "event:ran"]


def test_model_triggers_never_coalesce() -> None:
    """kopf's create and update handlers count on their reconcile (its retry and its outcome)."""
    store, order, hold = Store(), [], threading.Event()
    threads = [start(store, False, order, f"update{i}", hold) for i in range(3)]
    settle()
    hold.set()
    for thread in threads:
        thread.join(2)
    assert sorted(order) == ["update0:ran", "update1:ran", "update2:ran"]


def test_after_a_burst_the_next_event_reconciles_again() -> None:
    store, order, hold = Store(), [], threading.Event()
    hold.set()
    for name in ("a", "b"):
        take_turn(store, True, order, name, hold)
    assert order == ["a:ran", "b:ran"]
