"""Which eligible pod takes a request: least load, or affinity by prefix or session with a load bound.

Load is the number of requests this router has in flight to a pod. Affinity uses consistent
hashing with bounded loads: a key (a conversation's leading text, or a session header) hashes to
a point on a ring of pod replicas; the first pod clockwise whose load stays within
`loadFactor x mean` takes it. A shared system prompt therefore cannot pile onto one pod, and a
pod joining or leaving moves only the keys next to it. A key's last pod is remembered and tried
first: once the bound has moved a conversation, its prefix is cached where it went, and going
back to the ring's first choice would cost a prefill there.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from vllm_operator.router.table import Endpoint

RING_REPLICAS = 100
"""Points per pod on the ring: with 100, 4 pods' shares of the keys differ by a few percent."""
DOWN_SECONDS = 1.0
"""How long a pod that refused a connection is skipped. Short, so that a restarted pod is back at
once; the pod watch removes a pod that stays down."""
HOMES = 65_536
"""Keys whose last pod is remembered (least recently used forgotten first): about 6 MB at most."""


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(errors="replace"), digest_size=8).digest(), "big")


def _text(content: Any) -> str:
    """Text of a chat message's `content`: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prefix_key(body: Mapping[str, Any], length: int) -> str | None:
    """What identifies a conversation: the start of its system prompt and of its first user message
    (a chat), or of its prompt (a completion). Later turns repeat both, so they hash alike."""
    messages = body.get("messages")
    if isinstance(messages, list):
        system = user = ""
        for message in messages:
            if not isinstance(message, dict):
                continue
            role = message.get("role")
            if role in ("system", "developer") and not system:
                system = _text(message.get("content"))[:length]
            elif role == "user":
                user = _text(message.get("content"))[:length]
                break
        return f"{system}\x00{user}" if system or user else None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt[:length]
    return None


class Ring:
    """The hash ring of one set of endpoints."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        points = sorted(
            (_hash(f"{e.address}#{i}"), e.address) for e in endpoints for i in range(RING_REPLICAS)
        )
        self.hashes = [h for h, _ in points]
        self.addresses = [a for _, a in points]

    def walk(self, point: int) -> Iterator[str]:
        """Distinct addresses clockwise from a key's point (its hash)."""
        start = bisect.bisect(self.hashes, point)
        seen: set[str] = set()
        n = len(self.addresses)
        for i in range(n):
            addr = self.addresses[(start + i) % n]
            if addr not in seen:
                seen.add(addr)
                yield addr


class Balancer:
    """In-flight counts per pod address and the choice among eligible pods."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self._down_until: dict[str, float] = {}
        self._rings: dict[tuple[str, ...], Ring] = {}
        self._homes: OrderedDict[int, str] = OrderedDict()
        """Key hash -> the pod its last request went to."""
        self._turn = 0

    def acquire(self, address: str) -> None:
        self.in_flight[address] = self.in_flight.get(address, 0) + 1

    def release(self, address: str) -> None:
        left = self.in_flight.get(address, 0) - 1
        if left > 0:
            self.in_flight[address] = left
        else:
            self.in_flight.pop(address, None)

    def mark_down(self, address: str, now: float | None = None) -> None:
        self._down_until[address] = (time.monotonic() if now is None else now) + DOWN_SECONDS

    def _usable(self, eligible: Sequence[Endpoint], exclude: set[str], now: float) -> list[Endpoint]:
        fresh = [e for e in eligible if e.address not in exclude]
        up = [e for e in fresh if self._down_until.get(e.address, 0.0) <= now]
        # Pods that refused a moment ago are still better than none: the watch is the authority.
        return up or fresh

    def _ring(self, endpoints: Sequence[Endpoint]) -> Ring:
        key = tuple(sorted(e.address for e in endpoints))
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) > 256:  # pod sets churn with rollouts; old rings are dead weight
                self._rings.clear()
            ring = self._rings[key] = Ring(endpoints)
        return ring

    def pick(
        self,
        eligible: Sequence[Endpoint],
        *,
        key: str | None = None,
        load_factor: float = 1.25,
        exclude: set[str] | None = None,
        now: float | None = None,
        rotate: bool = False,
    ) -> Endpoint | None:
        """The pod for one request: by `key` with a load bound when given, in turn when `rotate`
        (RoundRobin), else the least loaded."""
        usable = self._usable(eligible, exclude or set(), time.monotonic() if now is None else now)
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0]
        if key is not None:
            return self._by_key(eligible, usable, key, load_factor)
        return self._in_turn(usable, rotate)

    def _in_turn(self, usable: Sequence[Endpoint], rotate: bool = False) -> Endpoint:
        """The next pod in turn (`rotate`), or the least loaded with ties going round, so that an
        idle pool still spreads its requests."""
        self._turn += 1
        n = len(usable)
        best = usable[self._turn % n]
        if rotate:
            return best
        best_load = self.in_flight.get(best.address, 0)
        for i in range(1, n):
            candidate = usable[(self._turn + i) % n]
            load = self.in_flight.get(candidate.address, 0)
            if load < best_load:
                best, best_load = candidate, load
        return best

    def _by_key(
        self, eligible: Sequence[Endpoint], usable: Sequence[Endpoint], key: str, load_factor: float
    ) -> Endpoint:
        """The key's last pod, else the first on its ring, within the bound; else the least loaded."""
        by_address = {e.address: e for e in usable}
        total = sum(self.in_flight.get(a, 0) for a in by_address)
        # A pod may hold loadFactor x the mean with this request counted, rounded down (rounding
        # up let 4 pods at 32 in flight reach 11, 1.375x the mean), but always one request: an
        # idle pool still places a key on its own pod.
        bound = max(1, math.floor(load_factor * (total + 1) / len(usable) + 1e-9))
        point = _hash(key)
        home = self._homes.get(point)
        # The candidate set is fixed (eligible pods), so the ring is too; excluded or down pods
        # are skipped while walking it.
        walk = self._ring(eligible).walk(point)
        chosen: Endpoint | None = None
        for addr in walk if home is None else itertools.chain((home,), walk):
            if addr in by_address and self.in_flight.get(addr, 0) + 1 <= bound:
                chosen = by_address[addr]
                break
        if chosen is None:
            chosen = self._in_turn(usable)
        self._homes[point] = chosen.address
        self._homes.move_to_end(point)
        if len(self._homes) > HOMES:
            self._homes.popitem(last=False)
        return chosen
