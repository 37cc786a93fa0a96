"""kopf registration only: every handler delegates to the Controller.

Every handler is a coroutine: kopf runs them on its event loop, with the scrape and autoscaling
loops, and all of them call the API server through one async `k8s.KubeCluster`. No handler
runs on a thread, so nothing of the operator's own needs a thread lock.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import kopf

from vllm_operator import k8s
from vllm_operator.api import GROUP, PLURAL, VERSION
from vllm_operator.autoscaler import Autoscaler
from vllm_operator.controller import Controller
from vllm_operator.monitor import Monitor
from vllm_operator.render import MANAGED_BY_LABEL
from vllm_operator.scrape import Scraper
from vllm_operator.settings import OperatorSettings

OURS = {MANAGED_BY_LABEL: "vllm-operator"}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Only event handlers: kopf keeps no progress or diff-base annotations on our objects and
    # adds no finalizer (Controller.seen decides what a model's event means).
    # Our own Events say what happened; kopf's per-handler chatter would only add API writes.
    settings.posting.level = logging.WARNING
    # kopf's own calls (patches, events) get the same bound as ours (k8s.API_TIMEOUT).
    settings.networking.connect_timeout, settings.networking.request_timeout = k8s.API_TIMEOUT
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Our resources are known and the CRD comes first (chart, README): no cluster-wide scans,
    # so a namespaced operator needs no cluster-scoped read rights and starts at once.
    settings.scanning.disabled = True
    operator_settings = OperatorSettings.from_env()
    if not operator_settings.admin_key:
        logging.getLogger(__name__).warning(
            "VLLM_OPERATOR_ADMIN_KEY is not set: LoRA adapter tokens are random for this run, so "
            "LoRA models' pods roll when the operator restarts (the Helm chart sets one)"
        )
        operator_settings = operator_settings.model_copy(update={"admin_key": secrets.token_hex(32)})
    # Its HTTP sessions open on first use, on kopf's loop; `disconnect` closes them.
    memo.kube = k8s.KubeCluster(k8s.load_config())
    memo.controller = Controller(memo.kube, operator_settings)


@kopf.on.startup()
async def start_scraping(memo: kopf.Memo, **_: Any) -> None:
    settings: OperatorSettings = memo.controller.settings
    scraper = Scraper(timeout=settings.scrape_timeout_seconds, concurrency=settings.scrape_concurrency)
    if settings.scrape_interval_seconds:
        memo.scrape_task = asyncio.create_task(
            Monitor(memo.controller).scrape_forever(settings.scrape_interval_seconds, scraper)
        )
    if settings.autoscale_interval_seconds:
        autoscaler = Autoscaler(memo.controller, scraper)
        memo.autoscale_task = asyncio.create_task(autoscaler.run_forever(settings.autoscale_interval_seconds))


@kopf.on.cleanup()
async def stop_scraping(memo: kopf.Memo, **_: Any) -> None:
    for name in ("scrape_task", "autoscale_task"):
        task = memo.get(name)
        if task is not None:
            task.cancel()


@kopf.on.cleanup()
async def disconnect(memo: kopf.Memo, **_: Any) -> None:
    controller: Controller | None = memo.get("controller")
    if controller is not None:
        controller.close()
    kube: k8s.KubeCluster | None = memo.get("kube")
    if kube is not None:
        await kube.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def model_seen(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Every event of a model, including those kopf lists at start: a new spec is reconciled
    (Controller.seen; no kopf change handler, so no diff-base annotation to patch)."""
    meta = body["metadata"]
    if type == "DELETED":
        memo.controller.forget((meta["namespace"], meta["name"]))
    elif memo.controller.seen(dict(body)):  # kopf's view of the event's object, as a dict
        await memo.controller.on_spec(meta["namespace"], meta["name"])


@kopf.on.event("apps", "v1", "deployments", labels=OURS)
@kopf.on.event("v1", "services", labels=OURS)
@kopf.on.event("v1", "pods", labels=OURS)
async def child_changed(
    body: kopf.Body, type: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    try:
        await memo.controller.on_child(dict(body), gone=type == "DELETED")
    except Exception as exc:
        logger.warning("reconcile after a change of %s failed: %s", body.get("kind"), exc)
