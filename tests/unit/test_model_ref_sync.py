"""`--model-ref` is resolved synchronously, also from inside `bench load`'s running loop."""

from __future__ import annotations

import asyncio

from vllm_operator.model_ref import run_sync


async def answer() -> int:
    await asyncio.sleep(0)
    return 42


def test_without_a_running_loop() -> None:
    assert run_sync(answer) == 42


async def test_inside_a_running_loop_where_asyncio_run_is_refused() -> None:
    assert run_sync(answer) == 42
