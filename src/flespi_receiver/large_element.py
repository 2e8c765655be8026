"""Judging a very large element without building it: memory for its keys, not its values.

A parse of one message costs several times its text (a Python object per value: an array of
a million integers is 40 MB for its 8 MB of text), so an element larger than LARGE_ELEMENT is
judged here instead, with the same verdicts as messages.judge_element:

- msgspec checks the JSON syntax (escapes, lone surrogates, control characters, numbers)
  while skipping every value it is not asked for, and hands back the text of the known
  fields, which orjson then parses: they are small;
- the UTF-8 is checked in slices; a scan over quotes and brackets (json_scan's way: linear,
  nothing recursive) counts the nesting, finds a key given twice in one object and numbers
  beyond a double (orjson refuses those), and `\\u0000` escapes are looked for in C.

Nesting deeper than msgspec goes (Python's recursion limit, about 990 levels) is left to the
usual judge, as is a stream keyed by content, which needs the parse.
"""

from __future__ import annotations

import functools
import re
from array import array
from collections.abc import Collection
from typing import Any

import msgspec
import orjson

from flespi_receiver.json_scan import MAX_DEPTH, escaped, invalid_utf8, string_end, why_invalid
from flespi_receiver.splitter import deep_enough

# elements larger than this (bytes) are judged here
LARGE_ELEMENT = 1024 * 1024
_QUOTE_OR_BRACKET = re.compile(rb'["\[\]{}]')
_COLON_NEXT = re.compile(rb"[ \t\n\r]*:")
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
# where a number that may be beyond a double (about 1.8e308) shows itself, outside strings:
# an exponent of 100 or more, or 210 digits in a row (with an exponent below 100, fewer can't
# pass 1e308); counted from the run's first digit only, so that the search stays linear
_MAYBE_HUGE_NUMBER = re.compile(rb"[eE]\+?0*[1-9][0-9]{2}|(?<![0-9])[0-9]{210}")
_NUMBER_CHARACTERS = re.compile(rb"[-+.0-9eE]*")
_NUMBER_BYTES = frozenset(b"-+.0123456789eE")
_NUL_ESCAPE = b"\\u0000"
# past this many keys an open object's keys are kept as their places in the text
_MANY_KEYS = 4096
# a table slot: 1 + the key's place in the text (0: free) and a fingerprint of its hash
_PLACE_BITS = 40
_PLACE = (1 << _PLACE_BITS) - 1
_FINGERPRINT = (1 << (64 - _PLACE_BITS)) - 1
_KINDS = {
    ord("["): "an array",
    ord('"'): "a string",
    ord("t"): "a boolean",
    ord("f"): "a boolean",
    ord("n"): "null",
}


class TooDeep(Exception):
    """Nested deeper than msgspec reads: judge the element the usual way."""


def judge_large(raw: bytes, names: Collection[str]) -> dict[str, Any] | str:
    """The parsed values of those top-level keys `names` that `raw` holds, or why `raw` can't
    be stored as a message (the reasons messages.judge_element gives; a syntax error is
    worded by msgspec). Raises TooDeep."""
    first = _WHITESPACE.match(raw)
    start = first.end() if first else 0
    wanted = tuple(sorted(set(names)))
    try:
        with deep_enough():
            if raw[start : start + 1] == b"{":
                known: tuple[msgspec.Raw, ...] | None = msgspec.structs.astuple(
                    _known_decoder(wanted).decode(raw)
                )
            else:
                msgspec.json.decode(raw, type=msgspec.Raw)  # the syntax only, nothing built
                known = None
    except msgspec.DecodeError:
        return _orjson_reason(raw)
    except RecursionError:
        # deeper than even deep_enough() reads: the scan says so, else the usual judge
        problem = invalid_utf8(raw) or _structure_problem(raw, keys=False)
        if problem is None:
            raise TooDeep from None
        return problem
    problem = invalid_utf8(raw) or _structure_problem(raw, keys=known is not None)
    if problem is not None:
        return problem
    if known is None:
        return f"not a JSON object but {_kind(raw[start])}"
    if _NUL_ESCAPE in raw and _has_nul_escape(raw):
        return "a string or key contains \\u0000, which PostgreSQL cannot store"
    values = zip(wanted, known, strict=True)
    return {name: orjson.loads(memoryview(value)) for name, value in values if value}


@functools.lru_cache(maxsize=16)
def _known_decoder(names: tuple[str, ...]) -> msgspec.json.Decoder[Any]:
    """A decoder of an object that keeps the text of the keys `names` (empty when absent)
    and skips every other value, checking its syntax."""
    fields = [(f"f{i}", msgspec.Raw, msgspec.Raw()) for i in range(len(names))]
    rename = {f"f{i}": name for i, name in enumerate(names)}
    return msgspec.json.Decoder(msgspec.defstruct("KnownText", fields, rename=rename))


def _kind(first: int) -> str:
    return _KINDS.get(first, "a number")


def _structure_problem(raw: bytes, *, keys: bool) -> str | None:
    """Nesting deeper than MAX_DEPTH, a number beyond a double or, with `keys`, a key given
    twice in one object, in `raw` (valid JSON syntax): what judge_element says of it."""
    open_objects: list[_ObjectKeys | None] = []  # the keys of each open object; None: array
    gap = 0  # where the text outside strings and brackets begins
    while (found := _QUOTE_OR_BRACKET.search(raw, gap)) is not None:
        at = found.start()
        number = _number_beyond_double(raw, gap, at)
        if number is not None:
            return number
        kind = raw[at]
        if kind == 0x22:  # a string (skipped whole): a key when a colon follows
            end = string_end(raw, at)
            gap = end + 1
            seen = open_objects[-1] if keys and open_objects else None
            if seen is not None and _COLON_NEXT.match(raw, gap) is not None:
                key = _key_at(raw, at, end)
                if not seen.add(key, at):
                    return f"duplicate key {key!r}"
            continue
        gap = at + 1
        if kind in b"[{":
            open_objects.append(_ObjectKeys(raw) if kind == 0x7B else None)
            if len(open_objects) > MAX_DEPTH:
                return f"nesting deeper than {MAX_DEPTH} levels"
        else:
            open_objects.pop()
    return _number_beyond_double(raw, gap, len(raw))


def _key_at(raw: bytes, at: int, end: int) -> str:
    """The key whose quotes are at `at` and `end`, decoded."""
    text = raw[at + 1 : end]
    return orjson.loads(raw[at : end + 1]) if b"\\" in text else text.decode()


class _ObjectKeys:
    """The keys of one open object, to find one given twice. A set while few; past
    _MANY_KEYS, an open-addressing table of where each key starts in the text (8 bytes a
    slot: the place and a fingerprint of the key's hash), so that an object of a million
    keys costs about its text again, not five times it in strings; a key whose fingerprint
    matches is read again from the text to be compared."""

    __slots__ = ("_count", "_few", "_mask", "_raw", "_slots")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._few: dict[str, int] | None = {}
        self._slots = array("Q")
        self._mask = 0
        self._count = 0

    def add(self, key: str, at: int) -> bool:
        """Note the key whose opening quote is at `at`; False when the object had it."""
        few = self._few
        if few is None:
            return self._insert(key, at)
        if key in few:
            return False
        few[key] = at
        if len(few) > _MANY_KEYS:
            self._few = None
            self._resize(4 * _MANY_KEYS)
            for known, place in few.items():
                self._insert(known, place)
        return True

    def _insert(self, key: str, at: int) -> bool:
        if 4 * (self._count + 1) > 3 * len(self._slots):
            self._resize(2 * len(self._slots))
        hashed = hash(key)
        fingerprint = (hashed >> 8) & _FINGERPRINT
        slot = hashed & self._mask
        slots = self._slots
        while held := slots[slot]:
            if held >> _PLACE_BITS == fingerprint:
                place = (held & _PLACE) - 1
                if _key_at(self._raw, place, string_end(self._raw, place)) == key:
                    return False
            slot = (slot + 1) & self._mask
        slots[slot] = fingerprint << _PLACE_BITS | (at + 1)
        self._count += 1
        return True

    def _resize(self, size: int) -> None:
        old = self._slots
        self._slots = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0
        for slot in old:
            if not slot:
                continue
            place = (slot & _PLACE) - 1
            self._insert(_key_at(self._raw, place, string_end(self._raw, place)), place)


def _number_beyond_double(raw: bytes, start: int, end: int) -> str | None:
    """Why a number in raw[start:end] (text outside strings) can't be read as a double."""
    position = start
    while (found := _MAYBE_HUGE_NUMBER.search(raw, position, end)) is not None:
        first = found.start()
        while first > start and raw[first - 1] in _NUMBER_BYTES:
            first -= 1
        matched = _NUMBER_CHARACTERS.match(raw, found.start(), end)
        last = matched.end() if matched else found.end()
        try:
            orjson.loads(raw[first:last])
        except orjson.JSONDecodeError:
            return _orjson_reason(raw)
        position = max(last, found.end())
    return None


def _orjson_reason(raw: bytes) -> str:
    """What judge_element says of `raw`, which is not valid JSON: orjson's own words, where it
    stops reading (before building anything)."""
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return why_invalid(raw, exc)
    raise TooDeep  # valid after all: left to the usual judge


def _has_nul_escape(raw: bytes) -> bool:
    """Whether `raw` (valid JSON) holds a \\u0000 escape: one whose backslash is not itself
    escaped, i.e. follows an even number of backslashes."""
    position = raw.find(_NUL_ESCAPE)
    while position != -1:
        if not escaped(raw, position):
            return True
        position = raw.find(_NUL_ESCAPE, position + 1)
    return False
