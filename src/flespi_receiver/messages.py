"""Decoding a batch body into messages that can be stored and messages that must be quarantined.

Every element is judged on its own (judge_element). The fast path splits the body with
msgspec and stores every element in one go, as long as none must be quarantined; otherwise
the careful path splits the array itself (json_scan), so that one broken element never sinks
the others, and keeps the good messages and the rejected content apart.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

from flespi_receiver.json_scan import duplicate_key, key_count, split_array

# a JSON string that PostgreSQL's jsonb refuses
_NUL_ESCAPE = b"\\u0000"
# the deepest nesting stored, the message object itself being level 1 (orjson's own limit)
MAX_DEPTH = 1024
_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])
# where compact JSON has one element end and the next begin (or, inside one, a nested one)
_BOUNDARY = b"},{"
_LEADING_WHITESPACE = re.compile(rb"[ \t\n\r]*")
# the start of an object up to its first key, a short and plain one: {"ident":
_FIRST_KEY = re.compile(rb'\{"[^"\\]{1,64}":')
# pieces of a body split as it arrives: the first small, so that PostgreSQL starts at once
FIRST_PIECE = 16 * 1024
PIECE = 64 * 1024
# failed cuts in a row before the splitter leaves the rest of a body to the end
_CUT_ATTEMPTS = 16


def identity_of(raw: bytes) -> bytes:
    """SHA-256 of the text as sent, cut to 16 bytes: equal for a re-sent message, else not."""
    return hashlib.sha256(raw).digest()[:16]


@dataclass(slots=True)
class Message:
    """One message that can be stored: its JSON text as sent and the parsed object."""

    raw: bytes
    data: dict[str, Any]

    @property
    def identity(self) -> bytes:
        return identity_of(self.raw)


@dataclass(slots=True)
class Rejected:
    """Content that can't be stored as a message, kept verbatim with the reason."""

    raw: bytes
    reason: str


@dataclass(slots=True)
class DecodedBatch:
    messages: list[Message] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    # the body as a whole is not a JSON array: the batch then holds one rejected body
    body_error: str | None = None

    @property
    def size(self) -> int:
        return len(self.messages) + len(self.rejected)


class NotExact(Exception):
    """The fast parse lost something (a duplicate key, a rounded number): decode carefully."""


def decode_batch(body: bytes) -> DecodedBatch:
    """Split a request body into storable messages and rejected content."""
    elements = split_elements(body)
    if elements is not None:
        try:
            return DecodedBatch(messages=list(exact_messages(elements)))
        except NotExact:
            pass
    return _decode_careful(body)


def split_elements(body: bytes) -> list[msgspec.Raw] | None:
    """The fast split: the text of each element of the array, or None if it is not one.

    msgspec checks the JSON syntax without building objects, so this costs a fraction of a
    full parse; each element is then parsed on its own, as late as possible.
    """
    try:
        return _ELEMENTS.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None


class ElementSplitter:
    """The fast split of a body that is still arriving: whole elements as soon as they are in.

    The array is cut into pieces of about PIECE bytes, each just after the `}` of a `},{`.
    Such a cut may fall inside a string or a nested array (a list of objects in a message),
    but then the piece is not valid JSON and the next `},{` is tried: a piece that decodes
    holds whole elements. Raises NotExact, maybe after some elements, for a body that is not
    a JSON array.
    """

    def __init__(self) -> None:
        self._rest = bytearray()  # what arrived after the last whole element
        self._opened = False  # the array's "[" has been seen
        self._boundary = _BOUNDARY
        self._pieces = 0
        self._failed_cuts = 0  # in a row: bounded, so that the cost stays linear

    def feed(self, data: bytes) -> Iterator[msgspec.Raw]:
        """The elements completed by `data`, a piece at a time."""
        self._rest += data
        if not self._opened and not self._open():
            return
        start = 0
        try:
            while (piece := self._next_piece(start)) is not None:
                elements, start = piece
                yield from elements
        finally:
            del self._rest[:start]

    def finish(self) -> list[msgspec.Raw]:
        """The elements after the last cut; the body has ended."""
        elements = split_elements(b"[" + self._rest) if self._opened else None
        if elements is None:
            raise NotExact
        return elements

    def _next_piece(self, start: int) -> tuple[list[msgspec.Raw], int] | None:
        """The whole elements from `start` to the next good cut, and where the next piece
        starts; None: wait for more of the body."""
        cut = start + (PIECE if self._pieces else FIRST_PIECE)
        while self._failed_cuts < _CUT_ATTEMPTS:
            cut = self._find_cut(cut)
            if cut == -1:
                return None
            with memoryview(self._rest) as rest:
                piece = b"".join((b"[", rest[start : cut + 1], b"]"))
            try:
                elements = _ELEMENTS.decode(piece)
            except (msgspec.DecodeError, RecursionError):
                self._failed_cuts += 1
                cut += len(_BOUNDARY)
                continue
            self._failed_cuts = 0
            self._pieces += 1
            return elements, cut + 2
        return None  # cut inside elements again and again: the rest is split whole at the end

    def _find_cut(self, after: int) -> int:
        """Where the `}` of the next `},{` after `after` is. Messages of one stream mostly
        begin with the same key and nested objects seldom do: a `},{` followed by the first
        message's first key is tried first, as it is most likely between two messages."""
        if self._boundary != _BOUNDARY:
            cut = self._rest.find(self._boundary, after, after + PIECE)
            if cut != -1:
                return cut
        return self._rest.find(_BOUNDARY, after)

    def _open(self) -> bool:
        start = _LEADING_WHITESPACE.match(self._rest).end()  # type: ignore[union-attr]
        if start == len(self._rest):
            return False  # only whitespace so far
        if self._rest[start] != ord("["):
            raise NotExact
        del self._rest[: start + 1]
        self._opened = True
        first_key = _FIRST_KEY.match(self._rest)
        if first_key:
            self._boundary = b"}," + first_key.group()
        return True


def exact_messages(elements: Iterable[msgspec.Raw]) -> Iterator[Message]:
    """Each element as a message, each judged on its own (see judge_element).

    Raises NotExact at the first element that must be quarantined. Lazy, so that the first
    messages can be on their way to PostgreSQL while later ones are checked.
    """
    for element in elements:
        # comparing bytes to bytes is much faster than to a memoryview
        verdict = judge_element(bytes(element))
        if isinstance(verdict, Rejected):
            raise NotExact
        yield verdict


def judge_element(raw: bytes) -> Message | Rejected:
    """One element of a batch as a message, or why it can't be one.

    orjson proves it valid JSON (no NaN, no number beyond a double, no lone surrogate, valid
    UTF-8, nesting up to MAX_DEPTH) and an object. Re-encoding it and comparing with the text
    sent proves, in C, that no duplicate key was lost; text spelled otherwise (whitespace,
    escapes, other number spellings) has its keys counted instead, and only nesting too deep
    for that is read by the slower scanner. PostgreSQL refuses \\u0000, so that is refused too.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected(raw, _why_invalid(raw, exc))
    if type(data) is not dict:
        return Rejected(raw, f"not a JSON object but {_json_type(data)}")
    try:
        canonical: bytes | None = orjson.dumps(data)
    except TypeError:
        canonical = None  # nested deeper than orjson writes
    if canonical != raw:
        duplicate = _duplicate_key(raw, canonical)
        if duplicate is not None:
            return Rejected(raw, f"duplicate key {duplicate!r}")
    if _NUL_ESCAPE in raw and _contains_nul(data):
        return Rejected(raw, "a string or key contains \\u0000, which PostgreSQL cannot store")
    return Message(raw, data)


def _duplicate_key(raw: bytes, canonical: bytes | None) -> str | None:
    """A key `raw` holds twice in one object; `canonical` is its parse re-encoded."""
    if canonical is not None:
        try:
            compact = msgspec.json.format(raw, indent=-1)  # whitespace gone, the rest as sent
        except RecursionError:
            compact = None
        if compact is not None:
            keys = key_count(compact)
            if keys is not None and keys == key_count(canonical):
                return None  # every key that was sent survived the parse
    return duplicate_key(raw)


def _why_invalid(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    if not raw:
        return "empty array element"
    if str(exc).startswith("depth limit exceeded"):
        return f"nesting deeper than {MAX_DEPTH} levels"
    return f"not valid JSON: {exc}"


def _decode_careful(body: bytes) -> DecodedBatch:
    elements = split_array(body)
    if isinstance(elements, str):
        return DecodedBatch(rejected=[Rejected(body, elements)], body_error=elements)
    batch = DecodedBatch()
    for raw in elements:
        verdict = judge_element(raw)
        if isinstance(verdict, Rejected):
            batch.rejected.append(verdict)
        else:
            batch.messages.append(verdict)
    return batch


def _contains_nul(value: Any) -> bool:
    # a stack, not recursion: nesting as deep as MAX_DEPTH must not exhaust Python's
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) is str:
            if "\x00" in item:
                return True
        elif type(item) is dict:
            if any("\x00" in key for key in item):
                return True
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)
    return False


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
