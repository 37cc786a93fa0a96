"""`vllm-operator router` refuses bad arguments before listening, naming the flag and the fix."""

from __future__ import annotations

import pytest

from vllm_operator import cli


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--upstream", "tiny"], "give NAME=http://HOST:PORT"),
        (["--upstream", "=http://h:1"], "give NAME=http://HOST:PORT"),
        (["--upstream", "tiny=https://h:1"], "give an http://HOST:PORT URL"),
        (["--upstream", "tiny=http://h:1/v1"], "without a path"),
        (["--upstream", "tiny=http://h:1", "--namespace", "ns"], "cannot be combined with --namespace"),
        ([], "give --namespace NS"),
        (["-A", "--max-body-bytes", "0"], "--max-body-bytes: 0 is below 1"),
        (["-A", "--max-body-bytes", "1MB"], "--max-body-bytes: '1MB' is not an integer"),
        (["-A", "--grace-seconds", "-1"], "--grace-seconds: -1.0 is below 0.0"),
        (["-A", "--strategy", "Random"], "--strategy: invalid choice"),
        (["-A", "--port", "70000"], "70000 is not a port"),
    ],
)
def test_bad_router_arguments_are_refused_by_name(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(["router", *argv])
        raise SystemExit(code)
    assert exit_info.value.code == cli.EXIT_INVALID
    assert words in capsys.readouterr().err
