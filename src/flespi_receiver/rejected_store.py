"""Keeping content aside in `rejected_messages`, once per (stream, raw), in the batch's
transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import asyncpg

from flespi_receiver.copy_format import REJECTED_COLUMNS, rejected_chunks
from flespi_receiver.copy_in import Connection, as_async
from flespi_receiver.large_element import LARGE_ELEMENT
from flespi_receiver.messages import Rejected, identity_of

INSERT_REJECTED = """
INSERT INTO rejected_messages (stream, raw, reason, raw_hash)
SELECT $1, * FROM unnest($2::bytea[], $3::text[], $4::bytea[])
ON CONFLICT (stream, raw_hash) DO NOTHING
"""

# The same, run by a small batch's one statement beside its INSERT (small_batch_statement)
INSERT_REJECTED_ALSO = """
INSERT INTO rejected_messages (stream, raw, reason, raw_hash)
SELECT $1, * FROM unnest($12::bytea[], $13::text[], $14::bytea[])
ON CONFLICT (stream, raw_hash) DO NOTHING
"""

QUARANTINED = """
SELECT raw_hash FROM rejected_messages WHERE stream = $1 AND raw_hash = ANY($2::bytea[])
"""


async def quarantined(conn: Connection, stream: str, raws: list[bytes]) -> set[bytes]:
    """Identities of those of `raws` the stream's rejected_messages holds already."""
    hashes = [identity_of(raw) for raw in raws]
    found = await conn.fetch(QUARANTINED, stream, hashes)
    return {row[0] for row in found}


def rejected_arrays(rejected: Iterable[Rejected]) -> list[list[Any]]:
    """INSERT_REJECTED's arrays: raw, reason, raw_hash."""
    items = list(rejected)
    return [
        [item.raw for item in items],
        [item.reason for item in items],
        [identity_of(item.raw) for item in items],
    ]


async def store_rejected(conn: Connection, stream: str, rejected: Iterable[Rejected]) -> None:
    """Keep content aside in rejected_messages, once per (stream, raw); in the caller's
    transaction."""
    items = []
    for item in rejected:
        if len(item.raw) > LARGE_ELEMENT:
            await _store_large_rejected(conn, stream, item)
        else:
            items.append(item)
    if items:
        await conn.execute(INSERT_REJECTED, stream, *rejected_arrays(items))


async def _store_large_rejected(conn: Connection, stream: str, item: Rejected) -> None:
    """Keep one large piece of content aside by COPY, which sends it in slices: as a query
    parameter it would be copied whole, twice, into the receiver's memory."""
    identity = identity_of(item.raw)
    if await quarantined(conn, stream, [item.raw]):
        return
    chunks = rejected_chunks(stream, item.raw, item.reason, identity)
    try:
        # in a savepoint: another receiver may keep the same content at the same time
        async with conn.transaction():
            await conn.copy_to_table(
                "rejected_messages",
                source=cast(AsyncIterator[bytes], as_async(chunks)),
                columns=REJECTED_COLUMNS,
                format="binary",
            )
    except asyncpg.UniqueViolationError:
        pass  # kept by the other one: once per (stream, raw) either way
