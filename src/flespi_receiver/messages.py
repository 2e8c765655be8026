"""Decoding a batch body into messages that can be stored and messages that must be quarantined.

A batch is decoded on one of two paths. The fast path parses the whole body with orjson and
proves, by re-encoding it byte for byte, that nothing was lost (no duplicate keys, no numbers
rounded). Anything else takes the careful path, which splits the array into the exact text of
each element and judges every element on its own, so one odd message never sinks the batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

# a JSON string that PostgreSQL's jsonb refuses
_NUL_ESCAPE = b"\\u0000"
# the tokens that matter for finding element boundaries: strings (skipped whole) and brackets
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|"|[\[\]{},]', re.DOTALL)
_WHITESPACE = " \t\n\r"
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
    """Each element as a message, proving on the way that parsing it lost nothing.

    Re-encoding an element must give the very bytes that were sent (so it has no duplicate key
    and no number that a float would round); raises NotExact otherwise, and for anything that
    is not an object or holds \\u0000. Lazy, so that the first messages can be on their way
    to PostgreSQL while later ones are checked.
    """
    for element in elements:
        text = bytes(element)  # comparing bytes to bytes is much faster than to a memoryview
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise NotExact from None
        if type(data) is not dict:
            raise NotExact
        raw = orjson.dumps(data)
        if raw != text or _NUL_ESCAPE in raw:
            raise NotExact
        yield Message(raw, data)


def _decode_careful(body: bytes) -> DecodedBatch:
    # surrogateescape keeps undecodable bytes so each element can be judged on its own
    text = body.decode("utf-8", errors="surrogateescape")
    elements = split_array(text)
    if isinstance(elements, str):
        return DecodedBatch(rejected=[Rejected(body, elements)], body_error=elements)
    batch = DecodedBatch()
    for element in elements:
        raw = element.encode("utf-8", errors="surrogateescape")
        data, reason = _judge_element(raw)
        if data is None:
            batch.rejected.append(Rejected(raw, reason))
        else:
            batch.messages.append(Message(raw, data))
    return batch


def split_array(text: str) -> list[str] | str:
    """The exact text of each top-level element of a JSON array, or why it is not one."""
    start = len(text) - len(text.lstrip(_WHITESPACE))
    if not text[start:].startswith("["):
        return "body is not a JSON array" if text.strip(_WHITESPACE) else "body is empty"
    elements: list[str] = []
    depth = 0
    element_start = start + 1
    for token in _TOKEN.finditer(text, start):
        kind = token.group()
        if kind in "[{":
            depth += 1
        elif kind in "]}":
            depth -= 1
            if depth == 0:
                _append_element(elements, text[element_start : token.start()], closing=True)
                if text[token.end() :].strip(_WHITESPACE):
                    return "body has content after the closing ] of the array"
                return elements
            if depth < 0:
                break
        elif kind == "," and depth == 1:
            _append_element(elements, text[element_start : token.start()], closing=False)
            element_start = token.end()
        elif kind == '"':
            break  # a string that never ends
    return "body is not valid JSON (unbalanced brackets or an unterminated string)"


def _append_element(elements: list[str], element: str, *, closing: bool) -> None:
    stripped = element.strip(_WHITESPACE)
    # "[]" has no element; "[1,]" ends with an empty one, which is kept and rejected
    if stripped or not closing or elements:
        elements.append(stripped)


def _judge_element(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    if not raw:
        return None, "empty array element"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc}"
    if type(data) is not dict:
        return None, f"not a JSON object but {_json_type(data)}"
    try:
        json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as exc:
        return None, f"duplicate key {exc.args[0]!r}"
    except (ValueError, RecursionError) as exc:
        return None, f"not valid JSON: {exc}"
    if _NUL_ESCAPE in raw and _contains_nul(data):
        return None, "a string or key contains \\u0000, which PostgreSQL cannot store"
    return data, ""


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_contains_nul(v) for v in value)
    return False


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
