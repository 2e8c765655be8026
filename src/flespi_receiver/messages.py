"""Decoding a batch body into messages that can be stored and messages that must be quarantined.

Every element is judged on its own (judge_element). The fast path splits the body with
msgspec and stores every element in one go, setting aside the elements that must be
quarantined (up to MAX_REJECTED_ELEMENTS); a body msgspec can't split goes the careful way:
the array is split by json_scan, so that one broken element never sinks the others, and the
good messages and the rejected content are kept apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import orjson

from flespi_receiver.fields import DEFAULT_FIELDS, MessageFields
from flespi_receiver.identity import message_identity, text_identity
from flespi_receiver.json_scan import duplicate_key, no_key_lost, split_array, why_invalid
from flespi_receiver.large_element import LARGE_ELEMENT, TooDeep, judge_large
from flespi_receiver.parameter_keys import parameter_keys
from flespi_receiver.splitter import NotExact, split_elements, without_bom

# a JSON string that PostgreSQL's jsonb refuses
_NUL_ESCAPE = b"\\u0000"
# a body with more refused elements than this is kept whole, as one rejected row: a flood of
# refused elements (10 M zeros gzip into 20 KB) then costs the body, not an object each
MAX_REJECTED_ELEMENTS = 1000
# elements judged and encoded between two turns of the event loop (about 10-30 ms of work)
TURN = 1000
_E = TypeVar("_E")


def identity_of(raw: bytes) -> bytes:
    """SHA-256 of the text as sent, cut to 16 bytes: equal for a re-sent message, else not."""
    return text_identity(raw)


@dataclass(slots=True)
class Message:
    """One message that can be stored: its JSON text as sent, the parsed object and, once
    known, its derived columns (MessageFields.columns)."""

    raw: bytes
    data: dict[str, Any]
    columns: tuple[Any, ...] = ()
    # for a stream keyed by content: computed with the columns, before the parse is let go
    content_identity: bytes | None = None
    # the hash of the text, computed once: the COPY row and the device fold both need it
    _text_identity: bytes = b""
    # merge mode: parameter_keys() of its top-level keys, known from the parse (None: not
    # computed; the fold then reads the text again)
    keys_digest: bytes | None = None

    @property
    def identity(self) -> bytes:
        """What the stream's unique key holds: the content identity when the stream is keyed
        by content, else the hash of the text as sent (identity.py)."""
        if self.content_identity is not None:
            return self.content_identity
        if not self._text_identity:
            self._text_identity = text_identity(self.raw)
        return self._text_identity


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
    # more than MAX_REJECTED_ELEMENTS elements were refused (then also kept whole): the first's
    # reason, what a stream that refuses bad content instead of quarantining it answers
    first_refusal: str | None = None
    # messages whose text an earlier element of the batch had already: counted, not kept
    repeated: int = 0

    @property
    def size(self) -> int:
        return len(self.messages) + len(self.rejected) + self.repeated


def decode_batch(body: bytes, fields: MessageFields = DEFAULT_FIELDS) -> DecodedBatch:
    """Split a request body into storable messages (with their columns) and rejected content."""
    elements = split_elements(body)
    if elements is not None:
        try:
            return DecodedBatch(messages=list(exact_messages(elements, fields)))
        except NotExact:
            pass
    return _decode_careful(body, fields)


def exact_messages(
    elements: Iterable[msgspec.Raw | bytes | Message | Rejected],
    fields: MessageFields = DEFAULT_FIELDS,
    rejected: list[Rejected] | None = None,
) -> Iterator[Message]:
    """Each element as a message, each judged on its own (see judge_element).

    An element that must be quarantined is appended to `rejected` and left out; raises
    NotExact at the first one when `rejected` is None, and at the one after
    MAX_REJECTED_ELEMENTS, which is appended too (such a body is kept whole). Lazy, so that the
    first messages can be on their way to PostgreSQL while later ones are checked.
    """
    for element in elements:
        # comparing bytes to bytes is much faster than to a memoryview
        if type(element) is bytes:  # the usual element, first: isinstance() costs more
            verdict = judge_element(element, fields.large_names)
        elif isinstance(element, Message | Rejected):
            verdict = element  # judged already (judged_large_apart)
        else:
            verdict = judge_element(bytes(element), fields.large_names)
        if isinstance(verdict, Rejected):
            if rejected is None:
                raise NotExact
            rejected.append(verdict)
            if len(rejected) > MAX_REJECTED_ELEMENTS:
                raise NotExact  # the body is kept whole: `rejected` says so by its length
            continue
        _derive_columns(verdict, fields)
        yield verdict


async def judged_large_apart(
    elements: Iterable[bytes], fields: MessageFields
) -> list[bytes | Message | Rejected]:
    """`elements`, those larger than LARGE_ELEMENT judged in a thread (judge_element): their
    judging takes seconds (parsed whole in a stream keyed by content), during which the other
    requests are answered."""
    judged: list[bytes | Message | Rejected] = []
    for element in elements:
        if len(element) > LARGE_ELEMENT:
            judged.append(await asyncio.to_thread(judge_element, element, fields.large_names))
        else:
            judged.append(element)
    return judged


async def in_turns(elements: list[_E], size: int = TURN) -> AsyncIterator[list[_E]]:
    """`elements`, `size` at a time, the other requests answered between: judging and encoding
    a piece's thousands of tiny messages takes seconds, which must not stall every stream."""
    for start in range(0, len(elements), size):
        if start:
            await asyncio.sleep(0)
        yield elements[start : start + size]


def _derive_columns(message: Message, fields: MessageFields) -> None:
    """The message's columns; its parsed object is let go then, as nothing needs it any more:
    a batch kept whole (the careful path) holds its texts, not their far larger parses."""
    message.columns = fields.columns(message.data, message.raw)
    if fields.content_identity:
        message.content_identity = message_identity(message.data, message.raw)
    # a large element's `data` may hold its known keys only (judge_large)
    if fields.keep_keys and len(message.raw) <= LARGE_ELEMENT:
        message.keys_digest = parameter_keys(tuple(message.data))
    message.data = {}


def judge_element(raw: bytes, known: Collection[str] | None = None) -> Message | Rejected:
    """One element of a batch as a message, or why it can't be one.

    An element larger than LARGE_ELEMENT is judged without being parsed whole when `known`,
    the names of the top-level keys its columns come from, is given (large_element.py): the
    message's `data` then holds those keys only.

    orjson proves it valid JSON (no NaN, no number beyond a double, no lone surrogate, valid
    UTF-8, nesting up to MAX_DEPTH) and an object. Re-encoding it and comparing with the text
    sent proves, in C, that no duplicate key was lost; text spelled otherwise (whitespace,
    escapes, other number spellings) has its colons counted instead, and only what that
    cannot prove (nesting too deep to re-encode, a colon or digit written as \\u003X) is
    read by the slower scanner. PostgreSQL refuses \\u0000, so that is refused too.
    """
    if known is not None and len(raw) > LARGE_ELEMENT:
        try:
            verdict = judge_large(raw, known)
        except TooDeep:
            pass
        else:
            return Rejected(raw, verdict) if isinstance(verdict, str) else Message(raw, verdict)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejected(raw, why_invalid(raw, exc))
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
    # a backslash first: one memchr, a third of the time of a search for the whole escape,
    # and most texts have none
    if b"\\" in raw and _NUL_ESCAPE in raw and _contains_nul(data):
        return Rejected(raw, "a string or key contains \\u0000, which PostgreSQL cannot store")
    return Message(raw, data)


def _duplicate_key(raw: bytes, canonical: bytes | None) -> str | None:
    """A key `raw` holds twice in one object; `canonical` is its parse re-encoded.

    Text spelled otherwise (whitespace, escapes, number forms) is proven to have lost no key
    by counting colons, in C (json_scan.no_key_lost); what that cannot prove is read by the
    scanner.
    """
    if canonical is not None and no_key_lost(raw, canonical):
        return None
    return duplicate_key(raw)


def _decode_careful(body: bytes, fields: MessageFields) -> DecodedBatch:
    elements = split_array(bytes(without_bom(body)))
    if isinstance(elements, str):
        return DecodedBatch(rejected=[Rejected(body, elements)], body_error=elements)
    batch = DecodedBatch()
    stored_texts: set[bytes] = set()
    for raw in elements:
        if raw in stored_texts:  # the same message again: one object, however many copies
            batch.repeated += 1
            continue
        verdict = judge_element(raw, fields.large_names)
        if isinstance(verdict, Rejected):
            batch.rejected.append(verdict)
            if len(batch.rejected) > MAX_REJECTED_ELEMENTS:
                return kept_whole(body, batch.rejected[0].reason)
        else:
            _derive_columns(verdict, fields)
            batch.messages.append(verdict)
            stored_texts.add(raw)
    return batch


def kept_whole(body: bytes, first_reason: str) -> DecodedBatch:
    """The batch of a body with more than MAX_REJECTED_ELEMENTS refused elements: the body
    itself, as one rejected row."""
    reason = (
        f"body has more than {MAX_REJECTED_ELEMENTS} elements that are not storable messages "
        f"(the first: {first_reason}); it is kept whole"
    )
    return DecodedBatch(
        rejected=[Rejected(body, reason)], body_error=reason, first_refusal=first_reason
    )


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
