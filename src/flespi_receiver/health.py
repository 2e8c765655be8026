"""Liveness and readiness: `/healthz` (the process serves) and `/readyz` (it can store batches)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from flespi_receiver.copy_in import Connection
from flespi_receiver.failures import DatabaseState, database_kind
from flespi_receiver.ingest import error_response, json_response
from flespi_receiver.migrate import pending_migrations
from flespi_receiver.pooled import borrowed
from flespi_receiver.state import ACCEPTING, DATABASE_HEALTH, POOL, SCHEMA

READY_TIMEOUT = 3.0

# Could a batch be written now? (read-only: a standby after a failover, or
# default_transaction_read_only; a missing table raises, naming it)
WRITABLE = """
SELECT current_setting('transaction_read_only') = 'on' AS read_only,
       has_table_privilege('messages', 'INSERT')
       AND has_table_privilege('rejected_messages', 'INSERT') AS may_insert
"""
# ...and is nobody holding a lock that would make it wait? (ONLY: not every partition)
NOT_LOCKED = "LOCK TABLE ONLY messages, ONLY rejected_messages IN ROW EXCLUSIVE MODE NOWAIT"


async def healthz(request: web.Request) -> web.Response:
    """Always cheap: no database round trip."""
    return json_response(200, {"status": "ok"})


async def _check_database(conn: Connection, schema: str) -> None:
    """Raises DatabaseState (or asyncpg's error) when a batch could not be written now."""
    async with conn.transaction():
        row = await conn.fetchrow(WRITABLE)
        assert row is not None
        if row["read_only"]:
            # raised, so that the connection is closed: its session may be the read-only one
            raise DatabaseState("read_only", RuntimeError("transactions are read-only"))
        if not row["may_insert"]:
            cause = RuntimeError("no INSERT privilege on messages or rejected_messages")
            raise DatabaseState("privileges", cause)
        await conn.execute(NOT_LOCKED)
        pending = await pending_migrations(conn, schema)
    if pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
        raise DatabaseState("schema", RuntimeError(f"pending migrations: {names}"))


async def readyz(request: web.Request) -> web.Response:
    """Ready when not shutting down, PostgreSQL takes writes without waiting, the schema has
    every migration, and the last batch did not just fail for the database's state."""
    if not request.app[ACCEPTING].is_set():
        return error_response(503, "shutting down")
    try:
        async with (
            asyncio.timeout(READY_TIMEOUT),
            # a pool all in use says so (pool_exhausted) before the whole check runs out
            borrowed(request.app[POOL], READY_TIMEOUT / 2) as conn,
        ):
            await _check_database(conn, request.app[SCHEMA])
    except Exception as exc:
        kind = database_kind(exc)
        if kind is None:
            raise
        cause = exc.cause if isinstance(exc, DatabaseState) else exc
        return error_response(503, f"database unavailable ({kind}): {cause}")
    failure = request.app[DATABASE_HEALTH].last_failure()
    if failure is not None:
        kind, ago = failure
        return error_response(
            503, f"database unavailable ({kind}): the last batch failed {ago:.0f}s ago"
        )
    return json_response(200, {"status": "ready"})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
