"""What the operator keeps about each model between events: one state object per model, one
store that owns them, and one lock per model for the work that must not overlap (a reconcile
and a status write). Watch handlers (kopf's worker threads), the scrape loop and the
autoscaler all read and write through it; `forget` drops everything of a model at once."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vllm_operator import reconcile, throughput
from vllm_operator.api import RoutingStatus

Key = tuple[str, str]
"""(namespace, name) of a VLLMModel."""


@dataclass
class ModelState:
    body: Mapping[str, Any] | None = None
    """The latest body from the watch, so that scrape rounds need no reads."""
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


class Store:
    def __init__(self) -> None:
        self._states: dict[Key, ModelState] = {}
        # Locks outlive a forget: a reconcile still running for a deleted model holds its own.
        self._locks: defaultdict[Key, threading.Lock] = defaultdict(threading.Lock)
        self._waiting: Counter[Key] = Counter()
        self._guard = threading.Lock()

    def state(self, key: Key) -> ModelState:
        """The model's state, made empty if the store has none."""
        with self._guard:
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = ModelState()
            return state

    def get(self, key: Key) -> ModelState | None:
        """The model's state, or None for a model the store does not know (e.g. deleted)."""
        return self._states.get(key)

    def lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks[key]

    @contextmanager
    def turn(self, key: Key, coalesce: bool = False) -> Iterator[bool]:
        """Hold the model's lock for a reconcile (True), or, with `coalesce`, skip it (False,
        no lock) when another reconcile of the model is already waiting for the lock.

        That one has not read anything yet and reads after this trigger's change (a watch
        event comes after the change is stored), so a burst of child events (a Deployment's
        status, each pod's) costs one reconcile while one runs and one waits, not one each.
        """
        with self._guard:
            if coalesce and self._waiting[key]:
                skip = True
            else:
                skip = False
                self._waiting[key] += 1
                lock = self._locks[key]
        if skip:
            yield False
            return
        with lock:
            with self._guard:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]
            yield True

    def forget(self, key: Key) -> None:
        with self._guard:
            self._states.pop(key, None)

    def items(self) -> Iterator[tuple[Key, ModelState]]:
        """A snapshot of (key, state) pairs, safe while other threads add or forget models."""
        with self._guard:
            return iter(list(self._states.items()))

    def bodies(self) -> dict[Key, Mapping[str, Any]]:
        """Every model the watch has shown and not deleted, by key."""
        return {key: state.body for key, state in self.items() if state.body is not None}

    def __contains__(self, key: object) -> bool:
        return key in self._states
