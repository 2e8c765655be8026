"""A stream switched to `identity = "content"`: its rows stored before, re-keyed in chunks.

stream_identity (schema 0009) records per stream what its message_hash is the hash of. When
the configuration asks for content and the table says text, the rows the stream holds get
their content identity (identity.py, computed from payload) a chunk at a time, each chunk
its own short transaction, newest rows first (they are the ones flespi may still re-send), so
the table is never locked for long and an interrupted run resumes where it stopped. Two rows
that turn out to be the same message (a stream subscribed to a channel and to its devices
stored both copies) become one: the first stored is kept, the later one deleted. Going back
from content to text is refused for a stream with rows: the text as sent is not kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import asyncpg
import orjson
import structlog

from flespi_receiver.copy_in import Connection
from flespi_receiver.errors import ConfigError
from flespi_receiver.identity import Identity, canonical_identity

log = structlog.get_logger("flespi_receiver.identity_upgrade")

CHUNK_ROWS = 5000

# every row stored before schema 0009 is keyed by its text
RECORD_STREAM = """
INSERT INTO stream_identity (stream, identity, finished_at) VALUES ($1, 'text', now())
ON CONFLICT (stream) DO NOTHING
"""
LOCK_STREAM = """
SELECT identity, next_id, finished_at FROM stream_identity WHERE stream = $1 FOR UPDATE
"""
NEWEST_ID = "SELECT max(id) FROM messages WHERE stream = $1"
HAS_ROWS = "SELECT EXISTS (SELECT FROM messages WHERE stream = $1)"
SWITCH = """
UPDATE stream_identity
SET identity = $2, next_id = $3, changed_at = now(),
    finished_at = CASE WHEN $3::bigint IS NULL THEN now() END
WHERE stream = $1
"""
OLDER_ROWS = """
SELECT id, partition_ts, message_hash, payload::text AS payload
FROM messages WHERE stream = $1 AND id <= $2 ORDER BY id DESC LIMIT $3
"""
# rows elsewhere in the stream that already have one of the new identities
SAME_MESSAGE = """
SELECT m.id, k.id AS upgraded_id
FROM unnest($2::bigint[], $3::timestamptz[], $4::bytea[]) AS k(id, partition_ts, message_hash)
JOIN messages m ON m.stream = $1 AND m.partition_ts = k.partition_ts
               AND m.message_hash = k.message_hash AND m.id <> k.id
"""
DELETE_ROWS = "DELETE FROM messages WHERE stream = $1 AND id = ANY($2::bigint[])"
SET_IDENTITY = """
UPDATE messages AS m SET message_hash = k.message_hash
FROM unnest($2::bigint[], $3::bytea[]) AS k(id, message_hash)
WHERE m.stream = $1 AND m.id = k.id
"""
# device_latest points at messages by their key: it follows them to their new identity (a
# pointer at a copy that is removed lands on the copy that is kept, which takes the same key)
REPOINT_STATE = """
UPDATE device_latest AS d SET message_hash = k.message_hash
FROM unnest($2::timestamptz[], $3::bytea[], $4::bytea[]) AS k(partition_ts, old_hash, message_hash)
WHERE d.stream = $1 AND d.partition_ts = k.partition_ts AND d.message_hash = k.old_hash
"""
ADVANCE = "UPDATE stream_identity SET next_id = $2 WHERE stream = $1"
FINISH = "UPDATE stream_identity SET next_id = NULL, finished_at = now() WHERE stream = $1"
PENDING = "SELECT stream FROM stream_identity WHERE finished_at IS NULL ORDER BY stream"

Progress = Callable[[str, int, int], None]  # (stream, rows looked at, ids left below)


async def streams_being_rekeyed(conn: Connection) -> list[str]:
    """The streams whose rows are not all keyed by content yet after a switch."""
    return [row[0] for row in await conn.fetch(PENDING)]


async def apply_identities(
    conn: Connection,
    identities: Mapping[str, Identity],
    *,
    chunk_rows: int = CHUNK_ROWS,
    progress: Progress | None = None,
) -> int:
    """Make every stream's rows keyed as `identities` (stream name -> identity) says; returns
    how many rows got a new identity. Raises ConfigError for a stream with rows asked to go
    back from content to text. Safe beside receivers and other runs (chunk by chunk)."""
    changed = 0
    for stream, identity in identities.items():
        if await _switch(conn, stream, identity):
            changed += await rekey_stream(conn, stream, chunk_rows=chunk_rows, progress=progress)
    return changed


async def _switch(conn: Connection, stream: str, identity: Identity) -> bool:
    """Record `identity` for the stream; True when its rows are to be re-keyed."""
    async with conn.transaction():
        await conn.execute(RECORD_STREAM, stream)
        state = await conn.fetchrow(LOCK_STREAM, stream)
        assert state is not None  # recorded just above, in this transaction
        if state["identity"] == identity:
            return identity == "content" and state["finished_at"] is None
        if identity == "text":
            if await conn.fetchval(HAS_ROWS, stream):
                raise ConfigError(
                    f'stream {stream!r} has identity = "text" but its rows are keyed by '
                    "content: the text as sent is not kept, so they can't go back; set "
                    'identity = "content" again (or store this stream under a new name)'
                )
            await conn.execute(SWITCH, stream, identity, None)
            return False
        newest = await conn.fetchval(NEWEST_ID, stream)
        await conn.execute(SWITCH, stream, identity, newest)
        log.info("stream keyed by content from now on", stream=stream, rekey_ids_up_to=newest)
        return newest is not None


async def rekey_stream(
    conn: Connection, stream: str, *, chunk_rows: int = CHUNK_ROWS, progress: Progress | None = None
) -> int:
    """Give the stream's rows up to stream_identity.next_id their content identity, one
    transaction per chunk of `chunk_rows`; returns how many rows changed."""
    changed_total = 0
    done = 0
    while True:
        try:
            async with conn.transaction():
                state = await conn.fetchrow(LOCK_STREAM, stream)
                if state is None or state["finished_at"] is not None:
                    return changed_total
                rows = await conn.fetch(OLDER_ROWS, stream, state["next_id"], chunk_rows)
                if not rows:
                    await conn.execute(FINISH, stream)
                    log.info("stream re-keyed by content", stream=stream, rows=changed_total)
                    return changed_total
                changed = await _rekey_chunk(conn, stream, rows)
                await conn.execute(ADVANCE, stream, rows[-1]["id"] - 1)
        except asyncpg.UniqueViolationError:
            continue  # a receiver stored one of these messages meanwhile: do the chunk again
        changed_total += changed
        done += len(rows)
        if progress is not None:
            progress(stream, done, rows[-1]["id"] - 1)


async def _rekey_chunk(conn: Connection, stream: str, rows: list[asyncpg.Record]) -> int:
    changed = []
    for row in rows:
        identity = canonical_identity(orjson.loads(row["payload"]))
        # None: nested too deep for a canonical form; such a row keeps the hash of its text
        if identity is not None and identity != row["message_hash"]:
            changed.append((row["id"], row["partition_ts"], identity))
    if not changed:
        return 0
    # one row per message: the first stored keeps it
    keep: dict[tuple[object, ...], int] = {}
    delete: set[int] = set()
    for row_id, partition_ts, identity in changed:
        key = (partition_ts, identity)
        first = keep.setdefault(key, row_id)
        if first != row_id:
            delete.add(max(first, row_id))
            keep[key] = min(first, row_id)
    columns = [list(c) for c in zip(*changed, strict=True)]
    for other in await conn.fetch(SAME_MESSAGE, stream, *columns):
        delete.add(max(other["id"], other["upgraded_id"]))
    if delete:
        await conn.execute(DELETE_ROWS, stream, list(delete))
        log.info("same message stored twice, later copies removed", stream=stream, rows=len(delete))
    update = [(row_id, identity) for row_id, _, identity in changed if row_id not in delete]
    if update:
        await conn.execute(SET_IDENTITY, stream, *[list(c) for c in zip(*update, strict=True)])
    old_hashes = {row["id"]: row["message_hash"] for row in rows}
    pointers = [(ts, old_hashes[row_id], identity) for row_id, ts, identity in changed]
    await conn.execute(REPOINT_STATE, stream, *[list(c) for c in zip(*pointers, strict=True)])
    return len(changed)
