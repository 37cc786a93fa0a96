"""The engine flags the operator manages: one table for the pydantic validator and the CRD's CEL rule.

vLLM's argument parser is lenient in three ways a plain name list misses, each measured on
vLLM 0.32: `--tensor_parallel_size` is read as `--tensor-parallel-size` (underscores
normalised), `--max-model=99` as `--max-model-len=99` (argparse accepts unique prefixes),
and short aliases take attached values (`-tp 8`, `-qawq`). Both checks below refuse all
three, and both are built from `MANAGED`, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ManagedFlag:
    """A vLLM flag the operator sets itself, and the spec field users set instead."""

    flag: str
    field: str
    aliases: tuple[str, ...] = ()


MANAGED: tuple[ManagedFlag, ...] = (
    ManagedFlag("--model", "spec.model"),
    ManagedFlag("--served-model-name", "spec.servedModelName"),
    ManagedFlag("--host", "the operator (the pod listens on all addresses)"),
    ManagedFlag("--port", "the operator (the Service targets port 8000)"),
    ManagedFlag("--tensor-parallel-size", "spec.tensorParallelSize", ("-tp",)),
    ManagedFlag("--pipeline-parallel-size", "spec.pipelineParallelSize", ("-pp",)),
    ManagedFlag("--max-model-len", "spec.maxModelLen"),
    ManagedFlag("--dtype", "spec.dtype"),
    ManagedFlag("--quantization", "spec.quantization.method", ("-q",)),
    ManagedFlag("--kv-cache-dtype", "spec.quantization.kvCacheDtype"),
    ManagedFlag("--gpu-memory-utilization", "spec.gpuMemoryUtilization"),
    ManagedFlag("--revision", "spec.revision"),
    ManagedFlag("--enable-lora", "spec.lora"),
    ManagedFlag("--lora-modules", "spec.lora.adapters"),
    ManagedFlag("--max-loras", "spec.lora.maxLoras"),
    ManagedFlag("--max-lora-rank", "spec.lora.maxLoraRank"),
    ManagedFlag("--api-key", "spec.apiKeySecretRef"),
)
FLAGS = tuple(m.flag for m in MANAGED)
ALIASES = tuple(alias for m in MANAGED for alias in m.aliases)
# A one-letter alias takes its value attached (`-qawq`), so any argument starting with it is it.
ATTACHED = tuple(alias for alias in ALIASES if len(alias) == 2)


def managed(arg: str) -> ManagedFlag | None:
    """The managed flag an engine argument would set in vLLM's parser, or None."""
    head = arg.split("=", 1)[0]
    if head.startswith("--"):
        name = head.replace("_", "-")
        if len(name) <= 2:
            return None
        return next((m for m in MANAGED if m.flag.startswith(name)), None)
    if not head.startswith("-") or len(head) < 2:
        return None  # a value, e.g. the "8" of ["--max-num-seqs", "8"]
    return next(
        (
            m
            for m in MANAGED
            for a in m.aliases
            if a.startswith(head) or (a in ATTACHED and arg.startswith(a))
        ),
        None,
    )


def problem(arg: str) -> str | None:
    """Why an engine argument is refused, naming the field to use instead; None when it is allowed."""
    flag = managed(arg)
    if flag is None:
        return None
    shown = arg if len(arg) <= 40 else arg[:40] + "..."
    return (
        f"{shown!r} sets {flag.flag}, which is managed by the operator; "
        f"set it through {flag.field} instead of engineArgs"
    )


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def cel_rule() -> str:
    """The same check as `managed`, as a CEL rule on the engineArgs list."""
    # Each argument is reduced once to its flag part with underscores normalised (`h`); the
    # one-letter alias test on `h` equals the one on the whole argument, `h` being its prefix.
    long_form = f"size(h) > 2 && {_cel_list(FLAGS)}.exists(f, f.startsWith(h))"
    short_form = (
        f"size(h) > 1 && ({_cel_list(ALIASES)}.exists(s, s.startsWith(h))"
        f" || {_cel_list(ATTACHED)}.exists(s, h.startsWith(s)))"
    )
    return (
        "self.map(a, a.split('=')[0].replace('_', '-')).all(h, "
        f"h.startsWith('--') ? !({long_form}) : !(h.startsWith('-') && {short_form}))"
    )


# Environment variables the operator sets on the server container, and the field to use instead.
MANAGED_ENV = {
    "VLLM_API_KEY": "spec.apiKeySecretRef",
    "HF_TOKEN": "spec.hfTokenSecretRef",
    "VLLM_SERVER_ADMIN_TOKEN": "nothing: only the operator may change adapters",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "spec.lora.adapters (the operator loads adapters)",
    "HF_HOME": "spec.cache",
}


def env_problem(name: object) -> str | None:
    """Why an entry of spec.env is refused; None when it is allowed."""
    if name in MANAGED_ENV:
        return f"{name} is managed by the operator; set {MANAGED_ENV[str(name)]} instead of spec.env"
    return None
