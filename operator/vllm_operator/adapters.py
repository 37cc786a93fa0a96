"""The operator's LoRA adapter calls: after each scrape round, load and unload adapters so every
healthy pod serves the spec's (planned by the pure `lora`), with a backoff per pod and adapter,
and one Event per new error."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable

from vllm_operator import lora, throughput
from vllm_operator.api import ConditionStatus, VLLMModelSpec
from vllm_operator.scrape import Scraper, Target
from vllm_operator.store import ModelState

Verdict = tuple[ConditionStatus, str, str]
"""(status, reason, message) of the AdaptersReady condition."""
Withdraw = Callable[[list[throughput.PodSample], Verdict], Awaitable[None]]
"""Writes a status in which the given samples are the pods' truth (see `manage_adapters`)."""


async def manage_adapters(
    state: ModelState,
    current: list[throughput.PodSample],
    spec: VLLMModelSpec,
    targets: list[Target],
    token: str,
    scraper: Scraper,
    withdraw: Withdraw | None = None,
) -> tuple[list[throughput.PodSample], Verdict | None, list[tuple[str, str, str]]]:
    """Load and unload adapters so every healthy pod of a model serves the spec's, calling the
    pods with the model's admin `token`; returns the pods' samples read again after any call
    (the status comes from what the pods say, not from our calls), the AdaptersReady verdict
    (None without LoRA) and the Events to post.

    Before any unload, `withdraw` gets the samples without the adapters about to go, so that the
    status (the router's view) stops listing them first. Otherwise a spec that wants an adapter
    again while the round that read the old spec unloads it has the router send its requests to
    pods that no longer serve it, until the round's status write."""
    if spec.lora is None:
        return current, None, []
    wanted = lora.desired(spec)
    waits, errors = state.adapter_waits, state.adapter_errors
    now = time.monotonic()
    fetched = {t.name: t.fetched for t in targets}
    waiting = {k: v[0] for k, v in waits.items()}
    calls = lora.plan_calls(wanted, current, waiting, now, lora.downloaded(spec), fetched)
    events: list[tuple[str, str, str]] = []
    going = {(c.pod, c.name) for c in calls if c.action == "unload"}
    if going and withdraw is not None:
        kept = [
            dataclasses.replace(s, adapters=tuple(a for a in s.adapters if (s.name, a) not in going))
            for s in current
        ]
        await withdraw(kept, lora.condition(wanted, kept, errors))
    if calls:
        by_name = {t.name: t for t in targets}
        results = await scraper.call_adapters(calls, {t.name: t.ip for t in targets}, token)
        for call, error in zip(calls, results, strict=True):
            pair = (call.pod, call.name)
            if not error:
                waits.pop(pair, None)
                errors.pop(call.name, None)
                continue
            failures = waits.get(pair, (0.0, 0))[1] + 1
            waits[pair] = (now + lora.backoff(failures), failures)
            if errors.get(call.name) != error:
                events.append(("Warning", "AdapterFailed", f"adapter {call.name} on pod {call.pod}: {error}"))
            errors[call.name] = error
        # Status must come from what the pods say, not from our calls: ask them again.
        touched = {c.pod for c in calls}
        again = await scraper.scrape_all({0: [by_name[p] for p in sorted(touched) if p in by_name]})
        fresh = {s.name: s for s in again.get(0, [])}
        current = [fresh.get(s.name, s) for s in current]
    for name in list(errors):
        if name not in wanted:
            del errors[name]
    return current, lora.condition(wanted, current, errors), events
