"""What the operator keeps about each model between events: one state object per model, one
store that owns them, and one lock per model for the work that must not overlap (a reconcile
and a status write). Watch handlers, the scrape loop and the autoscaler all read and write
through it, as coroutines on the operator's one event loop (no threads): only an `await`
switches between them, and the per-model lock is an asyncio.Lock held across the awaits of
one reconcile. `forget` drops everything of a model at once."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from vllm_operator import reconcile, throughput
from vllm_operator.api import RoutingStatus

Key = tuple[str, str]
"""(namespace, name) of a VLLMModel."""


def not_older(current: Mapping[str, Any] | None, candidate: Mapping[str, Any]) -> bool:
    """Whether `candidate` is the same version of an object as `current` or a later one.

    A watch event can arrive after the answer to the operator's own write of a later version;
    it must not take the store back. resourceVersions are etcd revisions, which only grow;
    one that is not a number is taken as newer.
    """
    if current is None:
        return True
    mine = str((current.get("metadata") or {}).get("resourceVersion", ""))
    theirs = str((candidate.get("metadata") or {}).get("resourceVersion", ""))
    if not (mine.isdigit() and theirs.isdigit()):
        return True
    return int(theirs) >= int(mine)


@dataclass
class ModelState:
    body: Mapping[str, Any] | None = None
    """The model as the watch or the operator's last status write showed it: reconciles and
    scrape rounds read it here, not from the API server."""
    spec_generation: int | None = None
    """The generation of the model's spec that this process last reconciled for."""
    children: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    """The model's Service and Deployment by kind, as their watches or the operator's own
    applies last showed them. Only labelled children come through the watches: an object of
    somebody else's with the name is read from the API server each time."""
    observed: reconcile.Observed | None = None
    """The children the last reconcile saw."""
    health: throughput.Aggregate | None = None
    """The last scrape round's aggregate."""
    samples: dict[str, throughput.PodSample] = field(default_factory=dict)
    """The last scrape of each pod, by pod name (rates need the previous one)."""
    adapter_waits: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)
    """Adapter calls that failed: (pod, adapter) -> (retry not before, failures in a row)."""
    adapter_errors: dict[str, str] = field(default_factory=dict)
    """The last error of each adapter, so that an Event is posted once per new error."""
    routing: RoutingStatus | None = None
    """The router's view of the model, from its last /router/demand."""

    def see(self, body: Mapping[str, Any]) -> None:
        """Keep a newer body of the model."""
        if not_older(self.body, body):
            self.body = body

    def see_child(self, child: Mapping[str, Any], gone: bool = False) -> None:
        """Keep a newer version of a cached child, or drop it when it is `gone` (deleted)."""
        kind = child.get("kind", "")
        if kind not in reconcile.CHILD_KINDS or not not_older(self.children.get(kind), child):
            return
        if gone:
            self.children.pop(kind, None)
        else:
            self.children[kind] = child


class Store:
    """Touched only from the event loop: its bookkeeping needs no lock of its own, since nothing
    here awaits between reading and writing it."""

    def __init__(self) -> None:
        self._states: dict[Key, ModelState] = {}
        # Locks outlive a forget: a reconcile still running for a deleted model holds its own.
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._waiting: Counter[Key] = Counter()

    def state(self, key: Key) -> ModelState:
        """The model's state, made empty if the store has none."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = ModelState()
        return state

    def get(self, key: Key) -> ModelState | None:
        """The model's state, or None for a model the store does not know (e.g. deleted)."""
        return self._states.get(key)

    def lock(self, key: Key) -> asyncio.Lock:
        return self._locks[key]

    @asynccontextmanager
    async def turn(self, key: Key, coalesce: bool = False) -> AsyncIterator[bool]:
        """Hold the model's lock for a reconcile (True), or, with `coalesce`, skip it (False,
        no lock) when another reconcile of the model is already waiting for the lock.

        That one has not read anything yet and reads after this trigger's change (a watch
        event comes after the change is stored), so a burst of child events (a Deployment's
        status, each pod's) costs one reconcile while one runs and one waits, not one each.
        """
        if coalesce and self._waiting[key]:
            yield False
            return
        lock = self._locks[key]
        self._waiting[key] += 1
        try:
            await lock.acquire()
        finally:  # acquired, or cancelled while waiting: either way no longer waiting
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
        try:
            yield True
        finally:
            lock.release()

    def forget(self, key: Key) -> None:
        self._states.pop(key, None)

    def items(self) -> Iterator[tuple[Key, ModelState]]:
        """A snapshot of (key, state) pairs, safe while models are added or forgotten during
        the caller's awaits."""
        return iter(list(self._states.items()))

    def bodies(self) -> dict[Key, Mapping[str, Any]]:
        """Every model the watch has shown and not deleted, by key."""
        return {key: state.body for key, state in self.items() if state.body is not None}

    def __contains__(self, key: object) -> bool:
        return key in self._states
