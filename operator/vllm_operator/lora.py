"""Pure planning of LoRA adapters on running pods, and the AdaptersReady condition."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from vllm_operator.api import ConditionStatus, VLLMModelSpec
from vllm_operator.render import adapter_source
from vllm_operator.throughput import PodSample

Verdict = tuple[ConditionStatus, str, str]


@dataclass(frozen=True)
class AdapterCall:
    """One load or unload the operator asks of one pod."""

    pod: str
    action: Literal["load", "unload"]
    name: str
    path: str = ""


def desired(spec: VLLMModelSpec) -> dict[str, str]:
    """Adapter name -> the path the server loads it from."""
    if spec.lora is None:
        return {}
    return {a.name: adapter_source(a).path for a in spec.lora.adapters}


def downloaded(spec: VLLMModelSpec) -> frozenset[str]:
    """Paths of adapters that exist on a pod only if its init step downloaded them."""
    if spec.lora is None:
        return frozenset()
    resolved = [adapter_source(a) for a in spec.lora.adapters]
    return frozenset(r.path for r in resolved if r.download_uri)


def replaced(wanted: Mapping[str, str], sample: PodSample) -> dict[str, str]:
    """Wanted adapters a pod serves from another path than ours: name -> the path it serves.

    Only the operator holds the token that changes adapters, so this means someone with it (or
    with the model's API key) swapped an adapter under our name; the status must not call it served.
    """
    return {
        name: root
        for name, root in sample.adapter_roots.items()
        if name in wanted and name in sample.adapters and root != wanted[name]
    }


def plan_calls(
    wanted: Mapping[str, str],
    samples: Sequence[PodSample],
    waiting: Mapping[tuple[str, str], float],
    now: float,
    needs_fetch: frozenset[str] = frozenset(),
    fetched: Mapping[str, frozenset[str]] | None = None,
) -> list[AdapterCall]:
    """Loads of missing and unloads of unwanted adapters on every healthy pod.

    `waiting` holds (pod, adapter) pairs whose last call failed, with the time before which
    they are not retried (backoff). A path in `needs_fetch` is loaded only on pods whose init
    step downloaded it (`fetched`, pod -> paths); the others are being replaced by a rollout.
    Pods whose /v1/models could not be read are left alone: what they serve is unknown.
    """
    calls = []
    for sample in sorted(samples, key=lambda s: s.name):
        if not (sample.ready and sample.healthy) or sample.models_error:
            continue
        swapped = replaced(wanted, sample)
        served = set(sample.adapters)
        on_disk = (fetched or {}).get(sample.name, frozenset())
        for name in sorted(set(wanted) - served):
            if wanted[name] in needs_fetch and wanted[name] not in on_disk:
                continue
            if waiting.get((sample.name, name), 0.0) <= now:
                calls.append(AdapterCall(sample.name, "load", name, wanted[name]))
        for name in sorted(served - set(wanted)):
            if waiting.get((sample.name, name), 0.0) <= now:
                calls.append(AdapterCall(sample.name, "unload", name))
        # A swapped adapter is unloaded now and loaded from our path by the next round (one call
        # per pod and name in a round: the calls of a round run concurrently).
        calls += [AdapterCall(sample.name, "unload", name) for name in sorted(swapped)]
    return calls


def backoff(failures: int, base: float = 2.0, cap: float = 120.0) -> float:
    """Seconds before the next try after `failures` failed calls in a row."""
    return float(min(cap, base * 2 ** max(0, failures - 1)))


def condition(wanted: Mapping[str, str], samples: Sequence[PodSample], errors: Mapping[str, str]) -> Verdict:
    """AdaptersReady, as the pods' own /v1/models show it; `errors` are the servers' last refusals."""
    pods = [s for s in samples if s.ready and s.healthy]
    if not pods:
        return ("Unknown", "NoHealthyPods", "no ready and healthy pod to ask")
    unread = [f"pod {s.name}: {s.models_error}" for s in pods if s.models_error]
    pods = [s for s in pods if not s.models_error]
    missing = {name: sorted(s.name for s in pods if name not in s.adapters) for name in sorted(wanted)}
    missing = {name: lacking for name, lacking in missing.items() if lacking}
    swapped = [
        f"adapter {name} on pod {s.name} is served from {root}, not {wanted[name]} "
        "(changed outside the operator; reloading it)"
        for s in pods
        for name, root in sorted(replaced(wanted, s).items())
    ]
    if swapped:
        return ("False", "AdapterReplaced", "; ".join(swapped + unread)[:1024])
    if not missing and unread:
        return ("Unknown", "AdaptersUnverified", "; ".join(unread)[:1024])
    if not missing:
        return ("True", "AdaptersServed", f"{len(wanted)} adapter(s) served by all {len(pods)} pod(s)")
    parts = []
    for name, lacking in missing.items():
        why = f": {errors[name]}" if name in errors else " (loading)"
        parts.append(f"adapter {name} missing on {', '.join(lacking)}{why}")
    failed = any(name in errors for name in missing)
    return ("False", "LoadFailed" if failed else "Loading", "; ".join(parts + unread)[:1024])
