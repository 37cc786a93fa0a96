"""Unit tests of the command line, environment fallbacks and the Dockerfile contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_server.settings import LoraModule, parse_settings

DOCKERFILE = Path(__file__).resolve().parents[2] / "images" / "vllm-server" / "Dockerfile"

# What the operator's renderer passes to the server container.
OPERATOR_ARGS = ["--model", "/models/llama", "--served-model-name", "llama", "--port", "8000",
                 "--host", "0.0.0.0", "--tensor-parallel-size", "2", "--max-model-len", "4096",
                 "--dtype", "bfloat16", "--enable-lora", "--lora-modules", "a=/p",
                 "--gpu-memory-utilization", "0.9", "--max-loras", "4", "--max-lora-rank", "16",
                 "--quantization", "awq", "--kv-cache-dtype", "fp8"]


def test_operator_args_parse() -> None:
    s = parse_settings(OPERATOR_ARGS, env={})
    assert s.model == "/models/llama" and s.model_name == "llama"
    assert (s.host, s.port, s.tensor_parallel_size, s.max_model_len) == ("0.0.0.0", 8000, 2,
                                                                          4096)
    assert s.dtype == "bfloat16" and s.enable_lora
    assert s.lora_modules == [LoraModule("a", "/p")]
    assert s.engine_args == []
    argv = s.engine_argv()
    assert argv[:2] == ["--model", "/models/llama"]
    for flag in ("--tensor-parallel-size", "--max-model-len", "--dtype", "--enable-lora",
                 "--quantization", "--kv-cache-dtype", "--max-loras", "--max-lora-rank"):
        assert flag in argv
    assert "--port" not in argv and "--lora-modules" not in argv  # server-only flags


def test_passthrough_and_repeated_lora_modules() -> None:
    s = parse_settings(["--model", "m", "--lora-modules", "a=/a", "b=/b", "--enforce-eager",
                        "--max-num-seqs", "8", "--lora-modules",
                        json.dumps({"name": "c", "path": "/c", "base_model_name": "m"})],
                       env={})
    assert [m.name for m in s.lora_modules] == ["a", "b", "c"]
    assert s.lora_modules[2].base_model_name == "m"
    assert s.engine_args == ["--enforce-eager", "--max-num-seqs", "8"]
    assert s.engine_argv()[-3:] == ["--enforce-eager", "--max-num-seqs", "8"]


def test_environment_fallbacks() -> None:
    env = {"VLLM_SERVER_MODEL": "/m", "VLLM_SERVER_PORT": "9000", "VLLM_API_KEY": "k",
           "VLLM_SERVER_SERVED_MODEL_NAME": "x", "VLLM_SERVER_ENABLE_LORA": "true",
           "VLLM_SERVER_ENGINE_ARGS": "--enforce-eager"}
    s = parse_settings([], env=env)
    assert (s.model, s.port, s.api_key, s.model_name, s.enable_lora) == ("/m", 9000, "k", "x",
                                                                          True)
    assert s.engine_args == ["--enforce-eager"]
    # Flags win over the environment.
    assert parse_settings(["--port", "1"], env=env).port == 1


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
    out = subprocess.run([sys.executable, *argv[1:], "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for flag in OPERATOR_ARGS:
        if flag.startswith("--"):
            assert flag in out, flag
