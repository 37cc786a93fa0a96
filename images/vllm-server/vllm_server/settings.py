"""Server settings: vLLM's flag names, environment fallbacks, engine pass-through."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ENV_PREFIX = "VLLM_SERVER_"
API_KEY_ENV = "VLLM_API_KEY"  # same variable upstream vLLM reads, so a Secret works for both
# Environment only, never a flag: a flag's value shows in the pod's args and in `ps`.
ADMIN_TOKEN_ENV = ENV_PREFIX + "ADMIN_TOKEN"
# Upstream vLLM's switch for the adapter routes, read the way upstream reads it.
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


@dataclass(frozen=True)
class LoraModule:
    """A LoRA adapter to load at startup (from --lora-modules)."""

    name: str
    path: str
    base_model_name: str | None = None


@dataclass(frozen=True)
class Settings:
    """Everything the server needs; engine flags we do not model go in `engine_args`."""

    model: str
    served_model_name: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    """Lets its holder change adapters, and read /v1 when an API key is set (the operator)."""
    allow_runtime_lora_updating: bool = False
    """Upstream's switch: the adapter routes work without an admin token."""
    revision: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float | None = None
    enable_lora: bool = False
    lora_modules: list[LoraModule] = field(default_factory=list)
    max_loras: int | None = None
    max_lora_rank: int | None = None
    max_queued_requests: int = 1024
    max_request_body_bytes: int | None = None
    """None: derived from max_model_len (see `Serving.body_limit`)."""
    shutdown_grace_seconds: float = 30.0
    log_level: str = "info"
    engine_args: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        """The name clients use for the base model."""
        return self.served_model_name[0] if self.served_model_name else self.model

    @property
    def model_names(self) -> list[str]:
        """Every name clients may use for the base model."""
        return self.served_model_name or [self.model]

    @property
    def lora_enabled(self) -> bool:
        """LoRA is on: asked for, or implied by adapters to load at startup."""
        return self.enable_lora or bool(self.lora_modules)

    def engine_argv(self) -> list[str]:
        """The command line handed to vLLM's own engine-argument parser."""
        argv = ["--model", self.model]
        if self.served_model_name:
            argv += ["--served-model-name", *self.served_model_name]
        for flag, value in (
            ("--revision", self.revision),
            ("--tensor-parallel-size", self.tensor_parallel_size),
            ("--pipeline-parallel-size", self.pipeline_parallel_size),
            ("--max-model-len", self.max_model_len),
            ("--dtype", self.dtype),
            ("--quantization", self.quantization),
            ("--kv-cache-dtype", self.kv_cache_dtype),
            ("--gpu-memory-utilization", self.gpu_memory_utilization),
            ("--max-loras", self.max_loras),
            ("--max-lora-rank", self.max_lora_rank),
        ):
            if value is not None:
                argv += [flag, str(value)]
        if self.lora_enabled:
            argv.append("--enable-lora")
        return argv + list(self.engine_args)


def parse_lora_module(text: str) -> LoraModule:
    """Parse `NAME=PATH` or vLLM's JSON form `{"name":..,"path":..,"base_model_name":..}`."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
            return LoraModule(str(data["name"]), str(data["path"]), data.get("base_model_name"))
        except (ValueError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"invalid --lora-modules JSON: {text!r}") from exc
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-modules expects NAME=PATH, got {text!r}")
    return LoraModule(name, path)


def _env(env: Mapping[str, str], name: str) -> str | None:
    """Read VLLM_SERVER_<NAME>; empty counts as unset."""
    return env.get(ENV_PREFIX + name.upper().replace("-", "_")) or None


def _bool(value: str | None) -> bool:
    """Interpret an environment flag."""
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Our flags; defaults come from the environment so a Deployment can use either."""
    e = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="python -m vllm_server",
        description="OpenAI-compatible server on vLLM's AsyncLLM.",
        epilog="Any other vLLM engine flag (e.g. --enforce-eager, --max-num-seqs) is passed "
        "through to vLLM's AsyncEngineArgs. Every flag above also reads VLLM_SERVER_<FLAG> "
        f"from the environment; the API key reads {API_KEY_ENV}. The admin token, the only "
        f"credential for loading and unloading adapters besides the API key, is read from "
        f"{ADMIN_TOKEN_ENV} only; without it those routes answer 403 unless "
        f"{RUNTIME_LORA_ENV}=True.",
        allow_abbrev=False,  # abbreviations would swallow engine flags that share a prefix
    )
    p.add_argument("--model", default=_env(e, "model"), help="HF repo id or local path")
    p.add_argument(
        "--served-model-name", nargs="+", default=None, help="name(s) clients use; the first is reported"
    )
    p.add_argument("--revision", default=_env(e, "revision"))
    p.add_argument("--host", default=_env(e, "host") or "0.0.0.0")
    p.add_argument("--port", type=int, default=int(_env(e, "port") or 8000))
    # No default here: `parse_settings` reads the environment itself, to name the source of
    # an empty value.
    p.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1 (env {API_KEY_ENV})"
    )
    p.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=int(_env(e, "tensor_parallel_size") or 1)
    )
    p.add_argument(
        "--pipeline-parallel-size", "-pp", type=int, default=int(_env(e, "pipeline_parallel_size") or 1)
    )
    p.add_argument("--max-model-len", type=int, default=_int_or_none(_env(e, "max_model_len")))
    p.add_argument("--dtype", default=_env(e, "dtype") or "auto")
    p.add_argument("--quantization", "-q", default=_env(e, "quantization"))
    p.add_argument("--kv-cache-dtype", default=_env(e, "kv_cache_dtype"))
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=_float_or_none(_env(e, "gpu_memory_utilization"))
    )
    p.add_argument("--enable-lora", action="store_true", default=_bool(_env(e, "enable_lora")))
    p.add_argument(
        "--lora-modules",
        type=parse_lora_module,
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME=PATH",
        help="repeatable",
    )
    p.add_argument("--max-loras", type=int, default=_int_or_none(_env(e, "max_loras")))
    p.add_argument("--max-lora-rank", type=int, default=_int_or_none(_env(e, "max_lora_rank")))
    p.add_argument(
        "--max-queued-requests",
        type=int,
        default=int(_env(e, "max_queued_requests") or 1024),
        help="requests allowed to wait beyond the engine's running batch; more get 503 + Retry-After",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=_int_or_none(_env(e, "max_request_body_bytes")),
        help="larger request bodies get 413 before they are read; default: what a "
        "prompt of max_model_len tokens can need (1 MiB + 32 bytes per token)",
    )
    p.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=float(_env(e, "shutdown_grace_seconds") or 30.0),
        help="on SIGTERM, how long in-flight requests may finish",
    )
    p.add_argument("--log-level", default=_env(e, "log_level") or "info")
    return p


def _int_or_none(v: str | None) -> int | None:
    """int() that keeps None."""
    return None if v is None else int(v)


def _float_or_none(v: str | None) -> float | None:
    """float() that keeps None."""
    return None if v is None else float(v)


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Parse the command line; unknown flags are kept for vLLM's engine parser."""
    e = os.environ if env is None else env
    parser = build_parser(e)
    ns, rest = parser.parse_known_args(argv)
    if not ns.model:
        parser.error("--model is required (or set VLLM_SERVER_MODEL)")
    served = ns.served_model_name
    if served is None and (env_served := _env(e, "served_model_name")):
        served = env_served.split(",")
    lora_modules = list(ns.lora_modules or [])
    if not lora_modules and (env_lora := _env(e, "lora_modules")):
        lora_modules = [parse_lora_module(t) for t in env_lora.split()]
    api_key = _secret(
        parser,
        e,
        ns.api_key,
        "--api-key",
        [API_KEY_ENV, ENV_PREFIX + "API_KEY"],
        "an empty API key would silently serve without authentication. Put the key in it, "
        "or unset it to serve without a key.",
    )
    admin_token = _secret(
        parser,
        e,
        None,
        None,
        [ADMIN_TOKEN_ENV],
        f"put the token in it, or unset it (the adapter routes then answer 403 unless "
        f"{RUNTIME_LORA_ENV}=True).",
    )
    if ns.max_request_body_bytes is not None and ns.max_request_body_bytes < 1:
        parser.error("--max-request-body-bytes must be at least 1")
    extra = _env(e, "engine_args")
    engine_args = list(rest) + (extra.split() if extra else [])
    return Settings(
        model=ns.model,
        served_model_name=list(served or []),
        host=ns.host,
        port=ns.port,
        api_key=api_key,
        admin_token=admin_token,
        allow_runtime_lora_updating=e.get(RUNTIME_LORA_ENV, "0").strip().lower() in {"1", "true"},
        revision=ns.revision,
        tensor_parallel_size=ns.tensor_parallel_size,
        pipeline_parallel_size=ns.pipeline_parallel_size,
        max_model_len=ns.max_model_len,
        dtype=ns.dtype,
        quantization=ns.quantization,
        kv_cache_dtype=ns.kv_cache_dtype,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        enable_lora=ns.enable_lora,
        lora_modules=lora_modules,
        max_loras=ns.max_loras,
        max_lora_rank=ns.max_lora_rank,
        max_queued_requests=ns.max_queued_requests,
        max_request_body_bytes=ns.max_request_body_bytes,
        shutdown_grace_seconds=ns.shutdown_grace_seconds,
        log_level=ns.log_level,
        engine_args=engine_args,
    )


def _secret(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str],
    flag_value: str | None,
    flag: str | None,
    env_names: Sequence[str],
    if_empty: str,
) -> str | None:
    """A key or token from its flag or else the first of `env_names` that is set, stripped.

    Surrounding whitespace goes: a Secret made with `kubectl create secret --from-file` keeps
    the file's final newline. A value that is set but empty stops the server with `if_empty`
    (the consequence and the fix), naming where it came from; the value is never shown.
    """
    source, value = flag, flag_value
    if value is None:
        source, value = next(((n, env[n]) for n in env_names if n in env), (None, None))
    if value is None:
        return None
    value = value.strip()
    if not value:
        parser.error(f"{source} is set but empty (or only whitespace): {if_empty}")
    return value
