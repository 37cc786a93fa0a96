"""Server settings, each declared once on `Settings`: our command line (vLLM's flag names),
its environment fallbacks and the engine's command line are built from the declarations."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

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


@dataclass(frozen=True, slots=True)
class Flag:
    """A setting given as `--<name>` (underscores as dashes), defaulting to VLLM_SERVER_<NAME>.

    The value's type is the setting's: int and float are parsed, a bool is a switch, a list
    takes one or more values (VLLM_SERVER_<NAME> separated by `env_sep`).
    """

    help: str | None = None
    short: str | None = None
    """An alias, as vLLM's (e.g. `-tp`)."""
    engine: bool = False
    """Also handed to vLLM's engine parser (`Settings.engine_argv`)."""
    item: Callable[[str], Any] | None = None
    """A list's parser of one value (default: the text)."""
    env_sep: str | None = ","
    """How a list's variable separates values (None: whitespace)."""
    repeat: bool = False
    """A list flag given again adds to the list (else the last one wins)."""
    metavar: str | None = None
    minimum: int | None = None
    """Smaller values stop the server with a usage error."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A credential: from its flag, else the first of `env` that is set; stripped, never empty.

    VLLM_SERVER_<NAME> is not its flag's default: `parse_settings` reads the variables itself,
    to name the source of an empty value.
    """

    env: tuple[str, ...]
    if_empty: str
    """What a set-but-empty value would mean, and the fix."""


@dataclass(frozen=True)
class Settings:
    """Everything the server needs, each setting declared once: the command line (in this
    order), its environment fallbacks and the engine's command line are built from these.

    Engine flags we do not model go in `engine_args`.
    """

    model: Annotated[str, Flag(help="HF repo id or local path", engine=True)]
    served_model_name: Annotated[
        list[str], Flag(help="name(s) clients use; the first is reported", engine=True)
    ] = field(default_factory=list)
    revision: Annotated[str | None, Flag(engine=True)] = None
    host: Annotated[str, Flag()] = "0.0.0.0"
    port: Annotated[int, Flag()] = 8000
    api_key: Annotated[
        str | None,
        Flag(help=f"require 'Authorization: Bearer KEY' on /v1 (env {API_KEY_ENV})"),
        Secret(
            (API_KEY_ENV, ENV_PREFIX + "API_KEY"),
            "an empty API key would silently serve without authentication. Put the key in it, "
            "or unset it to serve without a key.",
        ),
    ] = field(default=None, repr=False)
    tensor_parallel_size: Annotated[int, Flag(short="-tp", engine=True)] = 1
    pipeline_parallel_size: Annotated[int, Flag(short="-pp", engine=True)] = 1
    max_model_len: Annotated[int | None, Flag(engine=True)] = None
    dtype: Annotated[str, Flag(engine=True)] = "auto"
    quantization: Annotated[str | None, Flag(short="-q", engine=True)] = None
    kv_cache_dtype: Annotated[str | None, Flag(engine=True)] = None
    gpu_memory_utilization: Annotated[float | None, Flag(engine=True)] = None
    # Handed to the engine as `lora_enabled` (see `engine_argv`).
    enable_lora: Annotated[bool, Flag()] = False
    lora_modules: Annotated[
        list[LoraModule],
        Flag(help="repeatable", item=parse_lora_module, env_sep=None, repeat=True, metavar="NAME=PATH"),
    ] = field(default_factory=list)
    max_loras: Annotated[int | None, Flag(engine=True)] = None
    max_lora_rank: Annotated[int | None, Flag(engine=True)] = None
    max_queued_requests: Annotated[
        int,
        Flag(help="requests allowed to wait beyond the engine's running batch; more get 503 + Retry-After"),
    ] = 1024
    max_request_body_bytes: Annotated[
        int | None,
        Flag(
            help="larger request bodies get 413 before they are read; default: what a "
            "prompt of max_model_len tokens can need (1 MiB + 32 bytes per token)",
            minimum=1,
        ),
    ] = None
    """None: derived from max_model_len (see `ServingState.body_limit`)."""
    shutdown_grace_seconds: Annotated[
        float, Flag(help="on SIGTERM, how long in-flight requests may finish")
    ] = 30.0
    log_level: Annotated[str, Flag()] = "info"
    # Environment only, never a flag: a flag's value shows in the pod's args and in `ps`.
    admin_token: Annotated[
        str | None,
        Secret(
            (ADMIN_TOKEN_ENV,),
            f"put the token in it, or unset it (the adapter routes then answer 403 unless "
            f"{RUNTIME_LORA_ENV}=True).",
        ),
    ] = field(default=None, repr=False)
    """Lets its holder change adapters, and read /v1 when an API key is set (the operator)."""
    allow_runtime_lora_updating: bool = False
    """Upstream's switch: the adapter routes work without an admin token."""
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
        argv: list[str] = []
        for d in _declared():
            value = getattr(self, d.name)
            if d.flag is None or not d.flag.engine or value is None or value == []:
                continue
            argv += [d.option, *value] if isinstance(value, list) else [d.option, str(value)]
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


@dataclass(frozen=True, slots=True)
class _Declared:
    """A setting as declared on `Settings`."""

    name: str
    type: Any
    """The value's type, without None (an item's type for a list)."""
    is_list: bool
    default: Any
    flag: Flag | None
    secret: Secret | None

    @property
    def option(self) -> str:
        """The long flag."""
        return "--" + self.name.replace("_", "-")


@functools.cache
def _declared() -> tuple[_Declared, ...]:
    """The settings in declaration order, read from `Settings`' annotations."""
    hints = typing.get_type_hints(Settings, include_extras=True)
    out = []
    for f in dataclasses.fields(Settings):
        hint: Any = hints[f.name]
        extras: tuple[Any, ...] = ()
        if typing.get_origin(hint) is Annotated:
            hint, extras = typing.get_args(hint)[0], typing.get_args(hint)[1:]
        is_list = typing.get_origin(hint) is list
        if is_list or typing.get_origin(hint) is types.UnionType:
            hint = next(a for a in typing.get_args(hint) if a is not types.NoneType)
        default = None if f.default is dataclasses.MISSING else f.default
        flag = next((x for x in extras if isinstance(x, Flag)), None)
        secret = next((x for x in extras if isinstance(x, Secret)), None)
        out.append(_Declared(f.name, hint, is_list, default, flag, secret))
    return tuple(out)


def _env(env: Mapping[str, str], name: str) -> str | None:
    """Read VLLM_SERVER_<NAME>; empty counts as unset."""
    return env.get(ENV_PREFIX + name.upper().replace("-", "_")) or None


def _bool(value: str | None) -> bool:
    """Interpret an environment flag."""
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _add_flag(p: argparse.ArgumentParser, d: _Declared, flag: Flag, env: Mapping[str, str]) -> None:
    """Add one setting's flag; its default is VLLM_SERVER_<NAME> when set, else the setting's."""
    names = [d.option, flag.short] if flag.short else [d.option]
    raw = _env(env, d.name) if d.secret is None else None
    kw: dict[str, Any] = {"help": flag.help}
    if d.is_list:
        # No default: the variable is read after parsing, and only when the flag is absent.
        kw.update(nargs="+", default=None, metavar=flag.metavar)
        if flag.item is not None:
            kw["type"] = flag.item
        if flag.repeat:
            kw["action"] = "extend"
    elif d.type is bool:
        kw.update(action="store_true", default=_bool(raw))
    else:
        if d.type is not str:
            kw["type"] = d.type
        kw["default"] = d.default if raw is None else _from_env(p, d, raw, d.type)
    p.add_argument(*names, **kw)


def _from_env(p: argparse.ArgumentParser, d: _Declared, raw: str, parse: Callable[[str], Any]) -> Any:
    """A VLLM_SERVER_<NAME> value parsed like its flag's; a usage error naming both if it is not
    one (a Deployment's env typo used to stop the server with a traceback)."""
    try:
        return parse(raw)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        variable = ENV_PREFIX + d.name.upper().replace("-", "_")
        p.error(f"{variable}={raw!r} is not a valid {d.option} value ({exc})")


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
    for d in _declared():
        if d.flag is not None:
            _add_flag(p, d, d.flag, e)
    return p


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Parse the command line; unknown flags are kept for vLLM's engine parser."""
    e = os.environ if env is None else env
    parser = build_parser(e)
    ns, rest = parser.parse_known_args(argv)
    if not ns.model:
        parser.error("--model is required (or set VLLM_SERVER_MODEL)")
    values = {d.name: getattr(ns, d.name) for d in _declared() if d.flag is not None}
    for d in _declared():
        if d.flag is not None and d.is_list:
            items = values[d.name]
            if items is None and (raw := _env(e, d.name)):
                items = [_from_env(parser, d, t, d.flag.item or str) for t in raw.split(d.flag.env_sep)]
            values[d.name] = list(items or [])
    for d in _declared():
        if d.secret is not None:
            flag_value = values.get(d.name)
            option = d.option if d.flag is not None else None
            values[d.name] = _secret(parser, e, flag_value, option, d.secret.env, d.secret.if_empty)
    for d in _declared():
        minimum = d.flag.minimum if d.flag is not None else None
        if minimum is not None and values[d.name] is not None and values[d.name] < minimum:
            parser.error(f"{d.option} must be at least {minimum}")
    extra = _env(e, "engine_args")
    return Settings(
        **values,
        allow_runtime_lora_updating=e.get(RUNTIME_LORA_ENV, "0").strip().lower() in {"1", "true"},
        engine_args=list(rest) + (extra.split() if extra else []),
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
