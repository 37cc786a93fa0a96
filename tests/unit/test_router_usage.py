"""usage_of: the tokens of an answer, read from the `usage` object at its end."""

from __future__ import annotations

import pytest

from vllm_operator.router.stats import usage_of


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3}}', (12, 3)),
        (b'"usage": {"prompt_tokens": 4, "completion_tokens": 9}}\n', (4, 9)),
        # A stream's last event, then [DONE].
        (
            b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\ndata: [DONE]\n\n',
            (5, 2),
        ),
        # The last object wins (the earlier one is a stream's per-chunk usage).
        (
            b'"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
            b'data: {"usage":{"prompt_tokens":5,"completion_tokens":6}}\n\n',
            (5, 6),
        ),
        # Generated text that spells a usage object is a JSON string: its quotes are escaped.
        (b'{"content":"\\"usage\\":{\\"prompt_tokens\\":1,\\"completion_tokens\\":1}"}', None),
        (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n', None),
        (b'"usage":null}', None),
        (b'"usage":{"prompt_tokens":5}}', None),
        (b"", None),
    ],
)
def test_usage_of(tail: bytes, expected: tuple[int, int] | None) -> None:
    assert usage_of(tail) == expected
