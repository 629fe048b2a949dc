"""The handler's JSON parser is json.loads without its Python frames: same values, same
errors, for every shape of body a client may send."""

import json
from typing import Any

import pytest

from paddler.balancer.proxy.handler import parse_json

BODIES = [
    '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
    '  \n\t{"a": 1}\r\n ',
    "[1, 2.5, -3e2, true, false, null]",
    '"just a string"',
    "0",
    '{"nested": {"deep": [{"x": "\\u00e9\\n"}]}}',
    "",
    "   ",
    "{",
    '{"a": 1} {"b": 2}',
    '{"a": 1}  x',
    "nul",
    '{"a": NaN}',
    "\ufeff{}",
    '{"a": "unterminated}',
    "[1, 2,]",
    "1 2",
]


def outcome(parse: Any, text: str) -> tuple[str, Any]:
    try:
        return "value", parse(text)
    except json.JSONDecodeError as error:
        return "error", (error.msg, error.pos, str(error))


@pytest.mark.parametrize("text", BODIES)
def test_parse_json_agrees_with_json_loads(text: str) -> None:
    assert outcome(parse_json, text) == outcome(json.loads, text)
