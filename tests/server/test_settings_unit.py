"""Unit tests of the command line, environment fallbacks and the Dockerfile contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_server.settings import LoraModule, build_parser, parse_settings

DOCKERFILE = Path(__file__).resolve().parents[2] / "images" / "vllm-server" / "Dockerfile"

# What the operator's renderer passes to the server container.
OPERATOR_ARGS = [
    "--model",
    "/models/llama",
    "--served-model-name",
    "llama",
    "--port",
    "8000",
    "--host",
    "0.0.0.0",
    "--tensor-parallel-size",
    "2",
    "--max-model-len",
    "4096",
    "--dtype",
    "bfloat16",
    "--enable-lora",
    "--lora-modules",
    "a=/p",
    "--gpu-memory-utilization",
    "0.9",
    "--max-loras",
    "4",
    "--max-lora-rank",
    "16",
    "--quantization",
    "awq",
    "--kv-cache-dtype",
    "fp8",
]


def test_operator_args_parse() -> None:
    s = parse_settings(OPERATOR_ARGS, env={})
    assert s.model == "/models/llama" and s.model_name == "llama"
    assert (s.host, s.port, s.tensor_parallel_size, s.max_model_len) == ("0.0.0.0", 8000, 2, 4096)
    assert s.dtype == "bfloat16" and s.enable_lora
    assert s.lora_modules == [LoraModule("a", "/p")]
    assert s.engine_args == []
    argv = s.engine_argv()
    assert argv[:2] == ["--model", "/models/llama"]
    for flag in (
        "--tensor-parallel-size",
        "--max-model-len",
        "--dtype",
        "--enable-lora",
        "--quantization",
        "--kv-cache-dtype",
        "--max-loras",
        "--max-lora-rank",
    ):
        assert flag in argv
    assert "--port" not in argv and "--lora-modules" not in argv  # server-only flags


def test_passthrough_and_repeated_lora_modules() -> None:
    s = parse_settings(
        [
            "--model",
            "m",
            "--lora-modules",
            "a=/a",
            "b=/b",
            "--enforce-eager",
            "--max-num-seqs",
            "8",
            "--lora-modules",
            json.dumps({"name": "c", "path": "/c", "base_model_name": "m"}),
        ],
        env={},
    )
    assert [m.name for m in s.lora_modules] == ["a", "b", "c"]
    assert s.lora_modules[2].base_model_name == "m"
    assert s.engine_args == ["--enforce-eager", "--max-num-seqs", "8"]
    assert s.engine_argv()[-3:] == ["--enforce-eager", "--max-num-seqs", "8"]


def test_environment_fallbacks() -> None:
    env = {
        "VLLM_SERVER_MODEL": "/m",
        "VLLM_SERVER_PORT": "9000",
        "VLLM_API_KEY": "k",
        "VLLM_SERVER_SERVED_MODEL_NAME": "x",
        "VLLM_SERVER_ENABLE_LORA": "true",
        "VLLM_SERVER_ENGINE_ARGS": "--enforce-eager",
    }
    s = parse_settings([], env=env)
    assert (s.model, s.port, s.api_key, s.model_name, s.enable_lora) == ("/m", 9000, "k", "x", True)
    assert s.engine_args == ["--enforce-eager"]
    # Flags win over the environment.
    assert parse_settings(["--port", "1"], env=env).port == 1


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VLLM_SERVER_PORT": "abc"}, "VLLM_SERVER_PORT='abc' is not a valid --port value"),
        ({"VLLM_SERVER_LORA_MODULES": "nopath"}, "VLLM_SERVER_LORA_MODULES='nopath' is not a valid"),
    ],
)
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(
    env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Deployment's typo in an env var used to stop the server with a traceback."""
    with pytest.raises(SystemExit) as exit_:
        parse_settings([], env={"VLLM_SERVER_MODEL": "/m", **env})
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_bad_lora_module_and_missing_model() -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--model", "m", "--lora-modules", "nopath"], env={})
    with pytest.raises(SystemExit):
        parse_settings([], env={})


def test_dockerfile_entrypoint_and_help() -> None:
    text = DOCKERFILE.read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert entry, "Dockerfile needs an exec-form ENTRYPOINT"
    argv = json.loads(entry.group(1))
    assert argv == ["python", "-m", "vllm_server"]
    assert re.search(r"^FROM\s+vllm/vllm-openai:v\d+\.\d+\.\d+", text, re.M), "pinned base"
    assert re.search(r"^USER\s+(?!root|0\b)\S+", text, re.M), "non-root user"
    # The entrypoint module runs and knows every flag the operator passes.
    out = subprocess.run(
        [sys.executable, *argv[1:], "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for flag in OPERATOR_ARGS:
        if flag.startswith("--"):
            assert flag in out, flag


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--api-key", ""], {}, "--api-key"),
        (["--api-key", " \n"], {"VLLM_API_KEY": "k"}, "--api-key"),
        ([], {"VLLM_API_KEY": ""}, "VLLM_API_KEY"),
        ([], {"VLLM_API_KEY": "  \n"}, "VLLM_API_KEY"),
        ([], {"VLLM_API_KEY": "", "VLLM_SERVER_API_KEY": "k"}, "VLLM_API_KEY"),
        ([], {"VLLM_SERVER_API_KEY": "\t"}, "VLLM_SERVER_API_KEY"),
        ([], {"VLLM_SERVER_ADMIN_TOKEN": ""}, "VLLM_SERVER_ADMIN_TOKEN"),
    ],
)
def test_empty_key_or_token_refuses_to_start(
    argv: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty key used to turn authentication off without a word.
    with pytest.raises(SystemExit) as exit_:
        parse_settings(["--model", "m", *argv], env=env)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{named} is set but empty" in err
    assert "unset it" in err  # the fix


def test_keys_and_tokens_are_stripped_and_come_from_the_environment() -> None:
    s = parse_settings(["--model", "m"], env={"VLLM_API_KEY": "k1\n", "VLLM_SERVER_ADMIN_TOKEN": " t1\r\n"})
    assert (s.api_key, s.admin_token) == ("k1", "t1")
    assert parse_settings(["--model", "m", "--api-key", "k2 "], env={}).api_key == "k2"
    assert parse_settings(["--model", "m"], env={"VLLM_SERVER_API_KEY": "k3"}).api_key == "k3"
    # The admin token has no flag: its value would show in the pod's args and in `ps`.
    assert "--admin-token" not in build_parser({}).format_help()
    assert parse_settings(["--model", "m", "--admin-token", "t"], env={}).admin_token is None


@pytest.mark.parametrize(
    ("value", "on"),
    [
        ("True", True),
        ("true", True),
        ("1", True),
        (" TRUE ", True),
        ("False", False),
        ("0", False),
        ("yes", False),
        ("", False),
        (None, False),
    ],
)
def test_runtime_lora_switch_reads_like_upstream(value: str | None, on: bool) -> None:
    env = {} if value is None else {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": value}
    assert parse_settings(["--model", "m"], env=env).allow_runtime_lora_updating is on


def test_secrets_are_not_in_repr_or_engine_argv() -> None:
    s = parse_settings(["--model", "m", "--api-key", "k-secret"], env={"VLLM_SERVER_ADMIN_TOKEN": "t-secret"})
    for text in (repr(s), str(s), " ".join(s.engine_argv())):
        assert "k-secret" not in text and "t-secret" not in text


def test_body_limit_setting() -> None:
    assert parse_settings(["--model", "m"], env={}).max_request_body_bytes is None
    s = parse_settings(["--model", "m"], env={"VLLM_SERVER_MAX_REQUEST_BODY_BYTES": "2048"})
    assert s.max_request_body_bytes == 2048
    with pytest.raises(SystemExit):
        parse_settings(["--model", "m", "--max-request-body-bytes", "0"], env={})
