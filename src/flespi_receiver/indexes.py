"""Indexes on `messages` built while the stream keeps flowing, partitioned or not.

On a plain table: `CREATE INDEX CONCURRENTLY`. On a partitioned one (where CONCURRENTLY is
refused): the index is declared on the parent alone (`ON ONLY`, no build), built concurrently on
each partition, and attached; once every partition has it the parent's index is valid, and each
partition made later gets it when it is attached.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from flespi_receiver.copy_in import Connection
from flespi_receiver.ddl import with_short_locks

log = structlog.get_logger("flespi_receiver.indexes")

# seconds to wait for a moment when no batch writes to messages (an index on the parent only
# needs that moment, it builds nothing)
PATIENCE = 60.0
# One receiver builds at a time. Taken by polling, not by waiting: a session waiting for a lock
# holds a snapshot, which another's CREATE INDEX CONCURRENTLY would wait for in turn.
TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext('flespi_receiver:indexes:' || current_schema()))"
UNLOCK = "SELECT pg_advisory_unlock(hashtext('flespi_receiver:indexes:' || current_schema()))"
LOCK_POLL = 0.2  # seconds
IS_PARTITIONED = """
SELECT c.relkind = 'p' FROM pg_class c
WHERE c.oid = to_regclass(current_schema() || '.messages')
"""
# the index, if it exists: is it valid (a failed concurrent build leaves an invalid one)?
INDEX_STATE = """
SELECT x.indisvalid FROM pg_index x
WHERE x.indexrelid = to_regclass(current_schema() || '.' || $1)
"""
# partitions of messages that lack a part of the parent's index $1
PARTITIONS_WITHOUT = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass(current_schema() || '.messages') AND c.relkind = 'r'
  AND NOT EXISTS (
      SELECT 1 FROM pg_inherits ii JOIN pg_index x ON x.indexrelid = ii.inhrelid
      WHERE ii.inhparent = to_regclass(current_schema() || '.' || $1) AND x.indrelid = c.oid)
ORDER BY c.relname
"""


def part_name(partition: str, index: str) -> str:
    """The name of `index`'s part on `partition`, within PostgreSQL's 63 characters."""
    name = f"{partition}_{index}"
    if len(name) <= 63:
        return name
    return f"{partition}_{hashlib.sha256(index.encode()).hexdigest()[:16]}"


async def ensure_index(conn: Connection, name: str, key: str) -> bool:
    """Make sure index `name` on messages `(key)` exists and is valid; True if built now.

    `name` and `key` are SQL the caller wrote (an identifier, an index key list), never input.
    Receivers starting at once build one after the other; the later ones find it made.
    """
    async with _building(conn):
        return await _ensure_index(conn, name, key)


@asynccontextmanager
async def _building(conn: Connection) -> AsyncIterator[None]:
    # polling the database, not waiting for an event of this process
    while not await conn.fetchval(TRY_LOCK):  # noqa: ASYNC110
        await asyncio.sleep(LOCK_POLL)
    try:
        yield
    finally:
        await conn.fetchval(UNLOCK)


async def _ensure_index(conn: Connection, name: str, key: str) -> bool:
    if not await conn.fetchval(IS_PARTITIONED):
        return await _concurrently(conn, name, "messages", key)
    built = False
    if await conn.fetchval(INDEX_STATE, name) is None:

        async def declare() -> None:
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON ONLY messages ({key})")

        await with_short_locks(conn, declare, what=f"declaring index {name}", patience=PATIENCE)
        built = True
    for row in await conn.fetch(PARTITIONS_WITHOUT, name):
        part = part_name(row[0], name)
        await _concurrently(conn, part, row[0], key)

        async def attach(part: str = part) -> None:
            await conn.execute(f"ALTER INDEX {name} ATTACH PARTITION {part}")

        await with_short_locks(conn, attach, what=f"attaching index {part}", patience=PATIENCE)
        built = True
    return built


async def _concurrently(conn: Connection, name: str, table: str, key: str) -> bool:
    """CREATE INDEX CONCURRENTLY, replacing an invalid one a failed build left behind."""
    valid = await conn.fetchval(INDEX_STATE, name)
    if valid:
        return False
    if valid is False:
        log.warning("dropping an index a failed build left unusable", index=name)
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    log.info("creating index", index=name, note="runs concurrently; big tables take a while")
    # CONCURRENTLY: the stream keeps flowing while the index is built
    await conn.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({key})")
    return True
