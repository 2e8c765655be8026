"""The same JSON in other valid spellings: whitespace, escapes, number spellings, a BOM."""

from __future__ import annotations

import json
import random
from typing import Any

WHITESPACE = ["", "", " ", "\n", "\t", "\r\n  "]
BOM = b"\xef\xbb\xbf"


class RandomSpelling:
    """Writes JSON with whitespace, escapes and number spellings drawn from `rng`."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def space(self) -> str:
        return self.rng.choice(WHITESPACE)

    def text(self, value: Any) -> str:
        if isinstance(value, dict):
            items = [
                f"{self.space()}{self.string(k)}{self.space()}:{self.space()}{self.text(v)}"
                for k, v in value.items()
            ]
            return "{" + ",".join(items) + self.space() + "}"
        if isinstance(value, list):
            return "[" + ",".join(self.space() + self.text(v) for v in value) + self.space() + "]"
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, bool) or value is None:
            return json.dumps(value)
        if isinstance(value, int):
            return self.integer(value)
        return self.number(value)

    def integer(self, value: int) -> str:
        if value == 0 and self.rng.random() < 0.5:
            return "-0"
        return str(value)

    def number(self, value: float) -> str:
        text = repr(value)
        choice = self.rng.random()
        if "e" in text:
            return text.replace("e", "E") if choice < 0.5 else text
        if choice < 0.3:
            return text + "0"  # 1.5 -> 1.50
        if choice < 0.6:
            return text + "E0"
        return text

    def string(self, value: str) -> str:
        parts = ['"']
        for char in value:
            code = ord(char)
            if char in '"\\' or code < 0x20 or self.rng.random() < 0.2:
                if code > 0xFFFF:
                    code -= 0x10000
                    high, low = 0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)
                    parts.append(f"\\u{high:04x}\\u{low:04X}")
                else:
                    parts.append(f"\\u{code:04x}" if self.rng.random() < 0.5 else f"\\u{code:04X}")
            elif char == "/" and self.rng.random() < 0.5:
                parts.append("\\/")
            else:
                parts.append(char)
        parts.append('"')
        return "".join(parts)

    def body(self, elements: list[bytes]) -> bytes:
        """A batch of already spelled elements, maybe with a byte order mark."""
        joined = ",".join(self.space() + e.decode() + self.space() for e in elements)
        body = (self.space() + "[" + joined + "]" + self.space()).encode()
        return BOM + body if self.rng.random() < 0.3 else body
