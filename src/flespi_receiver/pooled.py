"""Connections borrowed from the pool for one batch or probe, handed back only when clean.

A connection that saw anything but success (or a refusal of the content) may be in the
middle of an operation: an aborted COPY, a cancelled query, a broken socket. It is closed
instead of going back to the pool, where the next batch would trip on it ("cannot switch to
state 15; another operation is in progress"); the pool opens a new one when needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from flespi_receiver.body import BodyReader
from flespi_receiver.device_state import DEFAULT_EFFECTS, BatchEffects
from flespi_receiver.errors import BatchRejected, BodyError
from flespi_receiver.failures import PoolExhausted, database_kind
from flespi_receiver.fields import DEFAULT_FIELDS, MessageFields
from flespi_receiver.store import StoreResult, store_batch

DEADLOCK_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """Seconds a batch waits for a connection, and that one statement may take."""

    acquire_timeout: float
    command_timeout: float


@asynccontextmanager
async def borrowed(
    pool: asyncpg.Pool, acquire_timeout: float
) -> AsyncIterator[PoolConnectionProxy]:
    """A pooled connection; PoolExhausted when none is free within `acquire_timeout` seconds."""
    try:
        conn = await pool.acquire(timeout=acquire_timeout)
    except TimeoutError as exc:
        raise PoolExhausted(
            f"no connection free within database.acquire_timeout ({acquire_timeout}s)"
        ) from exc
    try:
        yield conn
    except (BatchRejected, BodyError):
        # refused content or a body that broke off: the transaction was rolled back cleanly
        # (asyncpg waits for a COPY's cancellation before the rollback), the connection is fine
        raise
    except BaseException:
        # already gone when the server ended the session: the original error is the news
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()
        raise
    finally:
        with contextlib.suppress(asyncpg.InterfaceError):
            await pool.release(conn)


async def store_pooled(
    pool: asyncpg.Pool,
    stream: str,
    body: bytes | BodyReader,
    limits: PoolLimits,
    *,
    quarantine: bool,
    fields: MessageFields = DEFAULT_FIELDS,
    effects: BatchEffects = DEFAULT_EFFECTS,
) -> StoreResult:
    """store_batch on a pooled connection: PoolExhausted, or whatever store_batch raises."""
    # two receivers storing overlapping batches in different orders can deadlock; PostgreSQL
    # then aborts one of them, which simply tries again
    deadlocks = 0
    fresh_sessions = False
    while True:
        try:
            async with borrowed(pool, limits.acquire_timeout) as conn:
                return await store_batch(
                    conn,
                    stream,
                    body,
                    quarantine=quarantine,
                    command_timeout=limits.command_timeout,
                    fields=fields,
                    effects=effects,
                )
        except asyncpg.TransactionRollbackError:
            deadlocks += 1
            if deadlocks == DEADLOCK_ATTEMPTS:
                raise
        except Exception as exc:
            # a session opened while the database was read-only stays read-only after it is
            # writable again (default_transaction_read_only is read at the session's start):
            # every pooled session is replaced and the batch tried once more on a new one
            if fresh_sessions or database_kind(exc) != "read_only":
                raise
            fresh_sessions = True
            await pool.expire_connections()
        if isinstance(body, BodyReader):
            body = await body.read_all()  # the next attempt starts from the beginning
