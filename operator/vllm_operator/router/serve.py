"""`vllm-operator router`: the routing table's source, the HTTP server, and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_operator.router import proxy, table

if TYPE_CHECKING:  # imported when used: static routes need no Kubernetes client
    from vllm_operator import k8s
    from vllm_operator.router.watch import Watcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    host: str = "0.0.0.0"
    port: int = 8000
    namespaces: Sequence[str | None] = (None,)
    """Namespaces whose VLLMModels are served; `(None,)` for all."""
    selector: str = ""
    upstreams: Sequence[tuple[str, str]] = ()
    """Static `NAME=URL` routes; when given, no Kubernetes is used."""
    strategy: str = "LeastLoad"
    """The routing strategy of the static routes."""
    max_body_bytes: int = 32 * 1024 * 1024
    grace_seconds: float = 30.0
    """On SIGTERM: readiness fails at once, then requests in flight get this long to finish."""
    token: str = ""
    """Bearer token of /router/park (the autoscaler's); empty: no model is ever parked."""


TOKEN_ENV = "VLLM_OPERATOR_ROUTER_TOKEN"
"""Where the router reads its token: the environment, never the command line (`ps` shows that)."""


async def _main(options: Options) -> None:
    loop = asyncio.get_running_loop()
    token = options.token or os.environ.get(TOKEN_ENV, "")
    watcher: Watcher | None = None
    cluster: k8s.KubeCluster | None = None
    if options.upstreams:
        router = proxy.Router(table.Table(), max_body=options.max_body_bytes, token=token)
        router.set_table(table.static(options.upstreams, options.strategy))
    else:
        from vllm_operator import k8s
        from vllm_operator.router.watch import Watcher

        cluster = k8s.KubeCluster(k8s.load_config())
        router = proxy.Router(
            table.Table(), max_body=options.max_body_bytes, scaler=cluster.scale, token=token
        )
        # The watches run on this loop: each new table goes straight to the router.
        watcher = Watcher(cluster, options.namespaces, options.selector, router.set_table)
        watcher.start()
    server = await proxy.serve(router, options.host, options.port)
    log.info("router listening on %s:%d", options.host, options.port)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    # Readiness fails first so that the Service stops sending; open requests may finish.
    router.draining = True
    server.close()
    deadline = time.monotonic() + options.grace_seconds
    while router.in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    log.info("router stopped with %d request(s) in flight", router.in_flight())
    router.pool.close()
    if watcher is not None:
        await watcher.stop()
    if cluster is not None:
        await cluster.close()


def run(options: Options) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; the stdlib loop also works
        asyncio.run(_main(options))
    else:
        uvloop.run(_main(options))
