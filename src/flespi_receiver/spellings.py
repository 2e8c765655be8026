"""The same messages as JSON text in other valid spellings, for the benchmark and the tests."""

from __future__ import annotations

import json
from typing import Any, Literal

import orjson

Spelling = Literal["compact", "spaced", "escaped", "pretty", "numbers"]
SPELLINGS: tuple[Spelling, ...] = ("compact", "spaced", "escaped", "pretty", "numbers")


def spelled(message: Any, spelling: Spelling) -> bytes:
    """`message` as JSON text: compact as orjson writes it; spaced as json.dumps by default
    (a space after , and :); escaped: compact, every non-ASCII character as \\uXXXX and / as
    \\/; pretty: indented by one space, one value per line."""
    if spelling == "compact":
        return orjson.dumps(message)
    if spelling == "spaced":
        return json.dumps(message, ensure_ascii=False).encode()
    if spelling == "escaped":
        return json.dumps(message, separators=(",", ":")).replace("/", "\\/").encode()
    if spelling == "numbers":
        return _numbers(message).encode()
    return json.dumps(message, indent=1, ensure_ascii=False).encode()


def _numbers(value: Any) -> str:
    kind = type(value)
    if kind is dict:
        items = (f"{orjson.dumps(k).decode()}:{_numbers(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if kind is list:
        return "[" + ",".join(_numbers(v) for v in value) + "]"
    if kind is float:
        text = repr(value)
        return text.replace("e", "E") if "e" in text else text + "0"
    if kind is int and value == 0:
        return "-0"
    return orjson.dumps(value).decode()
