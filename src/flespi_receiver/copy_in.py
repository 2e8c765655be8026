"""COPY into `messages`, and which messages a stream holds already: what every way of storing a
batch shares (store.py, resent.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any, TypeVar, cast

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from flespi_receiver.errors import BodyError, drop_frames
from flespi_receiver.failures import state_kind
from flespi_receiver.fields import MESSAGE_COLUMNS, as_datetime
from flespi_receiver.messages import Message
from flespi_receiver.splitter import NotExact

# a plain connection or one borrowed from the pool
Connection = asyncpg.Connection | PoolConnectionProxy

# Which of these messages does the stream already hold?
EXISTING_MESSAGES = """
SELECT m.message_hash
FROM unnest($2::timestamptz[], $3::bytea[]) AS k(partition_ts, message_hash)
JOIN messages m
  ON m.stream = $1 AND m.partition_ts = k.partition_ts AND m.message_hash = k.message_hash
"""

# The careful insert: skips what another receiver committed meanwhile, and says what it stored.
INSERT_MESSAGES = """
INSERT INTO messages (stream, ident, ts, server_ts, channel_id, device_id, latitude, longitude,
                      partition_ts, payload, message_hash)
SELECT $1, * FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[], $5::bigint[],
                         $6::bigint[], $7::float8[], $8::float8[], $9::timestamptz[],
                         $10::jsonb[], $11::bytea[])
ON CONFLICT (stream, partition_ts, message_hash) DO NOTHING
RETURNING id
"""

_T = TypeVar("_T")


async def existing(conn: Connection, stream: str, messages: Iterable[Message]) -> set[bytes]:
    """The identities of those of `messages` the stream holds already."""
    times: list[Any] = []
    identities: list[bytes] = []
    for message in messages:
        times.append(as_datetime(message.columns[-1]))
        identities.append(message.identity)
    found = await conn.fetch(EXISTING_MESSAGES, stream, times, identities)
    return {row[0] for row in found}


def insert_record(stream: str, message: Message) -> tuple[Any, ...]:
    """The row as INSERT_MESSAGES takes it (times as exact datetimes, like the COPY rows)."""
    ident, ts, server_ts, channel_id, device_id, latitude, longitude, partition_ts = message.columns
    return (
        stream,
        ident,
        as_datetime(ts),
        as_datetime(server_ts),
        channel_id,
        device_id,
        latitude,
        longitude,
        as_datetime(partition_ts),
        message.raw.decode(),
        message.identity,
    )


async def insert_skipping_conflicts(conn: Connection, records: list[tuple[Any, ...]]) -> list[int]:
    """One statement; atomic on its own, or part of the caller's transaction. The ids stored."""
    stream = records[0][0]
    arrays = [list(column) for column in zip(*records, strict=True)][1:]
    return [row[0] for row in await conn.fetch(INSERT_MESSAGES, stream, *arrays)]


async def copy_rows(
    conn: Connection, copy_data: AsyncIterator[bytes | memoryview], limit: float | None = None
) -> int:
    """COPY into messages; returns the number of rows stored, from PostgreSQL's "COPY n".

    `limit`: seconds for the whole COPY, source included; None: the connection's default.
    """
    # asyncpg takes any buffer, not only bytes: it copies each chunk into a CopyData message
    source = cast(AsyncIterator[bytes], copy_data)
    status = await conn.copy_to_table(
        "messages", source=source, columns=MESSAGE_COLUMNS, format="binary", timeout=limit
    )
    return row_count(status)


def row_count(status: str) -> int:
    """The rows a command's status tag counts ("COPY 5", "UPDATE 3", "INSERT 0 7")."""
    return int(status.rsplit(" ", 1)[1])


async def ended_on_body_error(
    source: AsyncIterator[bytes | memoryview], stopped: list[BodyError]
) -> AsyncIterator[bytes | memoryview]:
    """`source`, ended early when making it meets the body's own error (a timeout, a body too
    large or broken, no room for it), which is appended to `stopped` for the caller to raise
    once the COPY has returned, in the transaction it then rolls back. Raised from the data
    itself, asyncpg would cancel the COPY and wait for the cancellation, which never comes when
    PostgreSQL already refused a row of it: the session sat idle in its transaction until
    command_timeout."""
    try:
        async for chunk in source:
            yield chunk
    except BodyError as exc:
        stopped.append(exc)


async def as_async(chunks: Iterator[bytes | memoryview]) -> AsyncIterator[bytes | memoryview]:
    for chunk in chunks:
        yield chunk


async def unless_careful(attempt: Coroutine[Any, Any, _T]) -> _T | None:
    """The attempt's result, or None when it met something only the careful path handles."""
    try:
        return await attempt
    except NotExact as exc:
        drop_frames(exc)  # what the attempt made is let go before the careful path starts
        return None
    except asyncpg.PostgresError as exc:
        # a message stored before (a re-sent batch), a message PostgreSQL refuses, or a state
        # only the careful path, message by message, tells apart from content
        if state_kind(exc) is not None:
            raise
        drop_frames(exc)
        return None
