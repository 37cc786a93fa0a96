"""The managed engine flags: every spelling vLLM's parser accepts is refused, values are not."""

from __future__ import annotations

import pytest

from vllm_operator import flags
from vllm_operator.api import SpecError, parse_spec

# (engine argument, the managed flag it sets in vLLM 0.32's parser or None). The e2e suite
# runs the same table through the CRD's CEL rule on a real API server.
CASES: list[tuple[str, str | None]] = [
    ("--tensor-parallel-size", "--tensor-parallel-size"),
    ("--tensor-parallel-size=2", "--tensor-parallel-size"),
    ("--tensor_parallel_size", "--tensor-parallel-size"),
    ("--tensor_parallel_size=8", "--tensor-parallel-size"),
    ("--max-model=99", "--max-model-len"),
    ("--max_model", "--max-model-len"),
    ("--served_model", "--served-model-name"),
    ("-tp", "--tensor-parallel-size"),
    ("-tp=2", "--tensor-parallel-size"),
    ("-pp", "--pipeline-parallel-size"),
    ("-q", "--quantization"),
    ("-qawq", "--quantization"),
    ("-q=fp8", "--quantization"),
    ("--port=1", "--port"),
    ("--api_key=x", "--api-key"),
    ("--kv-cache-dtype=fp8", "--kv-cache-dtype"),
    ("--enable-lora", "--enable-lora"),
    ("--m", "--model"),
    ("--enable-prefix-caching", None),
    ("--max-num-seqs=64", None),
    ("--max_num_seqs", None),
    ("--enable-lora-bias", None),
    ("-dp", None),
    ("-O3", None),
    ("8", None),
    ("awq", None),
    ("-1", None),
    ("-", None),
    ("--", None),
    ("", None),
]


@pytest.mark.parametrize(("arg", "flag"), CASES, ids=[repr(c[0]) for c in CASES])
def test_managed_spellings(arg: str, flag: str | None) -> None:
    found = flags.managed(arg)
    assert (found.flag if found else None) == flag


@pytest.mark.parametrize(("arg", "flag"), [c for c in CASES if c[1]], ids=[repr(c[0]) for c in CASES if c[1]])
def test_spec_refuses_naming_the_typed_field(arg: str, flag: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"model": "m", "engineArgs": [arg]})
    entry = next(m for m in flags.MANAGED if m.flag == flag)
    text = str(err.value)
    assert "spec.engineArgs" in text and entry.field in text and flag in text


def test_every_alias_and_flag_is_in_the_cel_rule() -> None:
    rule = flags.cel_rule()
    for name in (*flags.FLAGS, *flags.ALIASES):
        assert f"'{name}'" in rule


@pytest.mark.parametrize("name", sorted(flags.MANAGED_ENV))
def test_env_the_operator_sets_is_refused(name: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"model": "m", "env": [{"name": name, "value": "x"}]})
    assert "spec.env" in str(err.value) and name in str(err.value)


def test_other_env_is_kept() -> None:
    spec = parse_spec({"model": "m", "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}]})
    assert spec.env == [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}]
