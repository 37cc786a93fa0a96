"""Store.turn: one reconcile of a model at a time, and a burst of child events costs one
reconcile while one runs and one waits. The turns are tasks on one event loop, as in the
operator."""

from __future__ import annotations

import asyncio

from vllm_operator.store import Store

KEY = ("ns", "m")


async def take_turn(store: Store, coalesce: bool, order: list[str], name: str, hold: asyncio.Event) -> None:
    async with store.turn(KEY, coalesce) as turn:
        order.append(f"{name}:{'ran' if turn else 'skipped'}")
        if turn:
            await asyncio.wait_for(hold.wait(), 5)


def start(
    store: Store, coalesce: bool, order: list[str], name: str, hold: asyncio.Event
) -> asyncio.Task[None]:
    return asyncio.create_task(take_turn(store, coalesce, order, name, hold))


async def settle() -> None:
    await asyncio.sleep(0.05)  # let a started task reach the lock


async def test_a_burst_while_one_runs_and_one_waits_is_skipped() -> None:
    store, order, hold = Store(), [], asyncio.Event()
    running = start(store, False, order, "running", hold)
    await settle()
    waiting = start(store, True, order, "waiting", hold)
    await settle()
    burst = [start(store, True, order, f"burst{i}", hold) for i in range(5)]
    await asyncio.wait_for(asyncio.gather(*burst), 2)
    assert order == ["running:ran"] + [f"burst{i}:skipped" for i in range(5)]
    hold.set()
    await asyncio.wait_for(asyncio.gather(running, waiting), 2)
    assert order[-1] == "waiting:ran"


async def test_an_event_while_one_only_runs_waits_for_it() -> None:
    """The running reconcile may have read before the change: the event's reconcile must follow."""
    store, order, hold = Store(), [], asyncio.Event()
    running = start(store, False, order, "running", hold)
    await settle()
    event = start(store, True, order, "event", hold)
    await settle()
    assert order == ["running:ran"]
    hold.set()
    await asyncio.wait_for(asyncio.gather(running, event), 2)
    assert order == ["running:ran", "event:ran"]


async def test_model_triggers_never_coalesce() -> None:
    """kopf's create and update handlers count on their reconcile (its retry and its outcome)."""
    store, order, hold = Store(), [], asyncio.Event()
    tasks = [start(store, False, order, f"update{i}", hold) for i in range(3)]
    await settle()
    hold.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert sorted(order) == ["update0:ran", "update1:ran", "update2:ran"]


async def test_after_a_burst_the_next_event_reconciles_again() -> None:
    store, order, hold = Store(), [], asyncio.Event()
    hold.set()
    for name in ("a", "b"):
        await take_turn(store, True, order, name, hold)
    assert order == ["a:ran", "b:ran"]


async def test_a_waiter_cancelled_in_the_queue_does_not_block_later_triggers() -> None:
    """A cancelled wait (kopf cancels a handler on shutdown or timeout) must not leave the model
    counted as waiting: every later child event would then be skipped, and none reconciled."""
    store, order, hold = Store(), [], asyncio.Event()
    running = start(store, False, order, "running", hold)
    await settle()
    waiting = start(store, True, order, "waiting", hold)
    await settle()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    event = start(store, True, order, "event", hold)
    await settle()
    hold.set()
    await asyncio.wait_for(asyncio.gather(running, event), 2)
    assert order == ["running:ran", "event:ran"]


async def test_other_models_turns_do_not_wait_for_a_held_one() -> None:
    store, hold = Store(), asyncio.Event()
    async with store.turn(("ns", "a")):
        async with asyncio.timeout(1):
            async with store.turn(("ns", "b")) as turn:
                assert turn
    hold.set()
