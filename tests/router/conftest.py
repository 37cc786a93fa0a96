"""The router in-process on its own event loop, in front of fake pods on another."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest

from devtools.fakepod import FakePod, FakePods
from vllm_operator import api
from vllm_operator.router import proxy, table


@dataclass
class RunningRouter:
    router: proxy.Router
    url: str
    loop: asyncio.AbstractEventLoop

    def use(self, *routes: table.Route) -> None:
        """Serve these routes from now on (the swap happens on the router's loop, as the watch's does)."""
        done = threading.Event()

        def swap() -> None:
            self.router.set_table(table.index(routes))
            done.set()

        self.loop.call_soon_threadsafe(swap)
        assert done.wait(5)


def route(
    name: str,
    endpoints: Sequence[tuple[str, FakePod]],
    *,
    adapters: Sequence[str] = (),
    routing: api.Routing | None = None,
    pods: int | None = None,
) -> table.Route:
    """A route over fake pods; each pod's verified adapters are its `adapters` at this moment."""
    return table.Route(
        namespace="ns",
        resource=name,
        served_name=name,
        endpoints=tuple(
            table.Endpoint(pod=pod.name, address=address, adapters=frozenset(pod.adapters))
            for address, pod in endpoints
        ),
        pods=len(endpoints) if pods is None else pods,
        adapters=frozenset(adapters),
        routing=routing or api.Routing(),
    )


@pytest.fixture
def fake_pods() -> Iterator[FakePods]:
    with FakePods() as pods:
        yield pods


@pytest.fixture
def running_router() -> Iterator[RunningRouter]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="router", daemon=True)
    thread.start()
    router = proxy.Router(table.Table(), max_body=64 * 1024)
    server = asyncio.run_coroutine_threadsafe(proxy.serve(router, "127.0.0.1", 0), loop).result(10)
    port = server.sockets[0].getsockname()[1]
    try:
        yield RunningRouter(router, f"http://127.0.0.1:{port}", loop)
    finally:

        async def stop() -> None:
            server.close()
            router.pool.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
