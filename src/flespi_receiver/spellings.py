"""The same messages as JSON text in other valid spellings, for the benchmark and the tests."""

from __future__ import annotations

import json
from typing import Any, Literal

import orjson

Spelling = Literal["compact", "spaced", "escaped", "pretty"]
SPELLINGS: tuple[Spelling, ...] = ("compact", "spaced", "escaped", "pretty")


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
    return json.dumps(message, indent=1, ensure_ascii=False).encode()
