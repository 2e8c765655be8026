"""Rows of `messages` in PostgreSQL's binary COPY format, in small chunks.

asyncpg's own COPY encoder sends its first bytes only after half a megabyte of rows; encoding
here lets PostgreSQL start on the first rows of a batch while later ones are still being
checked and encoded, which is most of the gain of the optimistic path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from flespi_receiver.fields import postgres_usecs
from flespi_receiver.identity_set import IdentitySet
from flespi_receiver.messages import Message

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


def encode_row(stream_field: bytes, message: Message) -> bytes:
    """One row, in the order of MESSAGE_COLUMNS: stream, derived columns, payload, identity,
    partition time."""
    ident, ts, server_ts, channel_id, device_id, latitude, longitude, partition_ts = message.columns
    raw = message.raw
    if ident is None or None in (ts, server_ts, channel_id, device_id, latitude, longitude):
        before, after = _around_payload(stream_field, message)
        return b"".join((before, raw, after))
    # the usual message has every column: the same bytes in three packs instead of a dozen
    ts_usecs = postgres_usecs(ts)
    partition_usecs = ts_usecs if partition_ts == ts else postgres_usecs(partition_ts)
    encoded_ident = ident.encode()
    return b"".join(
        (
            _FIELD_COUNT,
            stream_field,
            _LENGTH.pack(len(encoded_ident)),
            encoded_ident,
            _FIXED_COLUMNS_JSONB.pack(
                8,
                ts_usecs,
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
                len(raw) + 1,
                1,
            ),
            raw,
            _AFTER_PAYLOAD.pack(16, message.identity, 8, partition_usecs),
        )
    )


def _around_payload(stream_field: bytes, message: Message) -> tuple[bytes, bytes]:
    """A row's bytes before and after its payload's text."""
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
            _FIELD_COUNT,
            stream_field,
            _text(ident),
            fixed,
            _JSONB_HEADER.pack(len(message.raw) + 1, 1),
        )
    )
    after = b"".join((_HASH_LENGTH, message.identity, _INT8.pack(8, postgres_usecs(partition_ts))))
    return before, after


def stream_field(stream: str) -> bytes:
    """The stream column of every row of a batch, encoded once."""
    return _text(stream)


class Distinct:
    """The identities of the rows a batch's COPY holds so far: a copy of a message within the
    batch is counted in `repeated`, not sent (it would fail the COPY on the unique key).

    A set up to SMALL identities (the fastest), then an IdentitySet: about 37 bytes an
    identity instead of 85, which a body of very many tiny messages needs to stay within a
    few times its size."""

    SMALL = 4096

    def __init__(self) -> None:
        self.identities: set[bytes] | None = set()
        self.compact: IdentitySet | None = None
        self.repeated = 0

    def first(self, identity: bytes) -> bool:
        """Whether this is the first message of the batch with this identity."""
        identities = self.identities
        if identities is not None:
            if identity in identities:
                self.repeated += 1
                return False
            identities.add(identity)
            if len(identities) > self.SMALL:
                self.compact, self.identities = IdentitySet(identities), None
            return True
        assert self.compact is not None
        if self.compact.add(identity):
            return True
        self.repeated += 1
        return False


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
    parts: list[bytes] = []
    size = 0
    limit = FIRST_CHUNK_SIZE
    for message in messages:
        identity = message.identity
        if distinct is not None and not distinct.first(identity):
            continue
        if fold is not None:
            fold.add(message, message.columns, identity)
        if len(message.raw) > CHUNK_SIZE:
            before, after = _around_payload(stream_field, message)
            parts.append(before)
            yield b"".join(parts)
            yield from _slices(message.raw)
            parts, size, limit = [after], len(after), CHUNK_SIZE
            continue
        row = encode_row(stream_field, message)
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
    messages: Iterable[Message],
    fold: DeviceFold | None = None,
    distinct: Distinct | None = None,
) -> Iterator[bytes | memoryview]:
    """The whole COPY data for `messages`: header, rows in chunks, trailer."""
    yield HEADER
    yield from row_chunks(stream_field(stream), messages, fold, distinct)
    yield TRAILER
