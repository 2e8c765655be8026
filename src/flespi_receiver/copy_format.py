"""Rows of `messages` in PostgreSQL's binary COPY format, in small chunks.

asyncpg's own COPY encoder sends its first bytes only after half a megabyte of rows; encoding
here lets PostgreSQL start on the first rows of a batch while later ones are still being
checked and encoded, which is most of the gain of the optimistic path. element_chunks judges
a batch's elements (messages.judge_element) in the same loop as it encodes them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import msgspec

from flespi_receiver.fields import POSTGRES_EPOCH, MessageFields, postgres_usecs
from flespi_receiver.identity_set import Distinct
from flespi_receiver.messages import (
    MAX_REJECTED_ELEMENTS,
    Message,
    Rejected,
    _derive_columns,  # exact_messages' own step: both ways derive the columns alike
    judge_element,
)
from flespi_receiver.splitter import NotExact

if TYPE_CHECKING:
    from flespi_receiver.device_state import DeviceFold

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
CHUNK_SIZE = 64 * 1024
FIRST_CHUNK_SIZE = 8 * 1024

_FIELD_COUNT = struct.pack(">h", 11)
REJECTED_COLUMNS = ("stream", "raw", "reason", "raw_hash")
_REJECTED_FIELD_COUNT = struct.pack(">h", len(REJECTED_COLUMNS))
_NULL = struct.pack(">i", -1)
_LENGTH = struct.Struct(">i")
_INT8 = struct.Struct(">iq")
_FLOAT8 = struct.Struct(">id")
_JSONB_HEADER = struct.Struct(">ib")  # length, then the jsonb format version 1
_HASH_LENGTH = _LENGTH.pack(16)
# ts, server_ts, channel_id, device_id, latitude, longitude: each a length and a value
_FIXED_COLUMNS = struct.Struct(">iqiqiqiqidid")
# the same, then the payload's length and jsonb format version: a usual row's middle in one pack
_FIXED_COLUMNS_JSONB = struct.Struct(">iqiqiqiqididib")
# message_hash (16 bytes) and partition_ts, each a length and a value
_AFTER_PAYLOAD = struct.Struct(">i16siq")


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    encoded = value.encode()
    return _LENGTH.pack(len(encoded)) + encoded


def _timestamp(seconds: float | None) -> bytes:
    return _NULL if seconds is None else _INT8.pack(8, postgres_usecs(seconds))


def _bigint(value: int | None) -> bytes:
    return _NULL if value is None else _INT8.pack(8, value)


def _float(value: float | None) -> bytes:
    return _NULL if value is None else _FLOAT8.pack(8, value)


def encode_row(head: bytes, message: Message, identity: bytes) -> bytes:
    """One row, in the order of MESSAGE_COLUMNS: `head` (row_head(): the field count and the
    stream), derived columns, payload, `identity`, partition time."""
    ident, ts, server_ts, channel_id, device_id, latitude, longitude, partition_ts = message.columns
    raw = message.raw
    if (
        ident is None
        or ts is None
        or server_ts is None
        or channel_id is None
        or device_id is None
        or latitude is None
        or longitude is None
    ):
        before, after = _around_payload(head, message, identity)
        return b"".join((before, raw, after))
    # the usual message has every column: the same bytes in three packs instead of a dozen;
    # postgres_usecs() written out, its call costing a third of it
    ts_usecs = round((ts - POSTGRES_EPOCH) * 1_000_000)
    partition_usecs = (
        ts_usecs if partition_ts is ts else round((partition_ts - POSTGRES_EPOCH) * 1_000_000)
    )
    encoded_ident = ident.encode()
    return b"".join(
        (
            head,
            _LENGTH.pack(len(encoded_ident)),
            encoded_ident,
            _FIXED_COLUMNS_JSONB.pack(
                8,
                ts_usecs,
                8,
                round((server_ts - POSTGRES_EPOCH) * 1_000_000),
                8,
                channel_id,
                8,
                device_id,
                8,
                latitude,
                8,
                longitude,
                len(raw) + 1,
                1,
            ),
            raw,
            _AFTER_PAYLOAD.pack(16, identity, 8, partition_usecs),
        )
    )


def _around_payload(head: bytes, message: Message, identity: bytes) -> tuple[bytes, bytes]:
    """A row's bytes before and after its payload's text; `head`: row_head()."""
    ident, ts, server_ts, channel_id, device_id, latitude, longitude, partition_ts = message.columns
    if None in (ts, server_ts, channel_id, device_id, latitude, longitude):
        fixed = b"".join(
            (
                _timestamp(ts),
                _timestamp(server_ts),
                _bigint(channel_id),
                _bigint(device_id),
                _float(latitude),
                _float(longitude),
            )
        )
    else:
        # the usual message has them all: one pack instead of six
        fixed = _FIXED_COLUMNS.pack(
            8,
            postgres_usecs(ts),
            8,
            postgres_usecs(server_ts),
            8,
            channel_id,
            8,
            device_id,
            8,
            latitude,
            8,
            longitude,
        )
    before = b"".join(
        (
            head,
            _text(ident),
            fixed,
            _JSONB_HEADER.pack(len(message.raw) + 1, 1),
        )
    )
    after = b"".join((_HASH_LENGTH, identity, _INT8.pack(8, postgres_usecs(partition_ts))))
    return before, after


def stream_field(stream: str) -> bytes:
    """The stream column of every row of a batch, encoded once."""
    return _text(stream)


def row_head(stream_field: bytes) -> bytes:
    """What every row of a batch starts with: the field count, then the stream column."""
    return _FIELD_COUNT + stream_field


def row_chunks(
    stream_field: bytes,
    messages: Iterable[Message],
    fold: DeviceFold | None = None,
    distinct: Distinct | None = None,
) -> Iterator[bytes | memoryview]:
    """Rows for `messages` (no header or trailer), in chunks of about CHUNK_SIZE bytes; the
    first is smaller, so that PostgreSQL starts on the first rows at once. A payload larger
    than a chunk is sent in slices of itself, never copied into a row. With `distinct`, a
    message whose identity an earlier one had is left out and counted there."""
    return element_chunks(stream_field, messages, None, None, fold, distinct)


def element_chunks(
    stream_field: bytes,
    elements: Iterable[msgspec.Raw | bytes | Message | Rejected],
    fields: MessageFields | None,
    rejected: list[Rejected] | None,
    fold: DeviceFold | None = None,
    distinct: Distinct | None = None,
) -> Iterator[bytes | memoryview]:
    """row_chunks(stream_field, exact_messages(elements, fields, rejected), fold, distinct)
    in one loop: the same bytes, verdicts and exceptions, without a generator between judging
    and encoding (half a microsecond a message). `fields` None: the elements are messages
    with their columns already (row_chunks)."""
    head = row_head(stream_field)
    large_names = fields.large_names if fields is not None else None
    # the identities seen, while Distinct holds them in a set; then its own first()
    seen = distinct.identities if distinct is not None else None
    parts: list[bytes] = []
    size = 0
    limit = FIRST_CHUNK_SIZE
    for element in elements:
        # as in exact_messages: the usual element is bytes, tested first
        if type(element) is bytes:
            message = judge_element(element, large_names)
        elif isinstance(element, Message | Rejected):
            message = element
        else:
            message = judge_element(bytes(element), large_names)
        if type(message) is not Message:
            assert isinstance(message, Rejected)
            if rejected is None:
                raise NotExact
            rejected.append(message)
            if len(rejected) > MAX_REJECTED_ELEMENTS:
                raise NotExact  # the body is kept whole: `rejected` says so by its length
            continue
        if fields is not None:
            _derive_columns(message, fields)
        identity = message.identity
        if distinct is not None:
            if seen is not None and len(seen) < Distinct.SMALL:
                # Distinct.first() written out: no conversion to an IdentitySet is due
                if identity in seen:
                    distinct.repeated += 1
                    continue
                seen.add(identity)
            elif not distinct.first(identity):
                continue
            else:
                seen = distinct.identities
        if fold is not None:
            fold.add(message, message.columns, identity)
        raw = message.raw
        if len(raw) > CHUNK_SIZE:
            before, after = _around_payload(head, message, identity)
            parts.append(before)
            yield b"".join(parts)
            yield from _slices(raw)
            parts, size, limit = [after], len(after), CHUNK_SIZE
            continue
        row = encode_row(head, message, identity)
        parts.append(row)
        size += len(row)
        if size >= limit:
            yield b"".join(parts)
            parts, size, limit = [], 0, CHUNK_SIZE
    if parts:
        yield b"".join(parts)


def _slices(text: bytes) -> Iterator[memoryview]:
    """`text` in CHUNK_SIZE slices of itself, not copied."""
    view = memoryview(text)
    for start in range(0, len(view), CHUNK_SIZE):
        yield view[start : start + CHUNK_SIZE]


def rejected_chunks(
    stream: str, raw: bytes, reason: str, identity: bytes
) -> Iterator[bytes | memoryview]:
    """The COPY data of one row of rejected_messages (REJECTED_COLUMNS), the content in slices
    of itself: a large refused body is sent on, never copied whole."""
    yield HEADER + _REJECTED_FIELD_COUNT + stream_field(stream) + _LENGTH.pack(len(raw))
    yield from _slices(raw)
    yield b"".join((_text(reason), _HASH_LENGTH, identity, TRAILER))


def copy_chunks(
    stream: str,
    messages: Iterable[msgspec.Raw | bytes | Message | Rejected],
    fold: DeviceFold | None = None,
    distinct: Distinct | None = None,
    *,
    fields: MessageFields | None = None,
    rejected: list[Rejected] | None = None,
) -> Iterator[bytes | memoryview]:
    """The whole COPY data for `messages`: header, rows in chunks, trailer. With `fields`,
    `messages` are a batch's elements, judged as they are encoded (element_chunks)."""
    yield HEADER
    yield from element_chunks(stream_field(stream), messages, fields, rejected, fold, distinct)
    yield TRAILER
