"""Glue between kopf's events and `reconcile`: one lock per model, errors sorted into kinds."""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException

from vllm_operator import metrics, reconcile
from vllm_operator.api import SpecError
from vllm_operator.render import INSTANCE_LABEL
from vllm_operator.settings import OperatorSettings

log = logging.getLogger(__name__)
Obj = Mapping[str, Any]


class Controller:
    """Reconciles models on their own changes and on changes of the objects they own."""

    def __init__(self, cluster: reconcile.Cluster, settings: OperatorSettings) -> None:
        self.cluster = cluster
        self.settings = settings
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace, name)]

    def on_model(self, namespace: str, name: str) -> reconcile.Plan | None:
        """Reconcile from a fresh read, so that concurrent triggers never act on stale objects."""
        with metrics.RECONCILE_SECONDS.time():
            try:
                plan = self._reconcile(namespace, name)
            except Exception:
                metrics.RECONCILES.labels("error").inc()
                raise
        metrics.RECONCILES.labels("ok" if plan is not None else "gone").inc()
        if plan is not None:
            for manifest in plan.apply:
                metrics.APPLIES.labels(manifest["kind"]).inc()
            metrics.STATUS_WRITES.inc(plan.status is not None)
            for kind, _, _ in plan.events:
                metrics.EVENTS.labels(kind).inc()
        return plan

    def _reconcile(self, namespace: str, name: str) -> reconcile.Plan | None:
        with self._lock(namespace, name):
            obj = self.cluster.get("VLLMModel", namespace, name)
            if obj is None:
                return None
            try:
                return reconcile.reconcile(self.cluster, obj, self.settings)
            except ApiException as exc:
                if exc.status not in (400, 422):
                    raise
                # The API server refused a child built from free-form fields (env, resources,
                # affinity ...): that is the user's spec, recorded like any invalid spec.
                error = SpecError([f"the API server refused a child: {api_message(exc)}"])
                plan = reconcile.plan_invalid(obj, error, reconcile.utcnow())
                reconcile.execute(self.cluster, obj, plan)
                return plan

    def on_child(self, child: Obj) -> reconcile.Plan | None:
        """A Deployment, Service or Pod of ours changed: its model decides what to do."""
        meta = child.get("metadata") or {}
        name = (meta.get("labels") or {}).get(INSTANCE_LABEL)
        if not name or not meta.get("namespace"):
            return None
        return self.on_model(meta["namespace"], name)


def api_message(exc: ApiException) -> str:
    """The human part of an API server error body."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
