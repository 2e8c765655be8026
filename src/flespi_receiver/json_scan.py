"""Reading the structure of JSON text as bytes, without building it: linear time, small memory.

Used where a parser would lose what matters (duplicate keys, the digits of a huge integer) or
would refuse what the receiver must judge element by element (a body with one broken element).
Works on bytes: brackets, commas, colons and quotes are ASCII and never part of a multi-byte
UTF-8 sequence, so invalid UTF-8 inside a string does not disturb it. Nothing here recurses
and no regular expression can backtrack: each byte is looked at a bounded number of times.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator

import orjson

WHITESPACE = b" \t\n\r"
# bytes decoded at a time to check UTF-8
_UTF8_SLICE = 1024 * 1024
# the deepest nesting stored, the message object itself being level 1 (orjson's own limit)
MAX_DEPTH = 1024
# what matters between strings: brackets, commas, colons and the start of a string
_STRUCTURE = re.compile(rb'["\[\]{},:]')
# inside an element of the body array only brackets and strings change the depth
_BRACKET_OR_QUOTE = re.compile(rb'["\[\]{}]')
_NUMBER_END = re.compile(rb"[ \t\n\r,}\]]")
_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")
_NOT_WHITESPACE = re.compile(rb"[^ \t\n\r]")
# the start of \u0030 .. \u003F (the digits and :;<=>? escaped): an escaped colon is one
_ESCAPED_COLON = b"\\u003"


def string_end(text: bytes, start: int) -> int:
    """Where the string whose opening quote is at `start` ends (its closing quote), or -1."""
    position = start + 1
    while True:
        quote = text.find(b'"', position)
        if quote == -1:
            return -1
        if not escaped(text, quote):
            return quote
        position = quote + 1


def escaped(text: bytes, position: int) -> bool:
    """Whether the byte at `position` is escaped: it follows an odd number of backslashes."""
    backslashes = 0
    while position - 1 - backslashes >= 0 and text[position - 1 - backslashes] == 0x5C:
        backslashes += 1
    return backslashes % 2 == 1


def split_array(text: bytes) -> list[bytes] | str:
    """The exact text of each top-level element of a JSON array (whitespace around it cut
    off), or why the text is not one. Elements are not checked: each is judged on its own."""
    first = _NOT_WHITESPACE.search(text)
    if first is None:
        return "body is empty"
    start = first.start()
    if text[start] != 0x5B:  # [
        return "body is not a JSON array"
    elements: list[bytes] = []
    depth = 0
    element_start = start + 1
    position = start
    while (found := _STRUCTURE.search(text, position)) is not None:
        at = found.start()
        kind = text[at]
        position = at + 1
        if kind == 0x22:  # a string
            end = string_end(text, at)
            if end == -1:
                break
            position = end + 1
        elif kind in b"[{":
            depth += 1
        elif kind in b"]}":
            depth -= 1
            if depth == 0:
                _append_element(elements, text[element_start:at], closing=True)
                if _NOT_WHITESPACE.search(text, position):
                    return "body has content after the closing ] of the array"
                return elements
            if depth < 0:
                break
        elif kind == 0x2C and depth == 1:  # a comma between elements
            _append_element(elements, text[element_start:at], closing=False)
            element_start = position
    return "body is not valid JSON (unbalanced brackets or an unterminated string)"


def _append_element(elements: list[bytes], element: bytes, *, closing: bool) -> None:
    stripped = element.strip(WHITESPACE)
    # "[]" has no element; "[1,]" ends with an empty one, which is kept and rejected
    if stripped or not closing or elements:
        elements.append(stripped)


def _tokens(text: bytes) -> Iterator[tuple[int, int, int]]:
    """(kind, start, end) of each bracket, comma, colon and string of valid JSON text."""
    position = 0
    while (found := _STRUCTURE.search(text, position)) is not None:
        at = found.start()
        kind = text[at]
        if kind == 0x22:
            end = string_end(text, at) + 1
            yield kind, at, end
            position = end
        else:
            yield kind, at, at + 1
            position = at + 1


def duplicate_key(text: bytes) -> str | None:
    """The first key that appears twice in one object of valid JSON text, else None.

    Keys are compared as decoded (so "a" and "\\u0061" are the same key); memory holds the
    keys of the objects still open, never the values.
    """
    open_objects: list[set[str] | None] = []  # None for an array
    expecting_key = False
    for kind, start, end in _tokens(text):
        if kind == 0x22:
            if expecting_key:
                key: str = orjson.loads(text[start:end])
                keys = open_objects[-1]
                assert keys is not None
                if key in keys:
                    return key
                keys.add(key)
                expecting_key = False
        elif kind == 0x7B:  # {
            open_objects.append(set())
            expecting_key = True
        elif kind == 0x5B:  # [
            open_objects.append(None)
        elif kind in b"]}":
            open_objects.pop()
        elif kind == 0x2C:  # ,
            expecting_key = bool(open_objects) and open_objects[-1] is not None
    return None


def top_level_value(text: bytes, name: str) -> bytes | None:
    """The text of the value of key `name` in the object `text` (valid JSON), if it is a
    number; None otherwise. The last one wins, as for a parser."""
    found: bytes | None = None
    depth = 0
    expecting_key = False
    wanted = False
    for kind, start, end in _tokens(text):
        if kind == 0x22:
            if expecting_key and depth == 1:
                wanted = orjson.loads(text[start:end]) == name
            expecting_key = False
        elif kind in b"[{":
            depth += 1
            expecting_key = kind == 0x7B and depth == 1
        elif kind in b"]}":
            depth -= 1
        elif kind == 0x2C:
            expecting_key = depth == 1
        elif kind == 0x3A and depth == 1 and wanted:  # the colon after the wanted key
            value_found = _NOT_WHITESPACE.search(text, end)
            value_start = value_found.start() if value_found else len(text)
            value_end = _NUMBER_END.search(text, value_start)
            value = text[value_start : value_end.start() if value_end else len(text)]
            found = value if value[:1] in b"-0123456789" else None
    return found


def integer_digits(number_text: bytes | None) -> str | None:
    """The digits of a JSON integer literal (no fraction, no exponent), else None."""
    if number_text is None or _INTEGER.fullmatch(number_text) is None:
        return None
    return str(int(number_text))


def no_key_lost(text: bytes, parsed: bytes) -> bool:
    """True when the valid JSON `text` has no key its parse lost (a duplicate key); `parsed`
    is the parse written back compact by orjson. False: not proven, ask duplicate_key.

    Proof by counting colon bytes, in C, whatever the whitespace, escapes or number forms:
    outside strings a colon follows each key, once; inside strings a colon is a character.
    The parse is the text less what a duplicate key drops (a key and its earlier value), so
    it has no key and no string the text lacks, and orjson writes every colon of a string as
    a colon. So, unless the text spells a colon as an escape (\\u003a), the parse has no
    more colons than the text, and as many only when it lost no key. A text holding any
    \\u003X escape is not taken as proven: that rare spelling goes to the scanner.
    """
    if text.count(b":") != parsed.count(b":"):
        return False
    # most texts have no backslash at all: one memchr instead of a search for five bytes
    return b"\\" not in text or _ESCAPED_COLON not in text


def why_invalid(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why `raw` is not a message, from orjson's error: in the words messages give."""
    if not raw:
        return "empty array element"
    if str(exc).startswith("depth limit exceeded"):
        return f"nesting deeper than {MAX_DEPTH} levels"
    # orjson reports invalid UTF-8 as a surrogate error at char 0, whatever the bytes
    return invalid_utf8(raw) or f"not valid JSON: {exc}"


def invalid_utf8(raw: bytes) -> str | None:
    """Why `raw` is not valid UTF-8 (the first bad byte and its offset), else None; decoded a
    slice at a time, so that this costs a slice, not the text."""
    if raw.isascii():
        return None
    view = memoryview(raw)
    position = 0
    try:
        while position < len(raw):
            end = position + _UTF8_SLICE
            _, consumed = codecs.utf_8_decode(view[position:end], "strict", end >= len(raw))
            position += consumed
    except UnicodeDecodeError as bad:
        offset = position + bad.start
        return f"not valid UTF-8: byte 0x{raw[offset]:02x} at offset {offset} of the message"
    finally:
        view.release()
    return None
