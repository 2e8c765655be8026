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
from flespi_receiver.messages import Message

if TYPE_CHECKING:
    from flespi_receiver.device_state import DeviceFold

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
CHUNK_SIZE = 64 * 1024
FIRST_CHUNK_SIZE = 8 * 1024

_FIELD_COUNT = struct.pack(">h", 11)
_NULL = struct.pack(">i", -1)
_LENGTH = struct.Struct(">i")
_INT8 = struct.Struct(">iq")
_FLOAT8 = struct.Struct(">id")
_JSONB_HEADER = struct.Struct(">ib")  # length, then the jsonb format version 1
_HASH_LENGTH = _LENGTH.pack(16)
# ts, server_ts, channel_id, device_id, latitude, longitude: each a length and a value
_FIXED_COLUMNS = struct.Struct(">iqiqiqiqidid")


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
    raw = message.raw
    return b"".join(
        (
            _FIELD_COUNT,
            stream_field,
            _text(ident),
            fixed,
            _JSONB_HEADER.pack(len(raw) + 1, 1),
            raw,
            _HASH_LENGTH,
            message.identity,
            _INT8.pack(8, postgres_usecs(partition_ts)),
        )
    )


def stream_field(stream: str) -> bytes:
    """The stream column of every row of a batch, encoded once."""
    return _text(stream)


def row_chunks(
    stream_field: bytes, messages: Iterable[Message], fold: DeviceFold | None = None
) -> Iterator[bytes]:
    """Rows for `messages` (no header or trailer), in chunks of about CHUNK_SIZE bytes; the
    first is smaller, so that PostgreSQL starts on the first rows at once."""
    parts: list[bytes] = []
    size = 0
    limit = FIRST_CHUNK_SIZE
    for message in messages:
        row = encode_row(stream_field, message)
        if fold is not None:
            fold.add(message, message.columns, message.identity)
        parts.append(row)
        size += len(row)
        if size >= limit:
            yield b"".join(parts)
            parts, size, limit = [], 0, CHUNK_SIZE
    if parts:
        yield b"".join(parts)


def copy_chunks(
    stream: str, messages: Iterable[Message], fold: DeviceFold | None = None
) -> Iterator[bytes]:
    """The whole COPY data for `messages`: header, rows in chunks, trailer."""
    yield HEADER
    yield from row_chunks(stream_field(stream), messages, fold)
    yield TRAILER
